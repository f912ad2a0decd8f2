"""Decoder-direction similarity: the OrtSAE penalty (Korznikov et al. 2025) and the max-cosine
search it and the collapse metrics share. Never builds an m x m matrix: rows are compared
in blocks, and only each row's best match carries a gradient."""

import math

import torch


@torch.no_grad()
def max_cosine(A: torch.Tensor, B: torch.Tensor | None = None, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of `A [n, d]`, its highest cosine to a row of `B [p, d]` and that row's index.

    With `B=None` rows are compared with the other rows of A (self-matches excluded); the
    similarity matrix is symmetric, so each pair of blocks is computed once and read both
    ways (half the matmul work). Memory is O(block * p), or O(block^2) with `B=None`.
    """
    An = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    vals = torch.full((len(A),), -torch.inf, dtype=A.dtype, device=A.device)
    idx = torch.zeros(len(A), dtype=torch.long, device=A.device)
    if B is not None:
        Bn = B / B.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for s in range(0, len(A), block):
            torch.max(An[s : s + block] @ Bn.T, dim=1, out=(vals[s : s + block], idx[s : s + block]))
        return vals, idx

    def merge(rows: slice, v: torch.Tensor, i: torch.Tensor) -> None:
        better = v > vals[rows]
        vals[rows] = torch.where(better, v, vals[rows])
        idx[rows] = torch.where(better, i, idx[rows])

    for s in range(0, len(A), block):
        rs = slice(s, s + block)
        for t in range(s, len(A), block):
            sims = An[rs] @ An[t : t + block].T  # [block, block]
            if t == s:
                sims.fill_diagonal_(-torch.inf)
            v, i = sims.max(dim=1)
            merge(rs, v, i + t)
            if t != s:
                v, i = sims.max(dim=0)
                merge(slice(t, t + block), v, i + s)
    return vals, idx


def ortho_loss(W: torch.Tensor, generator: torch.Generator, chunk_size: int = 8192,
               delta: float = 1e-8) -> torch.Tensor:
    """L_orth = mean over K = ceil(m / chunk_size) random equal chunks of
    mean_i (max_{j != i in chunk} cos(W_i, W_j))^2, cos = <W_i, W_j> / max(|W_i||W_j|, delta).

    The max is located without grad; the loss is then recomputed on the (i, argmax) pairs,
    which gives exactly autograd's gradient of max at O(m * d) backward cost.
    """
    m = W.shape[0]
    n_chunks = math.ceil(m / chunk_size)
    perm = torch.randperm(m, generator=generator).to(W.device)
    total = W.new_zeros(())
    for chunk in perm.tensor_split(n_chunks):
        Wc = W[chunk]
        _, j = max_cosine(Wc.detach())
        norms = Wc.norm(dim=1)
        cos = (Wc * Wc[j]).sum(1) / (norms * norms[j]).clamp_min(delta)
        total = total + cos.pow(2).mean()
    return total / n_chunks
