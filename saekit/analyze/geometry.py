"""Feature geometry of an SAE dictionary, after Li, Michaud, Tegmark et al. 2024 ("The Geometry of
Concepts") and Engels et al. 2024 ("Not All Language Model Features Are Linear").

- `geometry(sae)` (decoder rows only): the "galaxy" power law of the decoder rows' covariance
  spectrum and the k-NN clustering entropy of the point cloud.
- `lobes(sae, acts)`: co-occurrence lobes (spectral clustering of the phi coefficient of latents
  firing in the same chunk of tokens) against geometric lobes (spectral clustering of the decoder
  rows' angular similarity), compared by adjusted mutual information and a shuffled-label null.
- `crystals(sae)`: parallelogram / trapezoid quadruples `a - b ~ c - d` among decoder rows.
- `multidim_features(sae, acts)`: clusters of nearby decoder rows whose reconstructions span an
  irreducible (not mixture, not separable) 2-D shape, e.g. a circle.
- `circularity(points)`: whether points standing for items in a cyclic order (days, months) lie on
  a circle in that order in some plane of their top principal components, against relabellings.
- `geometry_bundle(sae, acts)`: all of the above in one pass over the activations, as one dict.

Codes come from `sae.encode` (sparse `(values, indices)` pairs); no dense `[tokens, latents]`
matrix is built. The analyses that need activations also take precomputed codes (`codes=`, an
iterable of `(values, indices)` batches, e.g. `saekit.codes.encode_all`), so one encoding can serve
several of them.
"""

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.special import digamma

from saekit.analyze.common import Activations, Result
from saekit.codes import encode_batches
from saekit.errors import SaekitError
from saekit.sae import SAE

Codes = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (values [B, k], indices [B, k]) batches: `saekit.codes.Codes`


# -- shared helpers -----------------------------------------------------------------------
def _code_stream(sae: SAE, activations: Activations | None, codes: Codes | None, max_tokens: int | None,
                 batch_size: int):
    if (activations is None) == (codes is None):
        raise SaekitError("pass either activations or codes (precomputed sparse codes), not both or neither")
    if codes is not None:
        return ((v.float().cpu(), i.long().cpu()) for v, i in codes)
    return encode_batches(sae, activations, max_tokens, batch_size)


def _feed(stream, consumers) -> int:
    """Give every batch of codes to every consumer; returns the number of tokens."""
    n = 0
    for vals, idx in stream:
        if vals.shape != idx.shape or vals.ndim != 2:
            raise SaekitError(f"codes must be (values, indices) pairs of equal [B, k] shape, got "
                              f"{tuple(vals.shape)} and {tuple(idx.shape)}")
        for c in consumers:
            c.update(vals, idx)
        n += len(vals)
    if n == 0:
        raise SaekitError("no activations to analyse (the activations are empty)")
    return n


def _one_blas_thread():
    """Small dense eigendecompositions run single-threaded: multi-threaded LAPACK synchronises
    hundreds of times per call and, on a busy machine, waits seconds for descheduled threads
    (measured: a 576 x 576 eigvalsh took 3 s with 2 threads on a loaded 2-core box, 0.05 s alone)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def _unit_rows(W: torch.Tensor) -> torch.Tensor:
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def top_neighbours(W: torch.Tensor, k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's `k` highest cosines to the other rows of `W [m, d]` and their row ids ([m, k]
    each, descending), found blockwise (memory O(block * m))."""
    Wn = _unit_rows(W.float())
    m = len(Wn)
    k = min(k, m - 1)
    sims = torch.empty(m, k)
    ids = torch.empty(m, k, dtype=torch.long)
    for s in range(0, m, block):
        S = Wn[s : s + block] @ Wn.T
        r = torch.arange(len(S))
        S[r, r + s] = -math.inf
        sims[s : s + block], ids[s : s + block] = S.topk(k, dim=1)
    return sims, ids


def _spectral(affinity: np.ndarray, n_clusters: int, seed: int) -> np.ndarray:
    """Spectral clustering of a precomputed non-negative affinity matrix (scikit-learn)."""
    from sklearn.cluster import SpectralClustering

    n = len(affinity)
    if n <= n_clusters:
        return np.arange(n)
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected" on sparse data
        sc = SpectralClustering(n_clusters=n_clusters, affinity="precomputed", random_state=seed,
                                assign_labels="kmeans", n_init=10)
        return sc.fit_predict(affinity.astype(np.float64))


# -- galaxy: power law and clustering entropy ---------------------------------------------
@dataclass
class GeometryResult(Result):
    n_latents: int
    d_in: int
    eigenvalues: torch.Tensor  # [d_in] covariance eigenvalues of the decoder rows, descending
    rank_window: tuple[int, int]  # ranks (1-based, inclusive) the power law was fitted over
    power_law_alpha: float  # log10 lambda = -alpha log10 rank + intercept over rank_window
    power_law_ci: tuple[float, float]  # 95 % CI from the regression's standard error (t quantile)
    power_law_intercept: float
    power_law_r2: float
    # the same fit on Ledoit-Wolf (2020) nonlinearly shrunk eigenvalues, which removes most of
    # the Marchenko-Pastur spread a finite cloud adds (an isotropic cloud gives ~0 here)
    power_law_alpha_shrunk: float
    clustering: float  # H_null - H: > 0 when the cloud is clumpier than a Gaussian of its spectrum
    clustering_ci: tuple[float, float]  # 95 % bootstrap percentile interval
    clustering_raw: float  # H_gauss - H exactly as the spec writes it (estimator bias included)
    entropy: float  # H, the k-NN entropy estimate
    entropy_gauss: float  # H_gauss, the Gaussian entropy of the PCA spectrum
    entropy_null: float  # H of a Gaussian sample with the same spectrum, same n and d
    clustering_rows: int  # rows in the entropy estimate (subsample)
    clustering_dims: int  # PCA dimensions


