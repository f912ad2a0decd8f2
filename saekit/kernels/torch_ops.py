"""Pure-torch sparse-code primitives: the CPU path and the reference for the Triton kernels.

A sparse code is `vals[B, k]` with `idx[B, k]` (latent ids); a zero value is padding. The
three primitives cover every sparse product in a TopK/BatchTopK training step:

    gather_sum(vals, idx, W)     -> [B, d]  out[b] = sum_j vals[b,j] * W[idx[b,j]]
    gather_dot(idx, W, G)        -> [B, k]  out[b,j] = G[b] . W[idx[b,j]]
    scatter_outer(c, idx, X, m)  -> [m, d]  out[i] = sum_{b,j: idx[b,j]=i} c[b,j] * X[b]

They run on ATen's embedding-bag kernels (forward and the two halves of its backward),
which walk the k rows per token without materialising the [B, k, d] gather. The two
backward halves walk the (token, slot) pairs sorted by latent, so each row of W (or of the
output) is touched in one run while it is in cache: one sort of B*k ints (~2 ms) makes
`gather_dot` ~2x faster. On 2 cores at B=4096, k=32, d=576, m=9216 the three take ~8,
~10 and ~10 ms, versus ~400 ms for `W[idx]`.
"""

import torch
import torch.nn.functional as F

_MODE_SUM = 0


def _by_latent(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The flat (token, slot) pairs of a [B, k] code sorted by latent: their latent ids,
    their positions in `idx.flatten()`, and their token ids ([B*k] each)."""
    lat, pair = idx.reshape(-1).sort()
    return lat, pair, pair // idx.shape[1]


def gather_sum(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(idx, W, per_sample_weights=vals.to(W.dtype), mode="sum")


def gather_dot(idx: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    B, k = idx.shape
    lat, pair, tok = _by_latent(idx)
    offsets = torch.arange(0, B * k, k, device=idx.device)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        G.to(W.dtype).contiguous(), W, lat, offsets, tok, _MODE_SUM, -1
    )
    out = torch.empty_like(dots)
    out[pair] = dots
    return out.view(B, k)


def scatter_outer(coeffs: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, m: int) -> torch.Tensor:
    lat, pair, tok = _by_latent(idx)
    empty = torch.empty(0, dtype=torch.long, device=idx.device)
    return torch.ops.aten._embedding_bag_dense_backward(
        X.contiguous(), lat, tok, empty, empty, m, False, _MODE_SUM,
        coeffs.reshape(-1)[pair].to(X.dtype), -1,
    )
