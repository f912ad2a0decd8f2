"""What a latent does: steer the model with a run's dictionaries spliced in and their latents
edited (`steer`), and attribute a prediction to the latents that drove it (`attribute`).
Both run on the run's model with its dictionaries spliced by `saekit.splice`, after a BOS token
as in training."""

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from saekit.errors import SaekitError
from saekit.run import Run
from saekit.sae import SAE
from saekit.splice import Edit, Splice, as_edits, forward, needs_full_forward

MEAN_TOKENS = 32768  # held-out tokens that a mean ablation's latent means are taken over


class _Setup:
    """A run's model and the dictionaries of it that an intervention splices in."""

    def __init__(self, run, model=None):
        self.run = run if isinstance(run, Run) else Run.open(Path(run))
        if model is None:
            from saekit.model import load_model

            name = self.run.model_name
            if not name:
                raise SaekitError(f"{self.run.path} names no model; pass the model (a loaded one or a name)")
            model = load_model(name)
        elif isinstance(model, str):
            from saekit.model import load_model

            model = load_model(model)
        self.model, self.tok = model, model.tokenizer
        self.saes: dict[str, SAE] = {}

    def sae(self, name: str | None) -> tuple[str, SAE]:
        name = self.run.hookpoint(name)
        if name not in self.saes:
            from saekit.model import check_hookpoints

            sae = self.run.sae(name, device=next(self.model.parameters()).device).requires_grad_(False)
            if not sae.cfg.crosscoder and not sae.cfg.hookpoint:
                raise SaekitError(f"the SAE of {self.run.path} records no hookpoint to splice it at")
            check_hookpoints(self.model, sae.cfg.source_names + sae.cfg.target_names)
            self.saes[name] = sae
        return name, self.saes[name]

    def tokens(self, prompt: str, room: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [1, T] with BOS first, mask [1, T] of the positions a dictionary reads), checked to
        leave `room` more positions in the model's context."""
        _nonempty(prompt)
        bos = [self.tok.bos_token_id] if self.tok.bos_token_id is not None else []
        ids = torch.tensor([bos + self.tok(prompt, add_special_tokens=False).input_ids])
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        if n_ctx and ids.shape[1] + room > n_ctx:
            more = f" plus {room} new ones" if room else ""
            raise SaekitError(f"the prompt is {ids.shape[1]} tokens{more}; the model reads at most {n_ctx}")
        special = torch.tensor(sorted(set(self.tok.all_special_ids)), dtype=torch.long)
        return ids, ~torch.isin(ids, special)

    def token_id(self, token: str | int) -> int:
        """The id of a one-token string (e.g. " king") or an id."""
        if isinstance(token, int):
            if not 0 <= token < len(self.tok):
                raise SaekitError(f"token id {token} is outside the vocabulary (0..{len(self.tok) - 1})")
            return token
        ids = self.tok(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            pieces = [self.tok.decode([i]) for i in ids]
            raise SaekitError(f"{token!r} is {len(ids)} tokens on this model ({pieces}); give one token")
        return ids[0]

    def means(self, name: str, sae: SAE) -> dict[int, float]:
        """Each latent's mean value over the first MEAN_TOKENS held-out activations (zeros counted)."""
        total, n = torch.zeros(sae.n_latents, dtype=torch.float64), 0
        with torch.no_grad():
            for x in self.run.activations(name):
                x = x[: MEAN_TOKENS - n].to(sae.W_dec.device)
                vals, idx = sae.encode(x)
                total.index_add_(0, idx.flatten().cpu(), vals.flatten().double().cpu())
                n += len(x)
                if n >= MEAN_TOKENS:
                    break
        return dict(enumerate((total / max(n, 1)).tolist()))

    def splice(self, edits: list[Edit], hookpoint: str | None, mask: torch.Tensor, error: bool,
               grad: bool = False) -> Splice:
        """A Splice of the dictionaries `edits` name (or `hookpoint`'s, or the run's only one)."""
        named = [e.hookpoint or hookpoint for e in edits] or [hookpoint]
        saes = dict(self.sae(h) for h in dict.fromkeys(named))
        edits = [Edit(e.latent, e.op, e.value, e.positions, self.run.hookpoint(e.hookpoint or hookpoint))
                 for e in edits]
        for e in edits:
            if not 0 <= e.latent < saes[e.hookpoint].n_latents:
                raise SaekitError(f"latent {e.latent} is out of range: {e.hookpoint} has "
                                  f"{saes[e.hookpoint].n_latents} latents")
        means = {n: self.means(n, saes[n]) for n in {e.hookpoint for e in edits if e.op == "mean"}}
        return Splice(saes, edits, error, mask, means, grad)


def _nonempty(prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise SaekitError("the prompt is empty")


@torch.no_grad()
def _generate(model, ids: torch.Tensor, splice: Splice | None, n: int, temperature: float, seed: int,
              eos: int | None) -> tuple[list[int], torch.Tensor]:
    """(the `n` or fewer new token ids, stopping after EOS; next-token probabilities [vocab] at the
    prompt's last position). Greedy at temperature 0, else sampled with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    full = splice is not None and needs_full_forward(model, splice)
    toks, past, start, new, first = ids, None, 0, [], None
    for _ in range(n):
        if splice is not None:
            splice.start = start
        logits, past = forward(model, toks[:, start:], splice, past)
        if full or past is None:
            past = None
        else:
            start = toks.shape[1]
        lg = logits[0, -1].float().cpu()
        if first is None:
            first = lg.softmax(-1)
        nxt = int(lg.argmax()) if temperature == 0 else int(
            torch.multinomial((lg / temperature).softmax(-1), 1, generator=gen))
        new.append(nxt)
        toks = torch.cat([toks, torch.tensor([[nxt]], device=toks.device)], 1)
        if nxt == eos:
            break
    return new, first


@dataclass
class Steering:
    prompt: str
    edits: list[Edit]
    clean: str  # the model's continuation
    steered: str  # the continuation with the edits
    next_token: pd.DataFrame  # token, p_clean, p_steered: the largest moves of P(next token), largest first
    p_clean: torch.Tensor  # [vocab] next-token probabilities after the prompt
    p_steered: torch.Tensor

    def to_dict(self) -> dict:
        return {"clean": self.clean, "steered": self.steered, "next_token": self.next_token.to_dict("records")}


def steer(run, prompt: str, edits, hookpoint: str | None = None, max_new_tokens: int = 20, temperature: float = 0.0,
          seed: int = 0, error: bool = True, model=None, top: int = 10) -> Steering:
    """The continuation of `prompt` by the run's model, clean and with `edits` applied to the
    latents of the dictionary at `hookpoint` (default: the run's only one; an `Edit` may name its
    own). `edits`: `Edit`s, "6226=+8"-style strings or `{6226: "+8"}` (see `saekit.splice.Edit`),
    at every position of the prompt and of the continuation unless an Edit says where.
    `error=False` leaves the reconstruction error out (the dictionary alone stands for the
    activation). Greedy at `temperature` 0, else sampled with `seed` (both continuations draw
    from the same seed). `model`: a loaded model or a name (default: the run's)."""
    if max_new_tokens < 1:
        raise SaekitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise SaekitError(f"temperature must be >= 0, got {temperature}")
    edits = as_edits(edits)
    _nonempty(prompt)
    s = _Setup(run, model)
    ids, mask = s.tokens(prompt, max_new_tokens)
    splice = s.splice(edits, hookpoint, mask, error)
    eos = s.tok.eos_token_id
    clean, p_clean = _generate(s.model, ids, None, max_new_tokens, temperature, seed, eos)
    steered, p_steered = _generate(s.model, ids, splice, max_new_tokens, temperature, seed, eos)
    moved = (p_steered - p_clean).abs().topk(min(top, len(p_clean))).indices
    table = pd.DataFrame({"token": [s.tok.decode([i]) for i in moved.tolist()],
                          "p_clean": p_clean[moved].tolist(), "p_steered": p_steered[moved].tolist()})
    return Steering(prompt, [e for es in splice.edits.values() for e in es], s.tok.decode(clean),
                    s.tok.decode(steered), table, p_clean, p_steered)


@dataclass
class Attribution:
    table: pd.DataFrame  # position, token, latent, activation, attribution, label; largest |attribution| first
    metric: float  # logit[target] - logit[against] (logit[target] without against) after the prompt
    error: float  # the error term's attribution: <dm/dx, x - x_hat> summed over positions
    bias: float  # the decoder bias's: <dm/dx, b_dec>
    error_share: float  # |error| / (|error| + sum |attribution|): what the dictionary leaves unexplained

    def to_dict(self) -> dict:
        return {"metric": self.metric, "error": self.error, "bias": self.bias, "error_share": self.error_share,
                "rows": self.table.to_dict("records")}


def attribute(run, prompt: str | list[str], target, against=None, hookpoint: str | None = None,
              model=None) -> Attribution | list[Attribution]:
    """Which latents drove the prediction of `target` (a one-token string such as " king", or a
    token id) after `prompt`, against `against` if given: for each active latent i at each
    position p of the dictionary at `hookpoint` (default: the run's only one), its activation
    z and attribution z * dm/dz with m = logit[target] - logit[against] at the last position,
    through the model with the dictionary spliced in and its error term held fixed. For a linear
    decoder the attributions at a position sum to <dm/dx, x_hat - b_dec>, so the attributions,
    the error term's and the bias's add up to <dm/dx, x> (tests/test_intervene.py).

    A list of prompts (with one target and against for all, or a list of each) gives a list of
    Attributions from one forward and backward of the prompts as one batch, padded on the right:
    a causal model's prediction at a prompt's last position never reads the padding, so each is
    the prompt's own attribution (benchmarks/RESULTS.md §22: what the batch saves)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise SaekitError("no prompts to attribute")
    for p in prompts:
        _nonempty(p)
    n = len(prompts)
    targets, againsts = (_per_prompt(v, n, what) for v, what in ((target, "target"), (against, "against")))
    s = _Setup(run, model)
    enc = [s.tokens(p) for p in prompts]
    t = [s.token_id(x) for x in targets]
    a = [None if x is None else s.token_id(x) for x in againsts]
    lengths = [len(ids[0]) for ids, _ in enc]
    width = max(lengths)
    pad = s.tok.pad_token_id if s.tok.pad_token_id is not None else (s.tok.eos_token_id or 0)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.bool)
    for b, ((i, m), L) in enumerate(zip(enc, lengths, strict=True)):
        ids[b, :L], mask[b, :L] = i[0], m[0]
    splice = s.splice([], hookpoint, mask, error=True, grad=True)
    (name,) = splice.saes
    sae = splice.saes[name]
    with torch.enable_grad():
        logits, _ = forward(s.model, ids, splice)
        last = logits[torch.arange(n), torch.tensor(lengths) - 1].float()  # [n, vocab]
        metric = torch.stack([last[b, t[b]] - (last[b, a[b]] if a[b] is not None else 0) for b in range(n)])
        vals, idx, rows, pos = splice.codes[name]
        written = splice.written[name]
        grads = torch.autograd.grad(metric.sum(), [vals] + [w for _, w, _ in written])
    attr = (vals * grads[0]).detach()
    vals = vals.detach()
    bias_of = {h: sae.b_dec[sae.part_slice(h, True)] if sae.cfg.crosscoder else sae.b_dec for h, _, _ in written}
    labels = s.run.labels(name)
    out = []
    for b in range(n):
        own = rows == b
        error = sum(float((g[own] * err[own]).sum()) for g, (_, _, err) in zip(grads[1:], written, strict=True))
        bias = sum(float((g[own].sum(0) * bias_of[h]).sum()) for g, (h, _, _) in zip(grads[1:], written, strict=True))
        on = (vals > 0) & own[:, None]
        at = pos[:, None].expand_as(idx)[on].tolist()
        latents = idx[on].tolist()
        words = [s.tok.decode([i]) for i in ids[b, : lengths[b]].tolist()]
        table = pd.DataFrame({"position": at, "token": [words[p] for p in at], "latent": latents,
                              "activation": vals[on].tolist(), "attribution": attr[on].tolist(),
                              "label": [labels.get(j) for j in latents]})
        table = table.reindex(table.attribution.abs().sort_values(ascending=False, kind="stable").index)
        total = float(table.attribution.abs().sum())
        out.append(Attribution(table.reset_index(drop=True), float(metric[b].detach()), error, bias,
                               abs(error) / (abs(error) + total) if abs(error) + total > 0 else 0.0))
    return out[0] if isinstance(prompt, str) else out


def _per_prompt(value, n: int, what: str) -> list:
    """`value` for each of `n` prompts: a list of n, or one value (a token, or None) for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise SaekitError(f"{len(value)} values of {what} for {n} prompts; give one, or one per prompt")
        return list(value)
    return [value] * n