def shrunk_eigenvalues(lam: np.ndarray, n: int) -> np.ndarray:
    """Ledoit & Wolf (2020) analytical nonlinear shrinkage of sample covariance eigenvalues
    `lam` (from `n` effective samples, p = len(lam) <= n): each eigenvalue's estimate of the true
    variance along its sample eigenvector, via an Epanechnikov kernel density of the spectrum and
    its Hilbert transform. Returned in the order of `lam`. Zero eigenvalues stay zero."""
    lam = np.asarray(lam, dtype=np.float64)
    order = np.argsort(lam)
    ls = np.clip(lam[order], 0, None)
    pos = ls > ls.max() * 1e-12
    out = np.zeros_like(ls)
    lp = ls[pos]
    p = len(lp)
    if p == 0:
        return out[np.argsort(order)]
    c = min(p / n, 1.0 - 1e-9)
    h = n ** (-1 / 3)
    H = h * lp[None, :]  # [p, p] local bandwidths
    x = (lp[:, None] - lp[None, :]) / H
    f = (3 / 4 / math.sqrt(5)) * np.mean(np.maximum(1 - x**2 / 5, 0) / H, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        hf = (-3 / 10 / math.pi) * x + (3 / 4 / math.sqrt(5) / math.pi) * (1 - x**2 / 5) * np.log(
            np.abs((math.sqrt(5) - x) / (math.sqrt(5) + x)))
    edge = ~np.isfinite(hf)
    hf[edge] = ((-3 / 10 / math.pi) * x)[edge]
    hf = np.mean(hf / H, axis=1)
    out[pos] = lp / ((math.pi * c * lp * f) ** 2 + (1 - c - math.pi * c * lp * hf) ** 2)
    return out[np.argsort(order)]


def _power_law(lam: np.ndarray, lo: int, hi: int):
    r = np.arange(lo, hi + 1)
    y = lam[r - 1]
    if (y <= 0).any():
        r, y = r[y > 0], y[y > 0]
    if len(r) < 3:
        raise SaekitError(f"too few positive eigenvalues in ranks {lo}..{hi} to fit a power law")
    return stats.linregress(np.log10(r), np.log10(y)), len(r)


def _knn_log_terms(Y: np.ndarray, k: int, eps: float = 1e-2) -> np.ndarray:
    """d * log(rho_i + eps) per point, rho_i = distance to its k-th nearest other point."""
    from sklearn.neighbors import NearestNeighbors

    rho = NearestNeighbors(n_neighbors=k + 1).fit(Y).kneighbors(Y)[0][:, k]
    return Y.shape[1] * np.log(rho + eps)


@torch.no_grad()
def geometry(sae: SAE, rank_window: tuple[int, int] = (10, 150), max_rows: int = 5000, pca_dims: int = 100,
             k: int = 1, n_boot: int = 200, seed: int = 0, latents: torch.Tensor | None = None) -> GeometryResult:
    """Galaxy-scale shape of the decoder rows (no data); `latents` (indices) restricts it to those
    rows, e.g. the living ones (dead rows keep their random start or collapse onto each other).

    Power law: eigenvalues of the covariance of the rows, descending; `scipy.stats.linregress`
    of log10 lambda on log10 rank over `rank_window` (1-based, inclusive, clipped to the ranks
    that exist); alpha = -slope; the 95 % CI is slope +- t(0.975, n - 2) * stderr, which covers
    the fit's residuals only, not the finite-sample spread of the eigenvalues. A cloud of m rows
    in d dimensions shows a slope even when isotropic (Marchenko-Pastur; about 0.13 for
    m = 8192, d = 256), so `power_law_alpha_shrunk` repeats the fit on shrunk eigenvalues.

    Clustering (Li et al.): `max_rows` rows (seeded subsample), each column standardised, PCA to
    d = min(pca_dims, ...) dimensions with variances lambda_1..d; rho_i = distance to the k-th
    nearest neighbour;
        H = d * mean log(rho + 1e-2) + mean log lambda + log(n - 1) - psi(k),
        H_gauss = d/2 (1 + ln 2 pi) + 1/2 sum ln lambda,  clustering_raw = H_gauss - H.
    The k-NN estimate is strongly biased in 100 dimensions (and the formula has no unit-ball
    volume term), so `clustering_raw` is far from 0 even for a Gaussian cloud. The reported
    `clustering` replaces H_gauss by the same estimator's H on a Gaussian sample with the same
    spectrum, n and d (the bias and constants cancel): clustering = H_null - H, which is ~0 for
    a Gaussian cloud and > 0 for a clumpy one. Its CI: `n_boot` bootstrap resamples of the
    per-point terms d log(rho_i + 1e-2) of both samples (neighbours are not recomputed, so no
    duplicated point gets a zero distance), 2.5 and 97.5 percentiles.
    """
    W = sae.W_dec.detach().double().cpu()
    if latents is not None:
        W = W[torch.as_tensor(latents, dtype=torch.long).cpu()]
    m, d = W.shape
    if m < 4:
        raise SaekitError(f"geometry needs at least 4 decoder rows, got {m}")
    cov = torch.cov(W.T).numpy()
    with _one_blas_thread():
        lam = np.clip(np.linalg.eigvalsh(cov)[::-1], 0, None).copy()
    lo, hi = max(1, int(rank_window[0])), min(int(rank_window[1]), d)
    if hi - lo < 2:
        lo, hi = 1, d
    fit, n_fit = _power_law(lam, lo, hi)
    t = stats.t.ppf(0.975, max(n_fit - 2, 1))
    alpha = -fit.slope
    shrunk = shrunk_eigenvalues(lam, m - 1)
    fit_s, _ = _power_law(shrunk, lo, hi)

    # clustering entropy; PCA from the eigendecomposition of the d x d covariance (no n x n SVD)
    rng = np.random.default_rng(seed)
    n = min(m, max_rows)
    rows = np.sort(rng.choice(m, n, replace=False)) if n < m else np.arange(m)
    X = W[torch.from_numpy(rows)]
    sd = X.std(0)
    X = (X - X.mean(0)) / torch.where(sd > 0, sd, 1)
    with _one_blas_thread():
        ev, V = np.linalg.eigh((X.T @ X / (n - 1)).numpy())
    dims = min(pca_dims, n - 1, d)
    ev, V = ev[::-1][:dims], V[:, ::-1][:, :dims]
    keep = ev > ev[0] * 1e-10
    Y = X.numpy() @ V[:, keep]
    ev = ev[keep]
    dd = Y.shape[1]
    t_data = _knn_log_terms(Y, k)
    t_null = _knn_log_terms(rng.standard_normal((n, dd)) * np.sqrt(ev), k)
    const = np.mean(np.log(ev)) + math.log(n - 1) - digamma(k)
    H, H_null = t_data.mean() + const, t_null.mean() + const
    H_gauss = dd / 2 * (1 + math.log(2 * math.pi)) + 0.5 * np.log(ev).sum()
    boot = [t_null[rng.integers(0, n, n)].mean() - t_data[rng.integers(0, n, n)].mean() for _ in range(n_boot)]
    ci = tuple(float(v) for v in np.percentile(boot, [2.5, 97.5])) if n_boot else (math.nan, math.nan)
    return GeometryResult(
        n_latents=m, d_in=d, eigenvalues=torch.from_numpy(lam).float(), rank_window=(lo, hi),
        power_law_alpha=float(alpha), power_law_ci=(float(alpha - t * fit.stderr), float(alpha + t * fit.stderr)),
        power_law_intercept=float(fit.intercept), power_law_r2=float(fit.rvalue**2),
        power_law_alpha_shrunk=float(-fit_s.slope),
        clustering=float(H_null - H), clustering_ci=ci, clustering_raw=float(H_gauss - H), entropy=float(H),
        entropy_gauss=float(H_gauss), entropy_null=float(H_null), clustering_rows=n, clustering_dims=dd,
    )


# -- lobes ---------------------------------------------------------------------------------
@dataclass
class LobesResult(Result):
    n_tokens: int
    n_chunks: int  # full chunks used (a trailing partial chunk is dropped)
    chunk: int
    threshold: float
    n_lobes: int
    labels: torch.Tensor  # [m] co-occurrence lobe of each latent, -1 if it never fired
    geometric_labels: torch.Tensor  # [m] decoder angular-similarity lobe, -1 if it never fired
    lobe_sizes: list[int]
    geometric_lobe_sizes: list[int]
    n_fired: int
    n_clustered: int  # latents in the spectral clustering; the other fired ones join by affinity
    ami: float  # adjusted mutual information of the two labelings over the fired latents
    null_mean: float  # AMI against shuffled geometric labels
    null_std: float
    z_score: float | None  # (ami - null_mean) / null_std


class _ChunkOccurrence:
    """Which latents fire (value > threshold) in which chunk of `chunk` consecutive tokens, as
    (chunk, latent) pairs in chunk order. Each batch marks a small dense [chunks in batch, m]
    boolean grid (no sort-based unique); a chunk that straddles two batches may list a latent
    twice, which the dense blocks of `_lobes_finish` absorb."""

    def __init__(self, m: int, chunk: int, threshold: float):
        self.m, self.chunk, self.threshold = m, chunk, threshold
        self.n = 0
        self.ch: list[torch.Tensor] = []
        self.lat: list[torch.Tensor] = []

    def update(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        B = len(vals)
        first = self.n // self.chunk
        local = (torch.arange(self.n, self.n + B) // self.chunk - first)[:, None]
        on = torch.zeros((self.n + B - 1) // self.chunk - first + 1 if B else 0, self.m + 1, dtype=torch.bool)
        on[local, torch.where(vals > self.threshold, idx, self.m)] = True  # column m: below threshold
        c, lat = on[:, : self.m].nonzero(as_tuple=True)
        self.ch.append((c + first).int())
        self.lat.append(lat.int())
        self.n += B

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        n_chunks = self.n // self.chunk
        if n_chunks < 2:
            raise SaekitError(f"lobes need at least 2 chunks of {self.chunk} tokens, got {self.n} tokens; "
                              "pass more activations or a smaller chunk")
        ch, lat = torch.cat(self.ch), torch.cat(self.lat)
        keep = ch < n_chunks  # drop the trailing partial chunk
        return ch[keep], lat[keep], n_chunks


def _extend(aff_rows: torch.Tensor, labels_s: np.ndarray, n_lobes: int) -> np.ndarray:
    """Label rows by the highest mean affinity to each lobe's clustered members."""
    onehot = torch.zeros(len(labels_s), n_lobes, dtype=aff_rows.dtype)
    onehot[torch.arange(len(labels_s)), torch.from_numpy(labels_s).long()] = 1
    mean = (aff_rows @ onehot) / onehot.sum(0).clamp_min(1)
    return mean.argmax(1).numpy()


def _lobes_finish(sae: SAE, occ: _ChunkOccurrence, n_lobes: int, max_latents: int, n_null: int, seed: int,
                  block: int = 1024) -> LobesResult:
    from sklearn.metrics import adjusted_mutual_info_score

    m = sae.n_latents
    ch, lat, N = occ.finish()
    fired = (torch.bincount(lat.long(), minlength=m) > 0).nonzero().squeeze(1)
    L = len(fired)
    if L < n_lobes + 1:
        raise SaekitError(f"only {L} latents fired over the activations; lobes need more than n_lobes={n_lobes}")
    pos = torch.full((m,), -1, dtype=torch.long)
    pos[fired] = torch.arange(L)
    g = torch.Generator().manual_seed(seed)
    S = torch.randperm(L, generator=g)[:max_latents].sort().values if L > max_latents else torch.arange(L)
    # co-occurrence counts C[i, j] = chunks where fired latent i and sampled latent j both fire,
    # and counts[i] = chunks where latent i fires, from dense 0/1 blocks of chunks
    C = torch.zeros(L, len(S))
    counts = torch.zeros(L, dtype=torch.float64)
    col = pos[lat.long()]
    for c0 in range(0, N, block):
        a, b = torch.searchsorted(ch, torch.tensor([c0, c0 + block], dtype=ch.dtype)).tolist()
        on = torch.zeros(min(block, N - c0), L)  # [chunks, fired latents] 0/1
        on[ch[a:b].long() - c0, col[a:b]] = 1
        counts += on.sum(0)
        C.addmm_(on.T, on[:, S])
    # phi = (N n11 - n1 n2) / sqrt(n1 (N - n1) n2 (N - n2)); NaN (a latent on in every chunk) -> 0;
    # computed in place, row block by row block, into the affinity phi + 1 [L, |S|]
    # (in float64: N n11 and n1 n2 are large and close)
    cnt = counts
    spread = (cnt * (N - cnt)).sqrt()
    aff = C
    for r in range(0, L, 2048):
        blk = aff[r : r + 2048].double().mul_(N).sub_(cnt[r : r + 2048, None] * cnt[S][None, :])
        blk.div_(spread[r : r + 2048, None] * spread[S][None, :])
        aff[r : r + 2048] = blk.nan_to_num_(0.0, 0.0, 0.0).add_(1.0)
    del C, blk
    lab_c = np.full(L, -1)
    lab_c_s = _spectral(aff[S].numpy(), n_lobes, seed)
    lab_c[:] = _extend(aff, lab_c_s, n_lobes)
    lab_c[S.numpy()] = lab_c_s
    # geometric lobes: angular similarity 1 - arccos(cos) / pi of the decoder rows
    Wn = _unit_rows(sae.W_dec.detach().float().cpu()[fired])
    ang = lambda A, B: 1 - torch.arccos((A @ B.T).clamp(-1, 1)) / math.pi  # noqa: E731
    lab_g_s = _spectral(ang(Wn[S], Wn[S]).numpy(), n_lobes, seed)
    lab_g = np.concatenate([_extend(ang(Wn[s : s + 4096], Wn[S]), lab_g_s, n_lobes) for s in range(0, L, 4096)])
    lab_g[S.numpy()] = lab_g_s
    ami = float(adjusted_mutual_info_score(lab_c, lab_g))
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_mutual_info_score(lab_c, rng.permutation(lab_g)) for _ in range(n_null)])
    sd = float(null.std()) if n_null > 1 else math.nan
    labels = torch.full((m,), -1, dtype=torch.long)
    labels[fired] = torch.from_numpy(lab_c).long()
    glabels = torch.full((m,), -1, dtype=torch.long)
    glabels[fired] = torch.from_numpy(lab_g).long()
    return LobesResult(
        n_tokens=occ.n, n_chunks=N, chunk=occ.chunk, threshold=occ.threshold, n_lobes=n_lobes, labels=labels,
        geometric_labels=glabels, lobe_sizes=np.bincount(lab_c, minlength=n_lobes).tolist(),
        geometric_lobe_sizes=np.bincount(lab_g, minlength=n_lobes).tolist(), n_fired=L, n_clustered=len(S),
        ami=ami, null_mean=float(null.mean()) if n_null else math.nan, null_std=sd,
        z_score=(ami - float(null.mean())) / sd if sd > 0 else None,
    )


def lobes(sae: SAE, acts: Activations | None = None, n_lobes: int = 3, chunk: int = 256, threshold: float = 0.0,
          max_tokens: int | None = None, seed: int = 0, max_latents: int = 2048, n_null: int = 100,
          batch_size: int = 4096, codes: Codes | None = None) -> LobesResult:
    """Co-occurrence lobes versus geometric lobes (Li et al.).

    Tokens are cut into chunks of `chunk` consecutive tokens (in stream order; a trailing
    partial chunk is dropped); a latent is on in a chunk if its value exceeds `threshold` on any
    of its tokens. Over the latents that fired, affinity = phi coefficient of the on/off vectors
    + 1 (NaN -> phi 0), split into `n_lobes` by spectral clustering (`affinity="precomputed"`).
    Geometric lobes: the same clustering of the decoder rows' angular similarity
    1 - arccos(cos)/pi. When more than `max_latents` latents fired, both clusterings run on a
    seeded random `max_latents` of them and every other fired latent joins the lobe to whose
    clustered members its mean affinity is highest (spectral clustering of a dense affinity costs
    O(n^3) time and O(n^2) memory: 2048 latents take ~1 s, 16k would take GBs and many minutes).
    Memory: the [fired, max_latents] float32 affinity (134 MB for 16k x 2048) and the unique
    (chunk, latent) pairs. `ami` is their adjusted mutual information over all fired latents; the
    null shuffles the geometric labels `n_null` times. A latent on in every chunk has phi NaN,
    i.e. a neutral affinity 1 to all others (affinity 0 would cut it off as its own lobe).
    """
    stream = _code_stream(sae, acts, codes, max_tokens, batch_size)
    occ = _ChunkOccurrence(sae.n_latents, chunk, threshold)
    _feed(stream, [occ])
    return _lobes_finish(sae, occ, n_lobes, max_latents, n_null, seed)


# -- crystals ------------------------------------------------------------------------------
@torch.no_grad()
def crystals(sae: SAE, n: int = 50, knn: int = 5, max_diffs: int = 16_384, per_diff: int = 5,
             parallelogram_ratio: float = 0.8, min_side_ratio: float = 0.25, min_cos: float = 0.5,
             block: int = 1024) -> pd.DataFrame:
    """Parallelogram and trapezoid quadruples among the decoder rows: a - b ~ c - d.

    Search: each latent's `knn` nearest rows by cosine give candidate sides (a, b) (related
    features sit close together); the `max_diffs` closest of those pairs are kept, their
    difference vectors a - b normalised, and each is compared (blockwise matmul) with every
    other by |cosine|, skipping pairs that share a latent; each side keeps its `per_diff` best
    partners. A negative cosine swaps c and d. A quadruple is dropped when its other sides are
    degenerate: |a - c| < `min_side_ratio` * max(|a - b|, |c - d|) (near-duplicate rows make
    thin, trivial parallelograms). Columns: cos = cosine of a - b and c - d, length_ratio =
    shorter / longer of the two, kind = "parallelogram" when length_ratio >= `parallelogram_ratio`
    else "trapezoid", score = cos - 0.1 (1 - length_ratio) (parallelism first; equal lengths
    break near-ties). The same four latents are reported once. Best `n` first.
    """
    W = sae.W_dec.detach().float().cpu()
    m = len(W)
    cols = ["a", "b", "c", "d", "cos", "length_ratio", "side_ratio", "kind", "score"]
    if m < 4:
        return pd.DataFrame(columns=cols)
    sims, nb = top_neighbours(W, knn, block)
    a = torch.arange(m).repeat_interleave(nb.shape[1])
    b = nb.flatten()
    s = sims.flatten()
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    key, inv = torch.unique(lo * m + hi, return_inverse=True)
    best = torch.full((len(key),), -math.inf).scatter_reduce(0, inv, s, "amax")
    keep = best.topk(min(max_diffs, len(key))).indices
    A, B = (key[keep] // m), (key[keep] % m)
    D = W[A] - W[B]
    length = D.norm(dim=1)
    ok = length > 1e-8
    A, B, D, length = A[ok], B[ok], D[ok], length[ok]
    U = D / length[:, None]
    P = len(U)
    if P < 2:
        return pd.DataFrame(columns=cols)
    per = min(per_diff, P - 1)
    rows, partners, coss = [], [], []
    for s0 in range(0, P, block):
        S = U[s0 : s0 + block] @ U.T  # [blk, P]
        Sa = S.abs()
        ra, rb = A[s0 : s0 + block, None], B[s0 : s0 + block, None]
        shared = (ra == A[None]) | (ra == B[None]) | (rb == A[None]) | (rb == B[None])
        Sa[shared] = -1
        v, j = Sa.topk(per, dim=1)
        i = torch.arange(s0, s0 + len(S))[:, None].expand_as(j)
        good = v >= min_cos
        rows.append(i[good])
        partners.append(j[good])
        coss.append(S.gather(1, j)[good])
    i, j, c = torch.cat(rows), torch.cat(partners), torch.cat(coss)  # (i, j) and (j, i): deduplicated below
    qa, qb = A[i], B[i]
    qc = torch.where(c >= 0, A[j], B[j])
    qd = torch.where(c >= 0, B[j], A[j])
    la, lb = length[i], length[j]
    ratio = torch.minimum(la, lb) / torch.maximum(la, lb)
    side = (W[qa] - W[qc]).norm(dim=1) / torch.maximum(la, lb)
    df = pd.DataFrame({"a": qa.numpy(), "b": qb.numpy(), "c": qc.numpy(), "d": qd.numpy(),
                       "cos": c.abs().numpy().astype(float), "length_ratio": ratio.numpy().astype(float),
                       "side_ratio": side.numpy().astype(float)})
    df = df[df.side_ratio >= min_side_ratio]
    df["kind"] = np.where(df.length_ratio >= parallelogram_ratio, "parallelogram", "trapezoid")
    df["score"] = df.cos - 0.1 * (1 - df.length_ratio)
    df = df.sort_values("score", ascending=False, kind="stable")
    quad = pd.DataFrame(np.sort(df[["a", "b", "c", "d"]].to_numpy(), axis=1))
    df = df[~quad.duplicated().to_numpy()]
    return df.head(n).reset_index(drop=True)[cols]


# -- multi-dimensional features ------------------------------------------------------------
def find_clusters(W: torch.Tensor, cos_threshold: float = 0.5, neighbours: int = 2, max_size: int = 64,
                  max_clusters: int = 1000, seed: int = 0) -> list[list[int]]:
    """Groups of nearby decoder rows: the graph joining each row to its `neighbours` most similar
    rows when their cosine exceeds `cos_threshold`, its connected components of >= 2 rows
    (`scipy.sparse.csgraph.connected_components`). A component larger than `max_size` is split by
    k-means on the unit rows (into ceil(2 size / max_size) parts, repeated until each part fits).
    Largest first, at most `max_clusters`."""
    from sklearn.cluster import KMeans

    m = len(W)
    if m < 2:
        return []
    sims, nb = top_neighbours(W, neighbours)
    keep = sims > cos_threshold
    src = torch.arange(m)[:, None].expand_as(nb)[keep].numpy()
    graph = coo_matrix((np.ones(len(src)), (src, nb[keep].numpy())), shape=(m, m))
    _, comp = connected_components(graph, directed=False)
    sizes = np.bincount(comp)
    groups = [np.flatnonzero(comp == c) for c in np.flatnonzero(sizes >= 2)]
    Wn = _unit_rows(W.detach().float().cpu()).numpy()
    out = []
    while groups:
        g = groups.pop()
        if len(g) <= max_size:
            out.append(sorted(g.tolist()))
            continue
        parts = math.ceil(2 * len(g) / max_size)
        lab = KMeans(n_clusters=parts, n_init=3, random_state=seed).fit_predict(Wn[g])
        split = [g[lab == c] for c in range(parts)]
        if max(len(p) for p in split) == len(g):  # k-means could not split (identical rows)
            split = np.array_split(g, parts)
        groups += [p for p in split if len(p) >= 2]
    out.sort(key=lambda c: (-len(c), c[0]))
    return out[:max_clusters]


class _ClusterCodes:
    """Each cluster's codes `[tokens, |cluster|]` on the first `max_points` tokens where any of
    its latents is active (value > 0)."""

    def __init__(self, clusters: list[list[int]], m: int, max_points: int):
        self.clusters, self.max_points = clusters, max_points
        self.cid = torch.full((m,), -1, dtype=torch.long)
        self.pos = torch.zeros(m, dtype=torch.long)
        for c, ids in enumerate(clusters):
            if (self.cid[ids] >= 0).any():
                raise SaekitError(f"cluster {c} shares latents with an earlier cluster; clusters must be disjoint")
            self.cid[ids] = c
            self.pos[ids] = torch.arange(len(ids))
        self.width = max((len(c) for c in clusters), default=1)
        self.parts: list[list[torch.Tensor]] = [[] for _ in clusters]
        self.count = [0] * len(clusters)
        self.n_open = len(clusters)
        self.open_cid = self.cid.clone()  # -1 also for clusters that have their max_points

    def update(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        if self.n_open == 0:
            return
        B = len(vals)
        c = self.open_cid[idx]
        b, j = ((c >= 0) & (vals > 0)).nonzero(as_tuple=True)
        if not len(b):
            return
        c, lat = c[b, j], idx[b, j]
        uk, inv = torch.unique(c * B + b, return_inverse=True)  # (cluster, token), cluster-major
        Z = torch.zeros(len(uk), self.width)
        Z[inv, self.pos[lat]] = vals[b, j].float()
        uc, cnt = torch.unique_consecutive(uk // B, return_counts=True)
        for ci, Zc in zip(uc.tolist(), Z.split(cnt.tolist()), strict=True):
            room = self.max_points - self.count[ci]
            self.parts[ci].append(Zc[:room, : len(self.clusters[ci])].clone())  # not a view that keeps Z
            self.count[ci] += min(room, len(Zc))
            if self.count[ci] >= self.max_points:  # full: its latents are no longer looked at
                self.n_open -= 1
                self.open_cid[self.clusters[ci]] = -1


def mixture_index(P: np.ndarray, eps: float = 0.1, n_angles: int = 90) -> float:
    """Engels et al.'s epsilon-mixture index of 2-D points `P [n, 2]`:
        M_eps = max over unit v = (cos phi, sin phi) and offsets c of  P(|<x, v> / sigma_v - c| < eps),
    sigma_v = std of <x, v> (phi on a grid of `n_angles` over [0, pi)): the largest share of
    points within eps standard deviations of one line. Points of a mixture of lower-dimensional
    features (one of them off) gather on such lines; a circle spreads over any band."""
    phi = np.linspace(0, np.pi, n_angles, endpoint=False)
    S = P @ np.stack([np.cos(phi), np.sin(phi)])  # [n, A]
    sd = S.std(0)
    S = np.sort(S / np.where(sd > 0, sd, 1), axis=0)
    span = S.max() - S.min() + 4 * eps + 1
    flat = (S + np.arange(n_angles) * span).T.ravel()  # each column's values, columns far apart
    hi = np.searchsorted(flat, flat + 2 * eps, side="left")
    return float((hi - np.arange(len(flat))).max() / len(P))


def separability_index(P: np.ndarray, bins: int = 10, n_angles: int = 45, bias_correct: bool = True) -> float:
    """Engels et al.'s separability index of 2-D points `P [n, 2]`: the minimum over rotations
    theta (grid of `n_angles` over [0, pi/2)) of the mutual information (nats) between the two
    rotated coordinates, estimated from a `bins` x `bins` histogram over their ranges. Near 0 when
    some rotation makes the coordinates independent (two separable features); a circle is
    dependent at every angle. With `bias_correct` the histogram estimate's first-order
    (Miller-Madow) bias (bins - 1)^2 / (2 n) is subtracted, floored at 0, so that clusters seen
    on few tokens do not look dependent by chance."""
    th = np.linspace(0, np.pi / 2, n_angles, endpoint=False)
    a = P[:, :1] * np.cos(th) + P[:, 1:] * np.sin(th)  # [n, T]
    b = -P[:, :1] * np.sin(th) + P[:, 1:] * np.cos(th)

    def binned(v):
        lo, hi = v.min(0), v.max(0)
        return np.clip(((v - lo) / np.where(hi > lo, hi - lo, 1) * bins).astype(int), 0, bins - 1)

    joint = np.bincount((np.arange(len(th)) * bins * bins + binned(a) * bins + binned(b)).ravel(),
                        minlength=len(th) * bins * bins).reshape(len(th), bins, bins) / len(P)
    pa, pb = joint.sum(2, keepdims=True), joint.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        mi = np.where(joint > 0, joint * np.log(joint / (pa * pb)), 0).sum((1, 2))
    mi = mi.min()
    return float(max(mi - (bins - 1) ** 2 / (2 * len(P)), 0.0) if bias_correct else mi)


def _cluster_shape(Z: torch.Tensor, Wc: torch.Tensor, n_pcs: int, eps: float, bins: int):
    """PCA (<= n_pcs) of the reconstructions Z Wc; the best consecutive PC pair's indices."""
    Z, Wc = Z.double(), Wc.double()
    R = torch.linalg.qr(Wc.T, mode="reduced").R  # Wc^T = Q R: the reconstructions are (Z R^T) Q^T
    Y = Z @ R.T
    Y = Y - Y.mean(0)
    _, s, Vh = torch.linalg.svd(Y, full_matrices=False)
    var = s**2
    q = int(min(n_pcs, (var > var[0] * 1e-8).sum())) if var[0] > 0 else 0
    if q < 2:
        return None
    pcs = (Y @ Vh[:q].T).numpy()
    best = None
    for j in range(q - 1):
        P = pcs[:, j : j + 2]
        M, S = mixture_index(P, eps), separability_index(P, bins)
        score = S * (1 - M)
        if best is None or score > best[0]:
            best = (score, M, S, (j, j + 1), float((var[j] + var[j + 1]) / var.sum()), P)
    return best


def _multidim_finish(sae: SAE, acc: _ClusterCodes, n_tokens: int, n_pcs: int, eps: float, bins: int,
                     min_points: int, keep_points: int = 0):
    W = sae.W_dec.detach().cpu()
    recs, points = [], []
    for c, ids in enumerate(acc.clusters):
        if acc.count[c] < min_points:
            continue
        shape = _cluster_shape(torch.cat(acc.parts[c]), W[ids], n_pcs, eps, bins)
        if shape is None:
            continue
        score, M, S, pair, share, P = shape
        recs.append({"latents": list(ids), "size": len(ids), "n_tokens": acc.count[c], "pcs": list(pair),
                     "variance_share": share, "mixture_index": M, "separability_index": S, "score": score})
        points.append(P[:keep_points])
    cols = ["latents", "size", "n_tokens", "pcs", "variance_share", "mixture_index", "separability_index", "score"]
    df = pd.DataFrame(recs, columns=cols)
    order = np.argsort(-df.score.to_numpy(), kind="stable")
    return df.iloc[order].reset_index(drop=True), [points[i] for i in order]


def multidim_features(sae: SAE, acts: Activations | None = None, clusters: list[list[int]] | None = None,
                      cos_threshold: float = 0.5, neighbours: int = 2, max_size: int = 64, max_clusters: int = 1000,
                      max_points: int = 2000, min_points: int = 200, n_pcs: int = 5, eps: float = 0.1,
                      bins: int = 10, max_tokens: int | None = None, batch_size: int = 4096, seed: int = 0,
                      codes: Codes | None = None) -> pd.DataFrame:
    """Irreducible multi-dimensional features (Engels et al.), best first.

    Clusters come from `find_clusters` (top-`neighbours` graph with cos > `cos_threshold`,
    connected components, oversized ones split by k-means) unless given as `clusters` (disjoint
    lists of latent ids). Per cluster, on the first `max_points` tokens where any of its latents
    is active (only those tokens), the reconstruction sum_{i in cluster} z_i W_dec[i] is reduced
    by PCA to <= `n_pcs` dimensions (directions with variance > 1e-8 of the first); for each
    consecutive pair of PCs, `mixture_index` M (eps) and `separability_index` S (`bins` x `bins`
    histogram MI, nats, less its Miller-Madow bias) are computed, and score = S (1 - M): high when
    the 2-D shape is neither a mixture of lines nor separable by a rotation. The cluster's row reports its best pair.
    Clusters active on fewer than `min_points` tokens, or whose reconstructions span < 2
    dimensions, are left out.
    """
    if clusters is None:
        clusters = find_clusters(sae.W_dec.detach().cpu(), cos_threshold, neighbours, max_size, max_clusters, seed)
    clusters = [sorted(int(i) for i in c) for c in clusters]
    if any(i < 0 or i >= sae.n_latents for c in clusters for i in c):
        raise SaekitError(f"cluster latent ids must be in [0, {sae.n_latents})")
    acc = _ClusterCodes(clusters, sae.n_latents, max_points)
    n = _feed(_code_stream(sae, acts, codes, max_tokens, batch_size), [acc])
    return _multidim_finish(sae, acc, n, n_pcs, eps, bins, min_points)[0]


# -- circles of items in a cyclic order ----------------------------------------------------
@dataclass
class CircleResult(Result):
    n_points: int
    n_pcs: int  # principal components whose pairs were searched
    pcs: tuple[int, int]  # the best pair (0-based): most angular neighbours that are cyclic neighbours
    neighbours: int  # of the n_points angular neighbour pairs in that plane, how many are cyclic neighbours
    p_value: float  # share of label shuffles whose best pair (same search) has as many
    radius_cv: float  # std / mean of the points' distances from their centre in that plane
    gap_ratio: float  # largest / median distance between cyclic neighbours in that plane (~1 on a ring)
    gap_after: int  # the point the largest gap follows (i: between i and i + 1 mod n)
    variance_share: float  # that pair's share of the points' variance
    neighbours_top: int  # the same in the plane of the first two PCs (no search)
    p_value_top: float
    radius_cv_top: float
    variance_share_top: float
    order: list[int]  # the points, by angle in the best plane
    mean: torch.Tensor  # [d] centre of the points
    components: torch.Tensor  # [n_pcs, d] principal directions, by variance
    n_perm: int


def _cyclic_neighbours(labels: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """For label arrangements `labels [P, n]` and angular orders `orders [pairs, n]`: how many
    of each order's n consecutive pairs (last to first included) hold labels i, i +- 1 mod n."""
    n = labels.shape[1]
    seq = labels[:, orders]  # [P, pairs, n]
    step = (np.roll(seq, -1, axis=2) - seq) % n
    return ((step == 1) | (step == n - 1)).sum(2)


def circularity(X: torch.Tensor, n_pcs: int = 4, n_perm: int = 2000, seed: int = 0) -> CircleResult:
    """Whether points `X [n, d]` that stand for items in a cyclic order (row i next to rows i +- 1
    mod n, e.g. the days of the week) lie on a circle in that order, as Engels et al. 2024 found
    for day and month names in LLM activations.

    PCA of the centred points; in the plane of each pair among the first `n_pcs` PCs, the points
    sorted by angle and the statistic = how many of the n angularly consecutive pairs are cyclic
    neighbours (n when the circle runs in order, either way round). The best pair's count is tested
    against `n_perm` random relabellings of the points, each searched over the same pairs (so
    choosing the best plane is part of the null): p = (1 + #{shuffles >= observed}) / (1 + n_perm).
    The plane of PCs 1 and 2 is reported alone too. Angular order around the centre cannot tell a
    closed ring from an open arc or horseshoe (a 1-D order bent by PCA also has its ends as angular
    neighbours), so `gap_ratio` compares the widest step between cyclic neighbours (an arc's open
    end) with the median step, and `radius_cv` the spread of the distances from the centre."""
    X = torch.as_tensor(X).double().cpu()
    n = len(X)
    if X.ndim != 2 or n < 5:
        raise SaekitError(f"circularity needs [n >= 5, d] points, got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise SaekitError("circularity got non-finite points")
    mean = X.mean(0)
    _, s, Vh = torch.linalg.svd(X - mean, full_matrices=False)
    var = (s**2).numpy()
    q = int(min(n_pcs, (var > var[0] * 1e-10).sum())) if var[0] > 0 else 0
    if q < 2:
        raise SaekitError(f"circularity needs points spanning >= 2 dimensions, got {q}")
    Y = ((X - mean) @ Vh[:q].T).numpy()
    pairs = [(i, j) for i in range(q) for j in range(i + 1, q)]
    orders = np.stack([np.argsort(np.arctan2(Y[:, j], Y[:, i]), kind="stable") for i, j in pairs])
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(n)[None], rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)])
    counts = _cyclic_neighbours(labels, orders)  # [1 + n_perm, pairs]; row 0 the real labels
    b = int(counts[0].argmax())
    best = counts.max(1)
    pv = lambda c, null: float((1 + (null >= c).sum()) / (1 + n_perm))  # noqa: E731

    def ring(i, j):
        r = np.hypot(Y[:, i], Y[:, j])
        return float(r.std() / r.mean()), float((var[i] + var[j]) / var.sum())

    cv, share = ring(*pairs[b])
    cv0, share0 = ring(0, 1)
    P = Y[:, list(pairs[b])]
    steps = np.linalg.norm(np.roll(P, -1, axis=0) - P, axis=1)  # point i to point i + 1 mod n
    return CircleResult(
        n_points=n, n_pcs=q, pcs=pairs[b], neighbours=int(counts[0, b]), p_value=pv(best[0], best[1:]),
        radius_cv=cv, gap_ratio=float(steps.max() / np.median(steps)), gap_after=int(steps.argmax()),
        variance_share=share, neighbours_top=int(counts[0, 0]),
        p_value_top=pv(counts[0, 0], counts[1:, 0]), radius_cv_top=cv0, variance_share_top=share0,
        order=orders[b].tolist(), mean=mean.float(), components=Vh[:q].float(), n_perm=n_perm)


# -- everything at once, for the report ----------------------------------------------------
def geometry_bundle(sae: SAE, activations: Activations | None = None, max_tokens: int | None = None,
                    n_lobes: int = 3, chunk: int = 256, n_crystals: int = 20, n_multidim: int = 20,
                    map_points: int = 3000, cluster_points: int = 1000, plot_clusters: int = 3, seed: int = 0,
                    batch_size: int = 4096) -> dict:
    """`geometry` and `crystals` (decoder only), and with `activations` `lobes` and
    `multidim_features` from a single encoding pass, as one JSON-ready dict: `galaxy`,
    `crystals` (best `n_crystals`), `lobes`, `multidim` (best `n_multidim`), plus plot data —
    `lobe_map` (2-D PCA of up to `map_points` fired latents' unit decoder rows with their lobe)
    and `cluster_points` (the best `plot_clusters` clusters' points on their best PC pair) — and
    `notes` on what was skipped and why."""
    notes: list[str] = []
    out: dict = {"galaxy": geometry(sae, seed=seed).to_dict(),
                 "crystals": crystals(sae, n=n_crystals).to_dict(orient="records"),
                 "lobes": None, "multidim": None, "lobe_map": None, "cluster_points": None}
    if activations is None:
        notes.append("no activations: lobes and multi-dimensional features skipped")
    else:
        occ = _ChunkOccurrence(sae.n_latents, chunk, 0.0)
        clusters = find_clusters(sae.W_dec.detach().cpu(), seed=seed)
        acc = _ClusterCodes(clusters, sae.n_latents, 2000)
        n = _feed(encode_batches(sae, activations, max_tokens, batch_size), [occ, acc])
        try:
            lb = _lobes_finish(sae, occ, n_lobes, 2048, 100, seed)
        except SaekitError as e:
            notes.append(f"lobes skipped: {e}")
        else:
            out["lobes"] = lb.to_dict()
            fired = (lb.labels >= 0).nonzero().squeeze(1)
            g = torch.Generator().manual_seed(seed)
            pick = fired[torch.randperm(len(fired), generator=g)[:map_points].sort().values]
            Wn = _unit_rows(sae.W_dec.detach().float().cpu()[pick]).double().numpy()
            Wc = Wn - Wn.mean(0)
            with _one_blas_thread():
                xy = Wc @ np.linalg.eigh(Wc.T @ Wc)[1][:, ::-1][:, :2]  # first two principal components
            out["lobe_map"] = {"latent": pick.tolist(), "x": xy[:, 0].tolist(), "y": xy[:, 1].tolist(),
                               "lobe": lb.labels[pick].tolist()}
        df, pts = _multidim_finish(sae, acc, n, 5, 0.1, 10, 200, keep_points=cluster_points)
        out["multidim"] = df.head(n_multidim).to_dict(orient="records")
        out["n_multidim_clusters"] = len(clusters)
        out["cluster_points"] = [{"latents": df.latents[i], "x": p[:, 0].tolist(), "y": p[:, 1].tolist()}
                                 for i, p in enumerate(pts[:plot_clusters])]
        if not len(df):
            notes.append(f"no multi-dimensional feature: {len(clusters)} candidate clusters, none active on "
                         ">= 200 tokens with >= 2 dimensions")
    out["notes"] = notes
    return out
