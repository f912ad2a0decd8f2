"""Dictionaries spliced back into the model, with their latents edited.

A spliced dictionary replaces each of its targets' activation `x` by its reconstruction `x_hat`
plus the reconstruction error `x - x_hat` (kept by default: an unedited splice is the clean
model), or by `x_hat` alone (`error=False`: the model as the dictionary sees it). An SAE reads
and writes its hookpoint; a transcoder reads its source (an MLP's input) and writes its target
(the MLP's output); a crosscoder reads its sources and writes its targets. Edits change the code
before decoding, so with the error term kept only the edit moves the model (SAELens's
`use_error_term`; Templeton et al. 2024 steer the same way).

Positions whose mask is False (the BOS token, which no dictionary saw in training) keep their
activation. One `Splice` serves the CE evaluation (`saekit.evaluate`), the cross-layer skip, the
IOI readout and `saekit.intervene` (steer, attribute).
"""

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from saekit.errors import SaekitError
from saekit.model import plain_twin, twin_hook
from saekit.sae import SAE

OPS = ("set", "add", "scale", "zero", "mean")
_SPEC = re.compile(r"(?P<latent>\d+)=(?:(?P<add>[+-]\S+)|[x*](?P<scale>\S+)|(?P<word>zero|mean)|(?P<set>\S+))")


@dataclass(frozen=True)
class Edit:
    """One latent edit: `set` it to `value`, `add` `value`, `scale` by `value`, or ablate it
    (`zero`, `mean`: its mean over held-out activations), at `positions` (None: every position)
    of the dictionary `hookpoint` (None: the run's only one)."""

    latent: int
    op: str
    value: float = 0.0
    positions: tuple[int, ...] | None = None
    hookpoint: str | None = None

    @classmethod
    def parse(cls, spec: str, hookpoint: str | None = None) -> "Edit":
        """`N=+V` / `N=-V` add, `N=V` set, `N=xS` (or `N=*S`) scale, `N=zero`, `N=mean`."""
        m = _SPEC.fullmatch(spec.strip())
        try:
            if m is None:
                raise ValueError
            value = float(m["add"] or m["scale"] or m["set"] or 0.0)
        except ValueError:
            raise SaekitError(f"cannot read the edit {spec!r}: write LATENT=+V or LATENT=-V (add), LATENT=V (set), "
                              "LATENT=xS (scale), LATENT=zero or LATENT=mean (ablate), e.g. 6226=+8") from None
        op = "add" if m["add"] else "scale" if m["scale"] else m["word"] or "set"
        return cls(int(m["latent"]), op, value, None, hookpoint)


def as_edits(edits) -> list[Edit]:
    """Edits from `Edit`s, `"N=SPEC"` strings, or a `{latent: SPEC}` dict (SPEC as in `Edit.parse`)."""
    if isinstance(edits, dict):
        edits = [f"{k}={v}" for k, v in edits.items()]
    out = [e if isinstance(e, Edit) else Edit.parse(str(e)) for e in edits]
    for e in out:
        if e.op not in OPS:
            raise SaekitError(f"unknown edit {e.op!r}; choose from {', '.join(OPS)}")
    return out


