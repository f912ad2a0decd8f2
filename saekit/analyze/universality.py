"""How similar two dictionaries are as wholes, over paired latents (Lan et al. 2024).

SVCCA: each SAE's paired decoder rows, reduced to the principal components that keep 99 %
of their variance, then the mean canonical correlation between the two reduced sets. RSA:
Spearman correlation between the lower triangles of the two cosine-similarity matrices of
the paired rows. Each comes with a p-value from shuffled pairings (the rows of B permuted),
so "significant" means the pairing carries structure a random one does not. The two SAEs
may differ in d_in (two models).
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

from saekit.analyze.common import Result
from saekit.errors import SaekitError
from saekit.sae import SAE


@dataclass
class UniversalityResult(Result):
    n_pairs: int
    svcca: float  # mean canonical correlation of the top-PC subspaces
    svcca_p: float  # share of shuffled pairings at least as high (with the +1 correction)
    svcca_null: float  # mean over shuffles
    rsa: float  # Spearman over the lower triangle of the two similarity matrices
    rsa_p: float
    rsa_null: float
    rsa_pairs: int  # pairs used by RSA (a subsample above max_rsa_pairs)
    n_shuffles: int


def _top_pcs(x: torch.Tensor, variance: float) -> torch.Tensor:
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    keep = int((torch.cumsum(s**2, 0) / (s**2).sum() < variance).sum()) + 1
    return u[:, :keep] * s[:keep]


def _mean_cc(qx: torch.Tensor, y: torch.Tensor) -> float:
    qy = torch.linalg.qr(y - y.mean(0)).Q
    return float(torch.linalg.svdvals(qx.T @ qy).clamp(max=1).mean())


def _p(observed: float, null: list[float]) -> float:
    return (1 + sum(v >= observed for v in null)) / (1 + len(null))


def universality(a: SAE | torch.Tensor, b: SAE | torch.Tensor, b_for_a: torch.Tensor, n_shuffles: int = 100,
                 variance: float = 0.99, max_rsa_pairs: int = 2000, seed: int = 0) -> UniversalityResult:
    """SVCCA and RSA of the decoder rows paired by `b_for_a` (-1 = unpaired, skipped).
    `a`, `b` are SAEs or their decoder matrices [m, d]."""
    wa, wb = ((s.W_dec if isinstance(s, SAE) else s).detach().double().cpu() for s in (a, b))
    if len(b_for_a) != len(wa):
        raise SaekitError(f"b_for_a has {len(b_for_a)} entries but A has {len(wa)} latents")
    ok = b_for_a >= 0
    x, y = wa[ok], wb[b_for_a[ok]]
    n = len(x)
    if n < 3:
        raise SaekitError(f"universality needs at least 3 paired latents, got {n}")
    g = torch.Generator().manual_seed(seed)
    px, py = _top_pcs(x, variance), _top_pcs(y, variance)
    qx = torch.linalg.qr(px - px.mean(0)).Q
    svcca = _mean_cc(qx, py)
    svcca_null = [_mean_cc(qx, py[torch.randperm(n, generator=g)]) for _ in range(n_shuffles)]

    sub = torch.randperm(n, generator=g)[:max_rsa_pairs] if n > max_rsa_pairs else torch.arange(n)
    ca, cb = (torch.nn.functional.normalize(v[sub], dim=1) for v in (x, y))
    tri = torch.tril_indices(len(sub), len(sub), -1)
    # Spearman = Pearson of ranks; a shuffle permutes B's rank matrix, so rank once.
    ra = rankdata((ca @ ca.T)[tri[0], tri[1]].numpy())
    rb_flat = rankdata((cb @ cb.T)[tri[0], tri[1]].numpy())
    rb = np.zeros((len(sub), len(sub)))
    rb[tri[0], tri[1]] = rb_flat
    rb = rb + rb.T
    za = (ra - ra.mean()) / ra.std()

    def rsa_of(order: np.ndarray) -> float:
        v = rb[order[tri[0]], order[tri[1]]]
        return float(za @ ((v - v.mean()) / v.std()) / len(v))

    rng = np.random.default_rng(seed)
    rsa = rsa_of(np.arange(len(sub)))
    rsa_null = [rsa_of(rng.permutation(len(sub))) for _ in range(n_shuffles)]
    mean = lambda v: float(np.mean(v)) if v else math.nan  # noqa: E731
    return UniversalityResult(n, svcca, _p(svcca, svcca_null), mean(svcca_null), rsa, _p(rsa, rsa_null),
                              mean(rsa_null), len(sub), n_shuffles)
