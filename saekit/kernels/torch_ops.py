"""Pure-torch sparse-code primitives: the CPU path and the reference for the Triton kernels.

A sparse code is `vals[B, k]` with `idx[B, k]` (latent ids). A zero value is padding
(BatchTopK rows are padded to the longest): it adds nothing, its row is never read and its
gradient is 0, which for post-ReLU codes is also the exact gradient. The primitives cover
every sparse product in a TopK/BatchTopK training step:

    gather_sum(vals, idx, W)          -> [B, d]  out[b] = sum_j vals[b,j] * W[idx[b,j]]
    gather_dot(idx, W, G)             -> [B, k]  out[b,j] = G[b] . W[idx[b,j]]
    scatter_outer(c, idx, X, m)       -> [m, d]  out[i] = sum_{b,j: idx[b,j]=i} c[b,j] * X[b]
    decode_backward(vals, idx, W, G)  -> (gather_dot with padding zeroed, scatter_outer(vals, idx, G))

They run on ATen's embedding-bag kernels, which walk the k rows per token without
materialising the [B, k, d] gather. The backward products walk the live (token, slot) pairs
sorted by latent, so each row of W (or of the output) is touched in one run while it is in
cache; `scatter_outer` is then an embedding-bag *forward* with one bag per latent (every
output row written once, no zero fill, no second sort inside ATen's embedding backward), and
`decode_backward` sorts once for both of the decoder's gradients.
Decode forward + backward at B=4096, k=32, d=576, m=9216 on 2 cores: ~22 ms, against ~800 ms
dense (`benchmarks/bench_decode.py`, RESULTS.md table 3).
"""

import torch
import torch.nn.functional as F

from saekit.runtime import torch_threads

_MODE_SUM = 0
# ATen's fused per-pair dot product (the embedding-bag weight gradient). It is private, so it is
# looked up once and replaced by a public, chunked gather-multiply where a torch build lacks it.
_PSW_BACKWARD = getattr(torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None)


def by_latent(idx: torch.Tensor, coeffs: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The live flat pairs of a [B, k] code (non-zero coefficient; all if `coeffs` is None)
    grouped by latent: their latent ids, positions in `idx.flatten()` and token ids ([n]
    each), and where each latent's run starts ([m'], m' = max id + 1).

    The sort runs on one thread: ATen's parallel radix sort synchronises its threads several
    times per pass, and when another process holds a core each of those waits can take a
    scheduler time slice (~0.3 s per sort instead of ~2 ms, measured on 2 shared cores).
    """
    flat = idx.reshape(-1)
    live = None if coeffs is None else coeffs.reshape(-1) != 0
    live = None if live is None or bool(live.all()) else live.nonzero().squeeze(1)
    with torch_threads(1):
        lat, pair = (flat if live is None else flat[live]).sort()
    if live is not None:
        pair = live[pair]
    counts = torch.bincount(lat)
    return lat, pair, pair // idx.shape[1], counts.cumsum(0) - counts


def _dots(lat, tok, W, G):
    """`G[tok[i]] . W[lat[i]]` for every pair i (fp32 where ATen's CUDA kernel lacks bf16)."""
    dt = W.dtype if W.device.type == "cpu" or W.dtype == torch.float32 else torch.float32
    G, W_ = G.to(dt).contiguous(), W.to(dt)
    if _PSW_BACKWARD is not None:
        offsets = torch.zeros(1, dtype=torch.long, device=W.device)  # unused when offset2bag is given
        return _PSW_BACKWARD(G, W_, lat, offsets, tok, _MODE_SUM, -1).to(W.dtype)
    step = 1 << 16  # pairs per chunk: bounds the [chunk, d] gathers
    return torch.cat([torch.linalg.vecdot(G[tok[s : s + step]], W_[lat[s : s + step]])
                      for s in range(0, len(lat), step)] or [G.new_zeros(0)]).to(W.dtype)


def segment_sums(coeffs, pair, tok, starts, X, m):
    """Per latent, the sum of `coeffs * X[token]` over its pairs (grouped by `by_latent`) -> [m, d]."""
    starts = F.pad(starts, (0, m - len(starts)), value=len(pair))  # latents past the largest id: empty
    return F.embedding_bag(tok, X.contiguous(), starts, mode="sum",
                           per_sample_weights=coeffs.reshape(-1)[pair].to(X.dtype))


def gather_sum(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    live = vals != 0
    if bool(live.all()):
        return F.embedding_bag(idx, W, per_sample_weights=vals.to(W.dtype), mode="sum")
    offsets = F.pad(live.sum(1).cumsum(0), (1, 0))[:-1]  # padded slots dropped: rows of varying length
    return F.embedding_bag(idx[live], W, offsets, per_sample_weights=vals[live].to(W.dtype), mode="sum")


def gather_dot(idx: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    B, k = idx.shape
    lat, pair, tok, _ = by_latent(idx)
    out = torch.empty(B * k, dtype=W.dtype, device=W.device)
    out[pair] = _dots(lat, tok, W, G)
    return out.view(B, k)


def scatter_outer(coeffs: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, m: int) -> torch.Tensor:
    _, pair, tok, starts = by_latent(idx, coeffs)
    return segment_sums(coeffs, pair, tok, starts, X, m)


def decode_backward(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
                    G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lat, pair, tok, starts = by_latent(idx, vals)
    grad_vals = torch.zeros(vals.numel(), dtype=W.dtype, device=W.device)
    grad_vals[pair] = _dots(lat, tok, W, G)
    return grad_vals.view(vals.shape), segment_sums(vals, pair, tok, starts, G, W.shape[0])
