"""The dictionary model: sources -> one set of latents -> targets. An SAE is its one-source,
same-target case; a transcoder reads one activation and writes another; a crosscoder reads and
writes several (layers, snapshots, models). One class, `SAE`, holds them all.

Notation (one row per latent), sources and targets concatenated in their listed order:
`W_enc [m, D_src]`, `b_enc [m]`, `W_dec [m, D_tgt]`, `b_dec [D_tgt]`, and `b_in` for the
sources that are not targets (a transcoder's input), so the centring `c [D_src]` of a source is
its slice of `b_dec` when it is also a target and of `b_in` otherwise:
    pre = W_enc (x_src - c) + b_enc;   z = rule(pre);   x_hat_tgt = sum_j z_j W_dec[j] + b_dec
Concatenation is why a crosscoder over S sources costs about S SAE steps: the fast kernels
(grouped top-k, sparse gather-sums) run on the concatenated matrices unchanged, and an SAE keeps
its exact arithmetic and its file layout (cfg.json + sae.safetensors with W_enc/b_enc/W_dec/b_dec).

How each architecture picks a row's latents, and what else it stores and trains, is its entry
in saekit.families (TopK, BatchTopK, Matryoshka, JumpReLU, matching pursuit, ReLU). Codes are
sparse (`values [B, k]`, `indices [B, k]`, zero values are padding), so no step ever builds a
dense [batch, m] latent tensor beyond the encoder matmul itself.
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from saekit.config import make_config
from saekit.errors import SaekitError
from saekit.families import FAMILIES, TRAINABLE, Family, SparseCode, family, users
from saekit.formats import detect, export
from saekit.io import atomic_write
from saekit.kernels import backend, cat_padded, row_topk, sparse_decode
from saekit.runtime import BF16_RESCORE, ENCODER_PATHS, cpu_encoder_path

_PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
# Extra bf16 candidates per row that the CPU bf16 encoder rescores in fp32 (see select_topk).
RESCORE_MARGIN = 16


@dataclass
class SAEConfig:
    d_in: int
    n_latents: int
    k: int
    architecture: str = "topk"
    # BatchTopK inference threshold on pre-activations, in input units (None: use batch top-k).
    threshold: float | None = None
    hookpoint: str | None = None
    model: str | None = None
    # where the weights came from when not saekit (e.g. "SAELens jumprelu"); see saekit.formats
    source_format: str | None = None
    # the CPU encoder path of the SAE's run (saekit.runtime.ENCODER_PATHS); None: this machine's
    encoder_path: str | None = None
    # Matryoshka: the end of each nested prefix of latents, increasing, the last = n_latents
    matryoshka_groups: list[int] | None = None
    # A dictionary over several activations (None: an SAE of one hookpoint): the names it reads and
    # writes, in the order of the concatenated weights, and each one's width.
    sources: list[str] | None = None
    targets: list[str] | None = None
    dims: dict[str, int] | None = None
    # per source/target: the factor its weights were scaled by when the training units were folded
    # out (activations / scale are the training units; see `fold_input_scales`)
    part_scales: dict[str, float] | None = None
    # matching pursuit: stop a token's pursuit once its residual norm falls below this (input units)
    mp_threshold: float | None = None

    def __post_init__(self):
        if self.d_in < 1:
            raise SaekitError(f"d_in must be >= 1, got {self.d_in}")
        fam = family(self.architecture)
        if not 0 < self.k <= self.n_latents:
            raise SaekitError(f"k must be in [1, n_latents], got {self.k} (n_latents is {self.n_latents})")
        if self.encoder_path not in (None, *ENCODER_PATHS):
            raise SaekitError(f"encoder_path must be one of {ENCODER_PATHS}, got {self.encoder_path!r}")
        if self.matryoshka_groups is not None:
            g = self.matryoshka_groups
            if not (g and all(a < b for a, b in zip([0] + g, g, strict=False)) and g[-1] == self.n_latents):
                raise SaekitError(f"matryoshka_groups must increase and end at n_latents={self.n_latents}, got {g}")
        if self.mp_threshold is not None and not ("mp_threshold" in fam.options and self.mp_threshold >= 0):
            raise SaekitError(f"mp_threshold must be >= 0 and is for architecture "
                              f"{' or '.join(map(repr, users('mp_threshold')))}, got {self.mp_threshold!r} "
                              f"with {self.architecture!r}")
        if fam.tied and self.crosscoder:
            raise SaekitError(f"architecture {self.architecture!r} is a tied SAE of one hookpoint (its encoder is its "
                              "decoder); crosscoders and transcoders are not supported")
        if self.crosscoder:
            self.targets = list(self.targets or self.sources)
            dims = self.dims or {}
            missing = [n for n in self.sources + self.targets if n not in dims]
            if missing or len(set(self.sources)) != len(self.sources) or len(set(self.targets)) != len(self.targets):
                raise SaekitError(f"a dictionary needs distinct sources and targets, each with its width in dims "
                                  f"(sources {self.sources}, targets {self.targets}, dims {self.dims})")
            if self.d_in != sum(dims[s] for s in self.sources):
                raise SaekitError(f"d_in {self.d_in} is not the sources' total width {[dims[s] for s in self.sources]}")

    @property
    def crosscoder(self) -> bool:
        """A dictionary over named sources and targets (a crosscoder or transcoder), not an SAE of one
        hookpoint."""
        return self.sources is not None

    @property
    def source_names(self) -> list[str]:
        return self.sources or [self.hookpoint or "x"]

    @property
    def target_names(self) -> list[str]:
        return self.targets or self.source_names

    @property
    def d_out(self) -> int:
        """The targets' total width (d_in for an SAE)."""
        return sum(self.dims[t] for t in self.targets) if self.crosscoder else self.d_in

    def width(self, name: str) -> int:
        return self.dims[name] if self.crosscoder else self.d_in


