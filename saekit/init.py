"""Dictionary initialisation from a sample of (scaled) activations: random (tied) decoder
directions, directions inside the activations' principal subspace (Wang et al. 2025), or the
sample's own centred directions (data); b_dec (and a transcoder's b_in) at their geometric median.
A family's own tensors (JumpReLU's thresholds) start in its entry in saekit.families."""

import torch

from saekit.errors import SaekitError
from saekit.linalg import effective_dimension
from saekit.sae import SAE

INITS = ("tied", "subspace", "data")


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld iterations for the point minimising the summed distance to `points [n, d]`."""
    y = points.mean(0)
    for _ in range(iters):
        w = 1 / (points - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * points).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_new
        y = y_new
    return y


@torch.no_grad()
def subspace_basis(sample: torch.Tensor, rank: int | None = None, variance: float = 0.99) -> torch.Tensor:
    """Orthonormal basis `[d, r]` of the top principal directions of `sample [n, d]`.

    r is `rank` if given, else the smallest r holding `variance` of the variance (Wang et
    al. 2025 suggest about d/2 for attention outputs; the variance rule adapts to the data).
    """
    y = (sample - sample.mean(0)).double()
    _, s, vh = torch.linalg.svd(y, full_matrices=False)
    if rank is None:
        if not 0 < variance <= 1:
            raise SaekitError(f"subspace_variance must be in (0, 1], got {variance}")
        cum = (s.pow(2) / s.pow(2).sum()).cumsum(0)
        rank = int((cum < variance).sum()) + 1
    if not 0 < rank <= len(s):
        raise SaekitError(f"subspace_rank must be in [1, {len(s)}], got {rank}")
    return vh[:rank].T.to(sample.dtype)


def _directions(sample: torch.Tensor, m: int, init: str, generator, rank, variance, report: dict,
                centre: torch.Tensor) -> torch.Tensor:
    """`m` unit rows: random in the sample's space ("tied"), in its principal subspace ("subspace"),
    or distinct sample rows minus `centre` ("data"; rows beyond the sample's size stay random)."""
    if init == "subspace":
        P = subspace_basis(sample, rank, variance)  # [d, r]
        W = torch.randn(m, P.shape[1], generator=generator) @ P.T
        report["subspace_rank"] = P.shape[1]
    else:
        W = torch.randn(m, sample.shape[1], generator=generator)
    if init == "data":
        rows = torch.randperm(len(sample), generator=generator)[:m]
        W[: len(rows)] = sample[rows] - centre.to(sample)
        report["data_rows"] = len(rows)
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def init_sae(sae: SAE, sample: torch.Tensor, init: str = "tied", generator: torch.Generator | None = None,
             subspace_rank: int | None = None, subspace_variance: float = 0.99,
             target_sample: torch.Tensor | None = None) -> dict:
    """Initialise `sae` from `sample [n, d_in]` (its sources side by side, already in training
    units; `target_sample [n, d_out]` its targets when they differ); return a report.

    Every init: `b_dec` = geometric median of the targets, `b_enc = 0`, unit decoder rows
    (Gao et al. 2024), and an encoder tied to the decoder (`W_enc = W_dec`) when the sources
    are the targets; otherwise the encoder rows are drawn the same way in the sources' space
    and `b_in` is the geometric median of the sources that are not targets. "tied": random
    directions. "subspace": random directions inside the sample's principal subspace, so no
    latent starts outside the low-rank span the activations live in (Wang et al. 2025).
    "data": each row the direction of a distinct sample row minus the geometric median, so every
    latent starts on a direction the data takes, and the encoder scaled by the factor that best
    reconstructs the sample.
    """
    if init not in INITS:
        raise SaekitError(f"init must be one of {INITS}, got {init!r}")
    m = sae.n_latents
    sample = sample.float()
    target = sample if target_sample is None else target_sample.float()
    report = {"init": init, **effective_dimension(target)}
    median = geometric_median(target.to(sae.b_dec))
    sae.W_dec.copy_(_directions(target, m, init, generator, subspace_rank, subspace_variance, report, median))
    if sae.tied_centre:
        sae.W_enc.copy_(sae.W_dec)
    else:
        centre = geometric_median(sample) if init == "data" else None
        sae.W_enc.copy_(_directions(sample, m, init, generator, subspace_rank, subspace_variance, {}, centre))
    sae.b_enc.zero_()
    sae.b_dec.copy_(median)
    if hasattr(sae, "b_in"):
        inputs = [sample[:, sae.part_slice(s, False)] for s in sae.cfg.source_names if s not in sae.cfg.target_names]
        sae.b_in.copy_(geometric_median(torch.cat(inputs, 1).to(sae.b_in)))
    if init == "data":  # rows on data directions all fire strongly together: scale the codes by the
        # least-squares factor on the sample (TopK's choice is scale-free), else x_hat starts k times too long
        x = target.to(sae.b_dec) - median
        x_hat = sae.decode_concat(*sae.encode(sample.to(sae.b_dec))) - median
        scale = float((x * x_hat).sum() / x_hat.pow(2).sum().clamp_min(1e-12))
        sae.W_enc.mul_(max(scale, 1e-6))
        report["encoder_scale"] = scale
    return report
