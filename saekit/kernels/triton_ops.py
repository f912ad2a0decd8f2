"""Triton sparse-code primitives: the CUDA path, same signatures and results as `torch_ops`.

    gather_sum(vals, idx, W)          -> [B, d]  out[b] = sum_j vals[b,j] * W[idx[b,j]]
    gather_dot(idx, W, G)             -> [B, k]  out[b,j] = G[b] . W[idx[b,j]]
    scatter_outer(c, idx, X, m)       -> [m, d]  out[i] = sum_{b,j: idx[b,j]=i} c[b,j] * X[b]
    decode_backward(vals, idx, W, G)  -> (gather_dot with padding zeroed, scatter_outer(vals, idx, G))

Two kernel shapes cover them. Token-major (`gather_sum`, `gather_dot`): one program per token
holds a whole row of d and walks its k slots a tile of rows at a time. Latent-major
(`scatter_outer`, `decode_backward`): the (token, slot) pairs are sorted by latent and one
program per latent walks its pairs, so every output row is one deterministic fp32 sum
written once (no atomics, no zero fill). `decode_backward` fuses the decoder's two gradient
products: while a latent's program holds its W row and reads the G row of each of its
tokens, it also writes that pair's dot product, so G is read once and W once.

Every kernel accumulates in fp32 and writes the dtype `torch_ops` returns (W's for the
token-major products, X's for the segment sums), so bf16 inputs lose nothing in the sums.
A zero value (or coefficient) is padding: its row is never loaded, it adds nothing, and its
gradient is 0. Under `TRITON_INTERPRET=1` the kernels run on CPU tensors, which is how the
tests check them without a GPU. Tile sizes: see `TILES`.
"""

import torch
import triton
import triton.language as tl

# Per kernel: (elements of the [rows, d] tile a program loads per iteration, tile elements per
# thread, which sets num_warps). Picked on an H100 with benchmarks/tune_triton.py; the fused
# decoder backward wants few warps (its per-pair dot is a cross-warp reduction).
TILES = {"gather": (8192, 32), "segment": (4096, 16), "segment_dot": (8192, 64)}


