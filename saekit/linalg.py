"""Spectral helpers shared by initialisation, collapse and geometry: effective rank and the
share of directions that hold a given share of the variance."""

import torch


def entropy_rank(s: torch.Tensor) -> float:
    """Effective rank exp(H(p)), p = s / sum s, of non-negative values `s` (singular values)."""
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


@torch.no_grad()
def effective_dimension(sample: torch.Tensor, center: bool = True) -> dict:
    """Spectrum summary of `[n, d]` rows (centred activations, or a decoder with center=False):
    the share of the d directions needed for 90 % and 99 % of the variance, and the
    effective rank exp(H(sigma / sum sigma))."""
    x = sample - sample.mean(0) if center else sample
    if x.shape[0] > x.shape[1]:  # singular values from the d x d Gram matrix: ~2x faster than an SVD of the rows
        x = x.double()
        s = torch.linalg.eigvalsh(x.T @ x).flip(0).clamp_min(0).sqrt()
    else:
        s = torch.linalg.svdvals(x.double())
    cum = (s.pow(2) / s.pow(2).sum()).cumsum(0)
    d = sample.shape[1]
    dims_90, dims_99 = int((cum < 0.90).sum()) + 1, int((cum < 0.99).sum()) + 1
    return {"d": d, "dims_90": dims_90, "dims_99": dims_99, "share_90": dims_90 / d, "share_99": dims_99 / d,
            "effective_rank": entropy_rank(s)}
