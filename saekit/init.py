"""SAE initialisation from a sample of (scaled) activations."""

import torch

from saekit.sae import SAE


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
def init_sae(sae: SAE, sample: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """Random unit decoder rows, tied encoder (`W_enc = W_dec`), `b_dec` = geometric median
    of `sample [n, d]`, `b_enc = 0` (Gao et al. 2024)."""
    m, d = sae.n_latents, sae.d_in
    W = torch.randn(m, d, generator=generator).to(sae.W_dec)
    sae.W_dec.copy_(W / W.norm(dim=1, keepdim=True))
    sae.W_enc.copy_(sae.W_dec)
    sae.b_enc.zero_()
    sae.b_dec.copy_(geometric_median(sample.to(sae.b_dec)))