def _tiles(d: int, max_rows: int, kind: str) -> tuple[int, int, int]:
    """(row width, rows per tile, num_warps) for kernel `kind`: whole rows (d padded to a
    power of two), as many rows as fit in the tile, warps so each thread holds its share."""
    tile, elems = TILES[kind]
    block_d = triton.next_power_of_2(d)
    rows = max(1, min(triton.next_power_of_2(max_rows), tile // block_d))
    warps = min(16, max(1, block_d * rows // (32 * elems)))
    return block_d, rows, triton.next_power_of_2(warps)


@triton.jit
def _this_row(d, BLOCK_D: tl.constexpr):
    """The program's row (int64, for offsets past 2**31) and its column offsets with their mask."""
    cols = tl.arange(0, BLOCK_D)
    return tl.program_id(0).to(tl.int64), cols, cols < d


@triton.jit
def _gather_sum_kernel(vals_ptr, idx_ptr, W_ptr, out_ptr, k, d,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols, cmask = _this_row(d, BLOCK_D)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(0, k, BLOCK_K):
        slots = s + tl.arange(0, BLOCK_K)
        smask = slots < k
        v = tl.load(vals_ptr + b * k + slots, mask=smask, other=0).to(tl.float32)  # [BK]
        lat = tl.load(idx_ptr + b * k + slots, mask=smask, other=0)
        live = v != 0
        w = tl.load(W_ptr + lat[:, None] * d + cols[None, :], mask=live[:, None] & cmask[None, :], other=0)
        acc += tl.sum(v[:, None] * w.to(tl.float32), axis=0)
    tl.store(out_ptr + b * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_dot_kernel(idx_ptr, W_ptr, G_ptr, out_ptr, k, d,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b, cols, cmask = _this_row(d, BLOCK_D)
    g = tl.load(G_ptr + b * d + cols, mask=cmask, other=0).to(tl.float32)  # [BD]
    for s in range(0, k, BLOCK_K):
        slots = s + tl.arange(0, BLOCK_K)
        smask = slots < k
        lat = tl.load(idx_ptr + b * k + slots, mask=smask, other=0)
        w = tl.load(W_ptr + lat[:, None] * d + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0)
        dots = tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out_ptr + b * k + slots, dots.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _segment_kernel(lat_order_ptr, starts_ptr, pairs_ptr, coeffs_ptr, X_ptr, out_ptr, W_ptr, dots_ptr, k, d,
                    WITH_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    lat = tl.load(lat_order_ptr + tl.program_id(0)).to(tl.int64)  # busiest latents first
    start = tl.load(starts_ptr + lat)
    end = tl.load(starts_ptr + lat + 1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < d
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if WITH_DOT:
        w = tl.load(W_ptr + lat * d + cols, mask=cmask, other=0).to(tl.float32)
    for s in range(start, end, BLOCK_N):
        pos = s + tl.arange(0, BLOCK_N)  # [BN] positions in the latent-sorted pair list
        pmask = pos < end
        pair = tl.load(pairs_ptr + pos, mask=pmask, other=0)  # flat (token, slot) ids
        c = tl.load(coeffs_ptr + pair, mask=pmask, other=0).to(tl.float32)
        x = tl.load(X_ptr + (pair // k)[:, None] * d + cols[None, :], mask=pmask[:, None] & cmask[None, :], other=0)
        x = x.to(tl.float32)
        acc += tl.sum(c[:, None] * x, axis=0)
        if WITH_DOT:
            tl.store(dots_ptr + pair, tl.sum(x * w[None, :], axis=1).to(dots_ptr.dtype.element_ty), mask=pmask)
    tl.store(out_ptr + lat * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def _per_row(kernel, inputs: tuple, idx: torch.Tensor, W: torch.Tensor, width: int) -> torch.Tensor:
    """Run a gather kernel, one program per row of `idx [B, k]`, over `inputs` into a new [B, width]."""
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty(B, width, dtype=W.dtype, device=W.device)
    block_d, rows, warps = _tiles(d, k, "gather")
    kernel[(B,)](*(t.contiguous() for t in inputs), out, k, d, BLOCK_K=rows, BLOCK_D=block_d, num_warps=warps)
    return out


def gather_sum(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return _per_row(_gather_sum_kernel, (vals, idx, W), idx, W, W.shape[1])


def gather_dot(idx: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return _per_row(_gather_dot_kernel, (idx, W, G), idx, W, idx.shape[1])


def _segments(coeffs: torch.Tensor, idx: torch.Tensor, m: int):
    """The live (non-zero coefficient) pairs grouped by latent, without a host sync: padding
    gets the key m, so it sorts past every segment. Returns the latents busiest-first, the
    segment bounds [m+1] and the latent-sorted flat pair ids."""
    key = torch.where(coeffs.reshape(-1) != 0, idx.reshape(-1), m).int()  # int32: half the radix passes
    key, pairs = torch.sort(key, stable=True)  # stable: a fixed summation order per latent
    # segment bounds by binary search (CUDA's bincount would sync with the host for its size)
    starts = torch.searchsorted(key, torch.arange(m + 1, dtype=torch.int32, device=idx.device))
    return (starts[1:] - starts[:-1]).argsort(descending=True), starts, pairs


def _segment_sums(coeffs, idx, X, m, W=None):
    B, k = idx.shape
    d = X.shape[1]
    lat_order, starts, pairs = _segments(coeffs, idx, m)
    out = torch.empty(m, d, dtype=X.dtype, device=X.device)
    dots = torch.zeros(B, k, dtype=W.dtype, device=X.device) if W is not None else out
    block_d, rows, warps = _tiles(d, 32, "segment" if W is None else "segment_dot")
    _segment_kernel[(m,)](lat_order, starts, pairs, coeffs.contiguous(), X.contiguous(), out,
                          W.contiguous() if W is not None else out, dots, k, d,
                          WITH_DOT=W is not None, BLOCK_N=rows, BLOCK_D=block_d, num_warps=warps)
    return out, dots


def scatter_outer(coeffs: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, m: int) -> torch.Tensor:
    return _segment_sums(coeffs, idx, X, m)[0]


def decode_backward(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor,
                    G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_W, grad_vals = _segment_sums(vals, idx, G, W.shape[0], W)
    return grad_vals, grad_W