def _edited(vals: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor, edits: list[Edit],
            means: dict[int, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The code `(vals, idx) [R, k]` with `edits` applied at the rows whose position is in each
    edit's positions (`rows [R]`: each row's position): the latent's entries are zeroed and one
    column holding its new value is appended."""
    for e in edits:
        at = torch.ones_like(rows, dtype=torch.bool) if e.positions is None else torch.isin(
            rows, torch.tensor(e.positions, device=rows.device))
        hit = (idx == e.latent) & at[:, None]
        cur = (vals * hit).sum(1)
        new = {"set": torch.full_like(cur, e.value), "add": cur + e.value, "scale": cur * e.value,
               "zero": torch.zeros_like(cur), "mean": torch.full_like(cur, means.get(e.latent, 0.0))}[e.op]
        vals = torch.cat([vals.masked_fill(hit, 0), torch.where(at, new, 0)[:, None]], 1)
        idx = torch.cat([idx, torch.full_like(idx[:, :1], e.latent)], 1)
    return vals, idx


class _MissingSources(Exception):
    """A target was reached before all of its dictionary's sources (an acausal crosscoder)."""


class Splice:
    """Hooks that splice `saes` (`{name: dictionary}`, each reading `cfg.source_names` and writing
    `cfg.target_names`) into a forward.

    `mask [b, T]`: positions to splice (default all; positions past T are spliced, as generated
    tokens are). `start`: the position of the first token of the next forward (a generation with
    a KV cache forwards one token at a time). `grad=True` makes each dictionary's code a leaf
    tensor with gradients, kept in `codes[name] = (values, indices, batch rows, positions)`, and
    keeps what each target was given in `written[name] = [(target, rows written [R, d], error term
    [R, d])]` (their gradients give the error term's share of an attribution).
    """

    def __init__(self, saes: dict[str, SAE], edits: Iterable[Edit] = (), error: bool = True,
                 mask: torch.Tensor | None = None, means: dict[str, dict[int, float]] | None = None,
                 grad: bool = False):
        self.saes, self.error, self.mask, self.grad = saes, error, mask, grad
        self.edits = {n: [e for e in edits if (e.hookpoint or n) == n] for n in saes}
        self.means = means or {}
        self.start = 0
        self.codes: dict[str, tuple] = {}
        self.written: dict[str, list] = {}
        self.clean_sources = None  # {name: {source: [R, d]}} read by a first forward (`forward`)
        self._sources: dict[str, dict[str, torch.Tensor]] = {}
        self._out: dict[str, torch.Tensor] = {}

    def hookpoints(self) -> list[str]:
        names = [h for sae in self.saes.values() for h in sae.cfg.source_names + sae.cfg.target_names]
        return list(dict.fromkeys(names))

    def hooks(self, read_only: bool = False) -> list[tuple[str, Callable[[torch.Tensor], torch.Tensor]]]:
        """`(hookpoint, fn)` pairs; `fn(acts) -> acts`. `read_only`: only record the sources."""
        self._sources, self._out = {n: {} for n in self.saes}, {}
        return [(h, lambda acts, h=h: self._at(h, acts, read_only)) for h in self.hookpoints()]

    def _where(self, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [b, t] of spliced positions, positions [b, t]) of the tokens this forward reads."""
        b, t = acts.shape[:2]
        pos = torch.arange(self.start, self.start + t, device=acts.device).expand(b, t)
        if self.mask is None:
            return torch.ones(b, t, dtype=torch.bool, device=acts.device), pos
        m = self.mask[:, self.start : self.start + t].to(acts.device)
        return torch.nn.functional.pad(m, (0, t - m.shape[1]), value=True), pos

    def _at(self, h: str, acts: torch.Tensor, read_only: bool) -> torch.Tensor:
        m, pos = self._where(acts)
        for name, sae in self.saes.items():
            if h in sae.cfg.source_names:
                self._sources[name][h] = acts[m].flatten(1).float()
        if read_only:
            return acts
        out = None
        for name, sae in self.saes.items():
            if h not in sae.cfg.target_names:
                continue
            if name not in self._out:
                self._out[name] = self._decode(name, sae, m, pos)
            cols = sae.part_slice(h, True) if sae.cfg.crosscoder else slice(None)
            x_hat, clean_hat = (r[:, cols] for r in self._out[name])
            err = (acts[m].flatten(1).float() - clean_hat).detach()
            new = x_hat + err if self.error else x_hat
            if self.grad:
                self.written.setdefault(name, []).append((h, new, err if self.error else torch.zeros_like(err)))
            out = acts.clone() if out is None else out
            out[m] = new.to(acts.dtype).view_as(acts[m])
        return acts if out is None else out

    def _decode(self, name: str, sae: SAE, m: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(edited reconstruction, unedited reconstruction) `[R, d_out]` of dictionary `name` at the
        spliced positions, from the sources this forward (or a first forward) recorded."""
        got = (self.clean_sources or {}).get(name) or self._sources[name]
        if any(s not in got for s in sae.cfg.source_names):
            raise _MissingSources
        x = torch.cat([got[s] for s in sae.cfg.source_names], 1)
        with torch.no_grad():
            vals, idx = sae.encode(x.to(sae.W_dec.device))
        x_hat = SAE.decode(sae, vals, idx)
        if self.edits[name]:
            vals, idx = _edited(vals, idx, pos[m], self.edits[name], self.means.get(name, {}))
        if self.grad:
            vals = vals.detach().requires_grad_()
            b = torch.arange(m.shape[0], device=m.device)[:, None].expand_as(m)[m]
            self.codes[name] = (vals, idx, b, pos[m])
        edited = SAE.decode(sae, vals, idx) if self.edits[name] or self.grad else x_hat
        return edited, x_hat.detach()


def _run_hooked(model, pairs, tokens: torch.Tensor, past=None) -> tuple[torch.Tensor, object]:
    """Logits `[b, t, vocab]` of `tokens` with `pairs` (hookpoint, fn) applied, and the KV cache to
    continue from. On the plain HF model behind the bridge where every hookpoint is a module's
    input or output (faster, and it caches keys and values); else on the bridge (no cache: a
    continuation forwards the whole sequence again)."""
    plain = plain_twin(model, [h for h, _ in pairs])
    device = next(model.parameters()).device
    if plain is not None:
        twin, where = plain
        fns = dict(pairs)
        handles = [twin_hook(twin, path, side, fns[h]) for h, path, side in where]
        try:
            out = twin(tokens.to(device), cache=past, use_cache=True)
        finally:
            for handle in handles:
                handle.remove()
        return out.logits, out.cache
    if past is not None:
        raise SaekitError("internal: a KV cache for a bridge forward")
    hooks = [(h, lambda act, hook, fn=fn: fn(act)) for h, fn in pairs]
    return model.run_with_hooks(tokens.to(device), fwd_hooks=hooks), None


def forward(model, tokens: torch.Tensor, splice: "Splice | None" = None, past=None):
    """Logits `[b, t, vocab]` of `tokens` (the positions from `splice.start` on when `past`, the
    KV cache of the earlier ones, is given) with `splice` applied, and the new KV cache (None
    where there is none). A crosscoder whose targets come before its last source reads its
    sources from a first forward of the same tokens without the splice (then no KV cache)."""
    if splice is None:
        return _run_hooked(model, [], tokens, past)
    try:
        return _run_hooked(model, splice.hooks(), tokens, past)
    except _MissingSources:
        pass
    if past is not None or splice.start:
        raise SaekitError("internal: a crosscoder spliced into a forward that continues a KV cache")
    with torch.no_grad():
        _run_hooked(model, splice.hooks(read_only=True), tokens)
    splice.clean_sources = splice._sources
    try:
        logits, _ = _run_hooked(model, splice.hooks(), tokens)
    finally:
        splice.clean_sources = None
    return logits, None


def needs_full_forward(model, splice: "Splice") -> bool:
    """Whether a continuation must forward the whole sequence again (no KV cache): hookpoints the
    plain HF model lacks, or a crosscoder that reads sources after its targets."""
    return plain_twin(model, splice.hookpoints()) is None or any(
        sae.cfg.sources and sae.cfg.sources == sae.cfg.target_names and len(sae.cfg.sources) > 1
        for sae in splice.saes.values())


def reconstruct(sae: SAE, mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hook replacement: an SAE's reconstruction alone at the positions where `mask [b, pos]`
    is True (the CE evaluation's "spliced" model)."""
    splice = Splice({sae.cfg.source_names[0]: sae}, error=False, mask=mask)
    return lambda acts: splice.hooks()[0][1](acts)


def zero_ablate(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hook replacement: zeros at the positions where `mask [b, pos]` is True."""

    def replace(acts: torch.Tensor) -> torch.Tensor:
        return acts.masked_fill(mask.to(acts.device).view(*mask.shape, *[1] * (acts.ndim - 2)), 0)

    return replace
