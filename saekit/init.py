"""SAE initialisation from a sample of (scaled) activations: random (tied) decoder directions,
directions inside the activations' principal subspace (Wang et al. 2025), or the sample's own
centred directions (data); b_dec at their geometric median."""

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


@torch.no_grad()
def init_sae(sae: SAE, sample: torch.Tensor, init: str = "tied", generator: torch.Generator | None = None,
             subspace_rank: int | None = None, subspace_variance: float = 0.99) -> dict:
    """Initialise `sae` from `sample [n, d]` (already in training units); return a report.

    Both inits: `b_dec` = geometric median of the sample, `b_enc = 0`, tied encoder
    (`W_enc = W_dec`), unit decoder rows (Gao et al. 2024). "tied": random decoder
    directions. "subspace": random directions inside the sample's principal subspace, so
    no latent starts outside the low-rank span the activations live in (Wang et al. 2025).
    "data": each row the direction of a distinct sample row minus the geometric median, so every
    latent starts on a direction the data takes (rows beyond the sample's size stay random), and
    the encoder scaled by the factor that best reconstructs the sample.
    """
    if init not in INITS:
        raise SaekitError(f"init must be one of {INITS}, got {init!r}")
    m, d = sae.n_latents, sae.d_in
    sample = sample.float()
    report = {"init": init, **effective_dimension(sample)}
    if init == "subspace":
        P = subspace_basis(sample, subspace_rank, subspace_variance)  # [d, r]
        W = torch.randn(m, P.shape[1], generator=generator) @ P.T
        report["subspace_rank"] = P.shape[1]
    else:
        W = torch.randn(m, d, generator=generator)
    median = geometric_median(sample.to(sae.b_dec))
    if init == "data":
        rows = torch.randperm(len(sample), generator=generator)[:m]
        W[: len(rows)] = sample[rows] - median.to(sample)
        report["data_rows"] = len(rows)
    sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True).clamp_min(1e-12))
    sae.W_enc.copy_(sae.W_dec)
    sae.b_enc.zero_()
    sae.b_dec.copy_(median)
    if init == "data":  # rows on data directions all fire strongly together: scale the codes by the
        # least-squares factor on the sample (TopK's choice is scale-free), else x_hat starts k times too long
        x = sample.to(sae.b_dec) - median
        x_hat = sae.decode(*sae.encode(sample.to(sae.b_dec))) - median
        scale = float((x * x_hat).sum() / x_hat.pow(2).sum().clamp_min(1e-12))
        sae.W_enc.mul_(max(scale, 1e-6))
        report["encoder_scale"] = scale
    return report