class SAE(nn.Module):
    """The dictionary: an SAE (one source, the same target) or, with `cfg.sources`, a crosscoder
    or transcoder acting on concatenated activations (`Crosscoder` adds the by-name API)."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        m, d, d_out = cfg.n_latents, cfg.d_in, cfg.d_out
        W = torch.randn(m, d_out, device=device, dtype=dtype)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone() if self.tied_centre else torch.randn(m, d, device=device, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(m, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, device=device, dtype=dtype))
        inputs = [s for s in cfg.source_names if s not in cfg.target_names]
        if inputs:  # a transcoder's (or any non-target source's) own centring
            self.b_in = nn.Parameter(torch.zeros(sum(cfg.width(s) for s in inputs), device=device, dtype=dtype))
        for name in self.family.tensors:  # per latent, e.g. JumpReLU's thresholds (input units)
            self.register_buffer(name, torch.zeros(m, device=device, dtype=dtype))
        # BatchTopK in data-parallel training: `(candidates [b, c], k) -> cut` over the global batch.
        self.batch_cut = None
        # bf16 encoder matmul (set by the trainer on GPU); everything else stays fp32.
        self.matmul_dtype: torch.dtype | None = None

    def extra_repr(self) -> str:
        c = self.cfg
        where = f", hookpoint={c.hookpoint!r}" if c.hookpoint else ""
        where += f", sources={c.sources}, targets={c.targets}" if c.crosscoder else ""
        return f"d_in={c.d_in}, n_latents={c.n_latents}, k={c.k}, architecture={c.architecture!r}{where}"

    @property
    def tied_centre(self) -> bool:
        """Whether the sources are the targets in the same order (an SAE, an acausal crosscoder):
        then the encoder centres on b_dec itself."""
        return self.cfg.source_names == self.cfg.target_names

    def centre(self) -> torch.Tensor:
        """The centring `c [D_src]` subtracted from the concatenated sources: each source's slice
        of b_dec when it is a target, of b_in otherwise (differentiable in both)."""
        if self.tied_centre:
            return self.b_dec
        parts, used = [], 0
        for s in self.cfg.source_names:
            if s in self.cfg.target_names:
                parts.append(self.b_dec[self.part_slice(s, targets=True)])
            else:
                parts.append(self.b_in[used : used + self.cfg.width(s)])
                used += self.cfg.width(s)
        return torch.cat(parts)

    def part_slice(self, name: str, targets: bool) -> slice:
        """Columns of source (or target) `name` in the concatenated encoder (decoder) weights."""
        names = self.cfg.target_names if targets else self.cfg.source_names
        start = sum(self.cfg.width(n) for n in names[: names.index(name)])
        return slice(start, start + self.cfg.width(name))

    @property
    def family(self) -> Family:
        """This dictionary's entry in saekit.families.FAMILIES."""
        return FAMILIES[self.cfg.architecture]

    def make_trainable(self, bandwidth: float = 1e-3) -> "SAE":
        """Add what training needs beyond the stored tensors (the family's training-only parameters,
        e.g. JumpReLU's `log_threshold`) and the straight-through estimator's rectangle-kernel
        `bandwidth` (in training units)."""
        self.bandwidth = bandwidth
        if not self.family.losses:
            raise SaekitError(f"saekit trains {', '.join(TRAINABLE)}; architecture {self.cfg.architecture!r} "
                              "is for SAEs loaded from other tools")
        if self.family.trainable:
            self.family.trainable(self)
        return self

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def n_latents(self) -> int:
        return self.cfg.n_latents

    @property
    def k(self) -> int:
        return self.cfg.k

    # -- encoding -------------------------------------------------------------------------
    def _matmul_dtype(self) -> torch.dtype:
        """The encoder matmul's dtype: `matmul_dtype` when set (bf16 on GPU), else bf16 for an
        fp32 SAE on CPU when its path is bf16 (`runtime.cpu_encoder_path`: the run's recorded
        path, or this CPU's)."""
        if self.matmul_dtype is not None:
            return self.matmul_dtype
        if (self.W_enc.dtype == torch.float32 and not self.W_enc.is_cuda
                and cpu_encoder_path(self.cfg.encoder_path) == BF16_RESCORE):
            return torch.bfloat16
        return self.W_enc.dtype

    @property
    def encoder_path(self) -> str:
        """The numeric path `encode` takes now, as runs record it: "bf16+fp32-rescore" or "fp32"
        on CPU; the matmul dtype elsewhere (e.g. "bf16" on GPU)."""
        dt = self._matmul_dtype()
        if dt != self.W_enc.dtype and not self.W_enc.is_cuda:
            return BF16_RESCORE
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))

    def _preacts(self, xc: torch.Tensor, dt: torch.dtype):
        """Yield (row slice, dense pre-activations [rows, m] in `dt`) over chunks of centred
        inputs: 512 rows on CPU keep a block in cache between the matmul and the top-k (faster
        than one big matmul then top-k); one chunk on GPU."""
        W, b = self.W_enc.to(dt).T, self.b_enc.to(dt)
        n = xc.shape[0]
        step = max(n if self.W_enc.is_cuda else 512, 1)
        for s in range(0, n, step):
            rows = slice(s, s + step)
            yield rows, torch.addmm(b, xc[rows].to(dt), W)

    @torch.no_grad()
    def select_topk(self, xc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row top-k pre-activations and their latent ids ([B, k] each).

        On CPU with a bf16 matmul, each row's top `k + RESCORE_MARGIN` bf16 candidates are
        rescored in fp32 and the best k kept: the latents and values are fp32's except where
        a near-tie falls outside the candidates (measured: benchmarks/RESULTS.md).
        """
        B, m = xc.shape[0], self.n_latents
        dt = self._matmul_dtype()
        rescore = dt != self.W_enc.dtype and not self.W_enc.is_cuda
        vals = torch.empty(B, k, dtype=self.W_enc.dtype, device=xc.device)
        idx = torch.empty(B, k, dtype=torch.long, device=xc.device)
        for s, pre in self._preacts(xc, dt):
            if rescore:
                _, cand = row_topk(pre, min(m, k + RESCORE_MARGIN))
                pre = backend(xc).gather_dot(cand, self.W_enc, xc[s]) + self.b_enc[cand]  # fp32 [rows, k + margin]
                vals[s], j = pre.topk(k, dim=1, sorted=False)
                idx[s] = cand.gather(1, j)
            else:
                vals[s], idx[s] = row_topk(pre, k)
        return vals, idx

    @torch.no_grad()
    def select_batch_topk(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """BatchTopK: keep the k*B largest pre-activations of the whole batch.

        Candidates are each row's top `min(m, 4k)`; the selection is exact unless a row
        would keep more than 4k latents (then it keeps its 4k largest). Rows are padded
        with zeros to the longest row. Also returns the smallest kept value (for the
        inference threshold).
        """
        B, k = xc.shape[0], self.k
        cap = min(self.n_latents, 4 * k)
        vals, idx = self.select_topk(xc, cap)
        vals, order = vals.sort(dim=1, descending=True)
        idx = idx.gather(1, order)
        n_keep = min(k * B, vals.numel())
        flat = vals.flatten()  # the cut is its n_keep-th largest value
        if self.batch_cut is not None:  # data-parallel training: the cut over the global batch
            cut = self.batch_cut(vals, k)
        elif flat.is_cuda:  # CUDA's kthvalue selects in a single block, its topk in many
            cut = flat.topk(n_keep, sorted=False).values.min()
        else:
            cut = flat.kthvalue(flat.numel() - n_keep + 1).values
        keep = vals >= cut
        width = max(int(keep.sum(1).max()), 1)
        vals, idx, keep = vals[:, :width], idx[:, :width], keep[:, :width]
        return vals * keep, idx, float(cut)

    @torch.no_grad()
    def select_threshold(self, xc: torch.Tensor, theta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pre-activation above `theta` (a number, or one per latent [m]), rows padded with
        zeros: BatchTopK inference, ReLU (theta 0) and JumpReLU (per-latent theta)."""
        blocks = []
        for _, pre in self._preacts(xc, self.W_enc.dtype):
            above = pre > theta
            width = max(int(above.sum(1).max()), 1)
            v, i = pre.masked_fill(~above, float("-inf")).topk(width, dim=1)
            blocks.append((v.masked_fill(v == float("-inf"), 0).to(self.W_enc.dtype), i))
        return cat_padded(blocks)

    def encode(self, x: torch.Tensor, aux: dict | None = None) -> SparseCode:
        """Sparse code of `x [B, d_in]` (the sources concatenated); differentiable in the parameters
        when grad is enabled.

        TopK keeps k per row. BatchTopK (and Matryoshka) keeps k*B per batch in training mode and,
        in eval mode, every pre-activation above the learned threshold (if one is set). ReLU and
        JumpReLU keep every pre-activation above 0 / the latent's threshold. Each row's values
        come in no particular order (the top k are selected, not ranked:
        `values.sort(dim=1, descending=True)` ranks them); a zero value is padding. `aux`, when
        given, receives what a rule's training losses need beyond the code (JumpReLU's
        near-threshold pairs, see saekit.families).
        """
        x = x.to(self.W_enc.dtype)
        return self.family.encode(self, x, aux)

    def decode_concat(self, values: torch.Tensor, indices: torch.Tensor, aux: dict | None = None) -> torch.Tensor:
        """`sum_j values[b,j] W_dec[indices[b,j]] + b_dec` -> [B, d_out] (gather-sum, never dense).
        `aux` from a training encode may hold a `decode` step of the rule's own (JumpReLU: the
        threshold gradient of the pairs just below their threshold, whose value 0 gets none here)."""
        x_hat = sparse_decode(values, indices, self.W_dec) + self.b_dec
        return aux["decode"](x_hat) if aux and "decode" in aux else x_hat

    def decode(self, values: torch.Tensor, indices: torch.Tensor, aux: dict | None = None) -> torch.Tensor:
        """The reconstruction of a code ([B, d_out]; a `Crosscoder` gives it by target name)."""
        return self.decode_concat(values, indices, aux)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x [B, d_in]` ([B, d_out], the targets concatenated)."""
        return self.decode(*self.encode(x))

    def decoder_norms(self) -> torch.Tensor:
        """`[n_targets, n_latents]`: each latent's decoder norm per target (rows in target order),
        in the training units (activations / their scale), where the stacked row has unit norm."""
        W = self.W_dec.detach()
        scales = self.cfg.part_scales or {}
        return torch.stack([W[:, self.part_slice(t, True)].norm(dim=1) / scales.get(t, 1.0)
                            for t in self.cfg.target_names])

    # -- units ----------------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> "SAE":
        """Make an SAE trained on `x / scale` act on raw `x`, with identical reconstructions.

        Biases and the threshold scale by `scale`; latent values come out `scale` times
        larger (in input units); the unit-norm decoder rows are unchanged.
        """
        return self.fold_input_scales(dict.fromkeys(self.cfg.source_names + self.cfg.target_names, scale))

    @torch.no_grad()
    def fold_input_scales(self, scales: dict[str, float]) -> "SAE":
        """Make a dictionary trained on each activation divided by its `scales[name]` act on raw
        activations, with identical codes up to one factor sigma and identical reconstructions.

        sigma is the common scale when every source and target shares one (an SAE: latents come
        out in input units, decoder rows stay unit-norm), else 1 (latents stay in training units;
        each part's weights carry its scale, recorded in `cfg.part_scales`):
        W_enc[:, s] *= sigma / scale_s, centring_s *= scale_s, b_enc *= sigma,
        W_dec[:, t] *= scale_t / sigma, b_dec_t *= scale_t, thresholds *= sigma.
        """
        names = self.cfg.source_names + self.cfg.target_names
        common = {scales[n] for n in names}
        sigma = common.pop() if len(common) == 1 else 1.0
        for s in self.cfg.source_names:
            self.W_enc[:, self.part_slice(s, False)] *= sigma / scales[s]
        for t in self.cfg.target_names:
            self.W_dec[:, self.part_slice(t, True)] *= scales[t] / sigma
            self.b_dec[self.part_slice(t, True)] *= scales[t]
        if hasattr(self, "b_in"):
            used = 0
            for s in (s for s in self.cfg.source_names if s not in self.cfg.target_names):
                self.b_in[used : used + self.cfg.width(s)] *= scales[s]
                used += self.cfg.width(s)
        self.b_enc.mul_(sigma)
        if self.cfg.threshold is not None:
            self.cfg.threshold *= sigma
        if self.cfg.mp_threshold is not None:
            self.cfg.mp_threshold *= sigma
        if self.family.fold:
            self.family.fold(self, sigma)
        if self.cfg.crosscoder:
            self.cfg.part_scales = {n: scales[n] / sigma for n in dict.fromkeys(names)}
        return self

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows; for several targets the stacked row (sum over targets of the
        squared norms = 1), so each target's share of a latent is free (Lindsey et al. 2024)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        if self.family.tied:  # the stored encoder is the decoder
            self.W_enc.copy_(self.W_dec)

    # -- files ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name, on the CPU (plus `threshold` for JumpReLU, `b_in` for a
        transcoder)."""
        return {n: getattr(self, n).detach().contiguous().cpu() for n in self._stored()}

    def _stored(self) -> tuple[str, ...]:
        return _PARAMS + self.family.tensors + (("b_in",) if hasattr(self, "b_in") else ())

    def save(self, path: str | os.PathLike, extra: dict | None = None, format: str = "saekit") -> Path:
        """Write `path/cfg.json` and `path/sae.safetensors` (each atomically); `format="sae-lens"`
        writes SAELens's layout instead (cfg.json + sae_weights.safetensors, see saekit.formats)."""
        if format != "saekit" and self.cfg.crosscoder:
            raise SaekitError("SAELens has no crosscoder or transcoder format; saekit's own folder (format saekit: "
                              "cfg.json + sae.safetensors with sources, targets and dims) is this dictionary's export")
        if format != "saekit":
            return export(asdict(self.cfg), self.tensors(), path, format)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        atomic_write(path / "sae.safetensors", lambda p: save_file(tensors, p))
        cfg = {k: v for k, v in asdict(self.cfg).items() if v is not None or k not in _OPTIONAL}
        cfg |= {"extra": extra} if extra else {}
        atomic_write(path / "cfg.json", lambda p: p.write_text(json.dumps(cfg, indent=2)))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> "SAE":
        """Load an SAE folder: saekit's own, or one that another tool wrote (SAELens, sparsify,
        dictionary_learning, Gemma Scope `params.npz`; see saekit.formats). The loaded SAE's
        `cfg.source_format` names the format it came in (None for saekit's). Bad, truncated or
        unrecognised files raise SaekitError."""
        _, loader = detect(Path(path))
        raw, tensors, cfg_file, weights = loader(Path(path))
        unknown = set(raw) - {f.name for f in fields(SAEConfig)}
        if unknown:
            raise SaekitError(f"{cfg_file}: unknown keys {sorted(unknown)}")
        try:
            cfg = make_config(SAEConfig, raw)
        except SaekitError as e:
            raise SaekitError(f"{cfg_file}: {e}") from None
        except TypeError as e:  # a missing key
            raise SaekitError(f"{cfg_file} is not a valid SAE config: {e}") from None
        sae = (Crosscoder if cfg.crosscoder else SAE).from_tensors(cfg, tensors, str(weights))
        return sae.to(device) if device is not None else sae

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> "SAE":
        """An SAE of `cfg` holding `tensors` (saekit's names and layout), shapes checked."""
        sae = cls(cfg, device="meta")
        want = {n: tuple(getattr(sae, n).shape) for n in sae._stored()}
        for name, shape in want.items():
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != shape:
                raise SaekitError(f"{where}: {name} has shape {got}, the config says {shape}")
            if not tensors[name].is_floating_point() or tensors[name].dtype != tensors["W_enc"].dtype:
                raise SaekitError(f"{where}: {name} is {str(tensors[name].dtype).removeprefix('torch.')}, "
                                  "expected the tensors in one floating-point dtype")
        # fresh (aligned) storage: safetensors leaves tensors at header-dependent offsets, and
        # SIMD dot products over misaligned rows round differently from the saved SAE's
        sae.load_state_dict({n: tensors[n].detach().clone() for n in want}, assign=True)
        return sae


class _ByName(nn.Parameter):
    """A concatenated weight that also answers `W[name]`: that source's or target's columns,
    `[n_latents, d_name]` (a detached view). Any other index is a plain tensor index."""

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self.parts:
                raise SaekitError(f"{key!r} is not one of {list(self.parts)}")
            return self.detach()[:, self.parts[key]]
        return super().__getitem__(key)


class Crosscoder(SAE):
    """A dictionary over named activations (Lindsey et al. 2024; a transcoder when its one source
    is not its target). The same model as `SAE` on concatenated activations, with by-name access:
    `encode({name: [B, d]})`, `decode(values, indices) -> {target: [B, d]}`, `W_dec[target]`,
    `W_enc[source]`, `decoder_norms()`. Every analysis that takes an SAE takes a crosscoder's
    concatenated activations (`concat`)."""

    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        if not cfg.crosscoder:
            raise SaekitError("a Crosscoder needs sources (and targets); an SAE of one hookpoint is saekit.SAE")
        super().__init__(cfg, device, dtype)
        self._name_columns()

    def _name_columns(self) -> None:
        for name, targets in (("W_enc", False), ("W_dec", True)):
            w = _ByName(getattr(self, name).data, getattr(self, name).requires_grad)
            names = self.cfg.target_names if targets else self.cfg.source_names
            w.parts = {n: self.part_slice(n, targets) for n in names}
            setattr(self, name, w)

    @property
    def sources(self) -> list[str]:
        return list(self.cfg.sources)

    @property
    def targets(self) -> list[str]:
        return list(self.cfg.targets)

    def concat(self, acts: dict[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
        """`acts[name]` of every source (or of `names`) side by side, `[B, sum of widths]`, checked."""
        names = names or self.cfg.sources
        missing = [n for n in names if n not in acts]
        if missing:
            raise SaekitError(f"activations of {missing} are missing (given: {sorted(acts)})")
        parts = [acts[n] for n in names]
        for n, t in zip(names, parts, strict=True):
            if t.ndim != 2 or t.shape[1] != self.cfg.width(n) or len(t) != len(parts[0]):
                raise SaekitError(f"activations of {n!r} must be [{len(parts[0])}, {self.cfg.width(n)}] like the "
                                  f"others, got {tuple(t.shape)}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def split(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Concatenated targets `[B, d_out]` -> {target: [B, d_target]}."""
        return {t: x[:, self.part_slice(t, True)] for t in self.cfg.target_names}

    def encode(self, x: torch.Tensor | dict[str, torch.Tensor], aux: dict | None = None) -> SparseCode:
        """The code of `{source: [B, d_source]}` (or of the sources concatenated)."""
        return super().encode(self.concat(x) if isinstance(x, dict) else x, aux)

    def decode(self, values: torch.Tensor, indices: torch.Tensor, aux: dict | None = None) -> dict[str, torch.Tensor]:
        """{target: reconstruction [B, d_target]}; `decode_concat` gives them side by side."""
        return self.split(self.decode_concat(values, indices, aux))

    def forward(self, x: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.decode(*self.encode(x))

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> "Crosscoder":
        cc = super().from_tensors(cfg, tensors, where)
        cc._name_columns()
        return cc


# omitted from cfg.json when unset
_OPTIONAL = ("matryoshka_groups", "sources", "targets", "dims", "part_scales", "mp_threshold")
