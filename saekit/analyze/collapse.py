"""Collapse: is the dictionary spread over the input space or folded onto a few
directions, are latents near-duplicates, and do the codes (and the inputs) use few directions.

All pairwise searches are blockwise (`saekit.ortho.max_cosine`): no m x m matrix, so
m = 65k latents fit in a few GiB. Near-duplicate pairs are searched only among latents whose
best match exceeds tau (a pair above tau implies both ends are such latents).
"""

from dataclasses import dataclass

import torch

from saekit.analyze.common import Activations, Result, batches
from saekit.errors import SaekitError
from saekit.linalg import effective_dimension, entropy_rank
from saekit.ortho import max_cosine
from saekit.sae import SAE

INPUT_SAMPLE = 16_384  # rows for the input's spectrum (as the trainer's init sample)


@dataclass
class CollapseResult(Result):
    d_in: int
    n_latents: int
    effective_rank: float  # exp(H(sigma / sum sigma)) of W_dec's singular values, at most d_in
    effective_rank_ratio: float  # effective_rank / d_in
    participation_ratio: float  # (sum lambda)^2 / sum lambda^2, lambda = sigma^2
    singular_values: torch.Tensor  # [d_in] of W_dec, descending
    mean_max_decoder_cos: float
    mean_max_encoder_cos: float
    tau: float
    duplicate_pairs: list[tuple[int, int]]  # (i, j), i < j, decoder cosine > tau
    duplicate_fraction: float  # share of latents in at least one such pair
    # with activations
    n_tokens: int | None = None
    code_effective_rank: float | None = None  # of the latent-code covariance (sqrt of its eigenvalues)
    code_latents: int | None = None  # live latents it was measured over (the rank's upper bound)
    code_effective_rank_ratio: float | None = None
    input_dims_90: int | None = None
    input_dims_99: int | None = None
    input_share_90: float | None = None
    input_share_99: float | None = None
    input_effective_rank: float | None = None

    def summary(self) -> dict:
        """The scalar figures (no spectrum or pair list): what training logs."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("singular_values", "duplicate_pairs") and v is not None}


@torch.no_grad()
def duplicate_pairs(W: torch.Tensor, tau: float, best: torch.Tensor | None = None,
                    block: int = 1024) -> list[tuple[int, int]]:
    """All pairs of rows of `W [m, d]` with cosine > tau, found blockwise; `best [m]` is each
    row's max cosine to the others if already known (`max_cosine(W)[0]`)."""
    best = max_cosine(W, block=block)[0] if best is None else best
    cand = (best > tau).nonzero().squeeze(1)  # [c] rows with any partner above tau
    Wc = W[cand] / W[cand].norm(dim=1, keepdim=True).clamp_min(1e-12)
    pairs = []
    for s in range(0, len(cand), block):
        sims = Wc[s : s + block] @ Wc.T  # [block, c]
        i, j = (sims > tau).nonzero(as_tuple=True)
        keep = j > i + s
        pairs += zip(cand[i[keep] + s].tolist(), cand[j[keep]].tolist(), strict=False)
    return sorted((min(a, b), max(a, b)) for a, b in pairs)


@torch.no_grad()
def decoder_collapse(sae: SAE, tau: float = 0.9, block: int = 1024) -> CollapseResult:
    """The weight-only figures: decoder spectrum, max cosines and near-duplicates (no data)."""
    W = sae.W_dec.detach().float()  # [m, d]
    s = torch.linalg.svdvals(W.double())  # [d]
    lam = s.pow(2)
    best, _ = max_cosine(W, block=block)  # [m]
    pairs = duplicate_pairs(W, tau, best, block)
    in_pairs = {i for p in pairs for i in p}
    eff = entropy_rank(s)
    return CollapseResult(
        d_in=sae.d_in, n_latents=sae.n_latents, effective_rank=eff, effective_rank_ratio=eff / sae.d_in,
        participation_ratio=float(lam.sum() ** 2 / lam.pow(2).sum()), singular_values=s.float().cpu(),
        mean_max_decoder_cos=float(best.mean()),
        mean_max_encoder_cos=float(max_cosine(sae.W_enc.detach().float(), block=block)[0].mean()),
        tau=tau, duplicate_pairs=pairs, duplicate_fraction=len(in_pairs) / sae.n_latents,
    )


@torch.no_grad()
def collapse(sae: SAE, activations: Activations | None = None, tau: float = 0.9, max_tokens: int | None = None,
             max_code_latents: int = 4096, seed: int = 0, batch_size: int = 4096, block: int = 1024) -> CollapseResult:
    """Dictionary collapse of `sae`; with `activations` also the codes' and inputs' collapse.

    The code covariance `[c, c]` is accumulated exactly from the sparse codes (k^2 products per
    token, no dense `[batch, m]` codes) over all latents when m <= `max_code_latents`, else over
    a seeded random subset of that many. Its effective rank follows the input's and decoder's
    convention, exp(H(sigma / sum sigma)) with sigma = sqrt(eigenvalues) (the singular values of
    the centred code matrix), and is reported against the number of those latents that fired
    (`code_latents`). Memory is 8 c^2 bytes and the eigendecomposition O(c^3): c = 4096 takes
    134 MB and 10-20 s on 2 cores.
    """
    res = decoder_collapse(sae, tau, block)
    if activations is None:
        return res
    m, dev = sae.n_latents, sae.W_dec.device
    c = min(m, max_code_latents)
    pos = torch.full((m,), -1, dtype=torch.long, device=dev)  # latent -> row of the covariance, -1 = not tracked
    chosen = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:c].sort().values if c < m \
        else torch.arange(m)
    pos[chosen.to(dev)] = torch.arange(c, device=dev)
    zz = torch.zeros(c * c, dtype=torch.float64, device=dev)  # sum z z^T, flattened
    z1 = torch.zeros(c, dtype=torch.float64, device=dev)  # sum z
    sample, n = [], 0
    for x in batches(activations, sae.d_in, batch_size, max_tokens):
        x = x.to(dev)
        vals, idx = sae.encode(x)  # [B, k] each
        p = pos[idx]
        vals = (vals * (p >= 0)).double()
        p = p.clamp_min(0)
        z1.index_add_(0, p.flatten(), vals.flatten())
        zz.index_add_(0, (p[:, :, None] * c + p[:, None, :]).flatten(), (vals[:, :, None] * vals[:, None, :]).flatten())
        if n < INPUT_SAMPLE:
            sample.append(x[: INPUT_SAMPLE - n].cpu())
        n += len(x)
    if n == 0:
        raise SaekitError("no activations to analyse")
    mean = z1 / n
    cov = zz.view(c, c) / n - torch.outer(mean, mean)  # [c, c]
    live = cov.diagonal() > 0
    lam = torch.linalg.eigvalsh(cov[live][:, live]).clamp_min(0)
    inp = effective_dimension(torch.cat(sample))
    res.n_tokens = n
    res.code_latents = int(live.sum())
    res.code_effective_rank = entropy_rank(lam.sqrt()) if res.code_latents else 0.0
    res.code_effective_rank_ratio = res.code_effective_rank / max(res.code_latents, 1)
    res.input_dims_90, res.input_dims_99 = inp["dims_90"], inp["dims_99"]
    res.input_share_90, res.input_share_99 = inp["share_90"], inp["share_99"]
    res.input_effective_rank = inp["effective_rank"]
    return res
