"""The sparse autoencoder: TopK / BatchTopK encode, sparse decode, save and load.

Notation (one row per latent): `W_enc [m, d]`, `b_enc [m]`, `W_dec [m, d]`, `b_dec [d]`.
    pre = W_enc (x - b_dec) + b_enc;   z = ReLU(TopK(pre));   x_hat = sum_j z_j W_dec[j] + b_dec
SAEs that other tools trained (see saekit.formats) may also select with ReLU (every positive
pre-activation) or JumpReLU (every pre-activation above its latent's `threshold [m]`); saekit
trains only TopK and BatchTopK. How each architecture selects lives in one table, `SELECT`.
Codes are sparse (`values [B, k]`, `indices [B, k]`, zero values are padding), so no step
ever builds a dense [batch, m] latent tensor beyond the encoder matmul itself.
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from saekit.config import make_config
from saekit.errors import SaekitError
from saekit.formats import detect, export
from saekit.io import atomic_write
from saekit.kernels import backend, row_topk, selected_preacts, sparse_decode
from saekit.runtime import BF16_RESCORE, ENCODER_PATHS, cpu_encoder_path

ARCHITECTURES = ("topk", "batchtopk", "relu", "jumprelu")
TRAINABLE = ("topk", "batchtopk")  # relu / jumprelu SAEs are loaded for inference only
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

    def __post_init__(self):
        if self.d_in < 1:
            raise SaekitError(f"d_in must be >= 1, got {self.d_in}")
        if self.architecture not in ARCHITECTURES:
            raise SaekitError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if not 0 < self.k <= self.n_latents:
            raise SaekitError(f"k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.encoder_path not in (None, *ENCODER_PATHS):
            raise SaekitError(f"encoder_path must be one of {ENCODER_PATHS}, got {self.encoder_path!r}")


class SparseCode(NamedTuple):
    values: torch.Tensor  # [B, k'] non-negative; 0 = padding
    indices: torch.Tensor  # [B, k'] int64 latent ids


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        m, d = cfg.n_latents, cfg.d_in
        W = torch.randn(m, d, device=device, dtype=dtype)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(m, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device, dtype=dtype))
        if cfg.architecture == "jumprelu":  # per-latent thresholds on pre-activations (input units)
            self.register_buffer("threshold", torch.zeros(m, device=device, dtype=dtype))
        # BatchTopK in data-parallel training: `(candidates [b, c], k) -> cut` over the global batch.
        self.batch_cut = None
        # bf16 encoder matmul (set by the trainer on GPU); everything else stays fp32.
        self.matmul_dtype: torch.dtype | None = None

    def extra_repr(self) -> str:
        c = self.cfg
        where = f", hookpoint={c.hookpoint!r}" if c.hookpoint else ""
        return f"d_in={c.d_in}, n_latents={c.n_latents}, k={c.k}, architecture={c.architecture!r}{where}"

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
        parts = []
        for _, pre in self._preacts(xc, self.W_enc.dtype):
            above = pre > theta
            width = max(int(above.sum(1).max()), 1)
            v, i = pre.masked_fill(~above, float("-inf")).topk(width, dim=1)
            parts.append((v.masked_fill(v == float("-inf"), 0).to(self.W_enc.dtype), i))
        width = max(v.shape[1] for v, _ in parts)
        pad = lambda t: nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        return torch.cat([pad(v) for v, _ in parts]), torch.cat([pad(i) for _, i in parts])

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Sparse code of `x [B, d]`; differentiable in the parameters when grad is enabled.

        TopK keeps k per row. BatchTopK keeps k*B per batch in training mode and, in eval
        mode, every pre-activation above the learned threshold (if one is set). ReLU and
        JumpReLU keep every pre-activation above 0 / the latent's threshold. Each row's
        values come in no particular order (the top k are selected, not ranked:
        `values.sort(dim=1, descending=True)` ranks them); a zero value is padding.
        """
        x = x.to(self.W_enc.dtype)
        xc = x - self.b_dec.detach()
        vals, idx = SELECT[self.cfg.architecture](self, xc)
        if torch.is_grad_enabled():
            vals = selected_preacts(x, self.b_dec, self.W_enc, self.b_enc, idx, vals)
        return SparseCode(vals.relu(), idx)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`sum_j values[b,j] W_dec[indices[b,j]] + b_dec` -> [B, d] (gather-sum, never dense)."""
        return sparse_decode(values, indices, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of `x [B, d]`."""
        return self.decode(*self.encode(x))

    # -- units ----------------------------------------------------------------------------
    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> "SAE":
        """Make an SAE trained on `x / scale` act on raw `x`, with identical reconstructions.

        Biases and the threshold scale by `scale`; latent values come out `scale` times
        larger (in input units); the unit-norm decoder rows are unchanged.
        """
        self.b_dec.mul_(scale)
        self.b_enc.mul_(scale)
        if self.cfg.threshold is not None:
            self.cfg.threshold *= scale
        if self.cfg.architecture == "jumprelu":
            self.threshold.mul_(scale)
        return self

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    # -- files ----------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters by name, on the CPU (plus `threshold` for JumpReLU)."""
        names = _PARAMS + (("threshold",) if self.cfg.architecture == "jumprelu" else ())
        return {n: getattr(self, n).detach().contiguous().cpu() for n in names}

    def save(self, path: str | os.PathLike, extra: dict | None = None, format: str = "saekit") -> Path:
        """Write `path/cfg.json` and `path/sae.safetensors` (each atomically); `format="sae-lens"`
        writes SAELens's layout instead (cfg.json + sae_weights.safetensors, see saekit.formats)."""
        if format != "saekit":
            return export(asdict(self.cfg), self.tensors(), path, format)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        atomic_write(path / "sae.safetensors", lambda p: save_file(tensors, p))
        cfg = {**asdict(self.cfg), **({"extra": extra} if extra else {})}
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
        sae = cls.from_tensors(cfg, tensors, str(weights))
        return sae.to(device) if device is not None else sae

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, torch.Tensor], where: str) -> "SAE":
        """An SAE of `cfg` holding `tensors` (saekit's names and layout), shapes checked."""
        m, d = cfg.n_latents, cfg.d_in
        want = {"W_enc": (m, d), "b_enc": (m,), "W_dec": (m, d), "b_dec": (d,)}
        if cfg.architecture == "jumprelu":
            want["threshold"] = (m,)
        for name, shape in want.items():
            got = tuple(tensors[name].shape) if name in tensors else None
            if got != shape:
                raise SaekitError(f"{where}: {name} has shape {got}, the config says {shape}")
            if not tensors[name].is_floating_point() or tensors[name].dtype != tensors["W_enc"].dtype:
                raise SaekitError(f"{where}: {name} is {str(tensors[name].dtype).removeprefix('torch.')}, "
                                  "expected the tensors in one floating-point dtype")
        sae = cls(cfg, device="meta")
        # fresh (aligned) storage: safetensors leaves tensors at header-dependent offsets, and
        # SIMD dot products over misaligned rows round differently from the saved SAE's
        sae.load_state_dict({n: tensors[n].detach().clone() for n in want}, assign=True)
        return sae


def _select_batchtopk(sae: SAE, xc: torch.Tensor):
    if sae.training or sae.cfg.threshold is None:
        return sae.select_batch_topk(xc)[:2]
    return sae.select_threshold(xc, sae.cfg.threshold)


# How each architecture picks a row's latents from centred inputs: (values [B, k'], ids [B, k']).
SELECT = {
    "topk": lambda sae, xc: sae.select_topk(xc, sae.k),
    "batchtopk": _select_batchtopk,
    "relu": lambda sae, xc: sae.select_threshold(xc, 0.0),
    "jumprelu": lambda sae, xc: sae.select_threshold(xc, sae.threshold.detach()),
}
