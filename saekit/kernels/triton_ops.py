"""Triton sparse-code primitives: the CUDA path, same signatures and results as `torch_ops`.

    gather_sum(vals, idx, W)     -> [B, d]  out[b] = sum_j vals[b,j] * W[idx[b,j]]
    gather_dot(idx, W, G)        -> [B, k]  out[b,j] = G[b] . W[idx[b,j]]
    scatter_outer(c, idx, X, m)  -> [m, d]  out[i] = sum_{b,j: idx[b,j]=i} c[b,j] * X[b]

Every kernel accumulates in fp32 and writes the output in the dtype `torch_ops` returns
(W's for the first two, X's for the third), so bf16 weights lose nothing in the sums. A
zero value is padding and simply adds nothing. Under `TRITON_INTERPRET=1` the kernels run
on CPU tensors, which is how the tests check them without a GPU.
"""

import torch
import triton
import triton.language as tl

_BLOCK_D = 128  # columns of d per program: one 512-byte fp32 row chunk, coalesced loads
_BLOCK_B = 16  # tokens per gather_sum program
_BLOCK_N = 32  # (token, slot) pairs per scatter_outer iteration


@triton.jit
def _gather_sum_kernel(vals_ptr, idx_ptr, W_ptr, out_ptr, B, k, d,
                       BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # [BB]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    rmask, cmask = rows < B, cols < d
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for j in range(k):
        lat = tl.load(idx_ptr + rows64 * k + j, mask=rmask, other=0)  # [BB] int64
        v = tl.load(vals_ptr + rows64 * k + j, mask=rmask, other=0).to(tl.float32)
        w = tl.load(W_ptr + lat[:, None] * d + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0)
        acc += v[:, None] * w.to(tl.float32)
    tl.store(out_ptr + rows64[:, None] * d + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _gather_dot_kernel(idx_ptr, W_ptr, G_ptr, out_ptr, k, d,
                       BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_K)  # [BK]
    smask = slots < k
    lat = tl.load(idx_ptr + b * k + slots, mask=smask, other=0)  # [BK] int64
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for c in range(0, d, BLOCK_D):
        cols = c + tl.arange(0, BLOCK_D)
        cmask = cols < d
        g = tl.load(G_ptr + b * d + cols, mask=cmask, other=0).to(tl.float32)  # [BD]
        w = tl.load(W_ptr + lat[:, None] * d + cols[None, :], mask=smask[:, None] & cmask[None, :], other=0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + b * k + slots, acc.to(out_ptr.dtype.element_ty), mask=smask)


@triton.jit
def _scatter_outer_kernel(coeffs_ptr, order_ptr, starts_ptr, X_ptr, out_ptr, k, d,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    lat = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    cmask = cols < d
    start = tl.load(starts_ptr + lat)
    end = tl.load(starts_ptr + lat + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for s in range(start, end, BLOCK_N):
        pos = s + tl.arange(0, BLOCK_N)  # [BN] positions in the latent-sorted pair list
        pmask = pos < end
        pair = tl.load(order_ptr + pos, mask=pmask, other=0)  # [BN] flat (token, slot) ids
        c = tl.load(coeffs_ptr + pair, mask=pmask, other=0).to(tl.float32)
        x = tl.load(X_ptr + (pair // k)[:, None] * d + cols[None, :], mask=pmask[:, None] & cmask[None, :], other=0)
        acc += tl.sum(c[:, None] * x.to(tl.float32), axis=0)
    tl.store(out_ptr + lat * d + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


def gather_sum(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty(B, d, dtype=W.dtype, device=W.device)
    grid = (triton.cdiv(B, _BLOCK_B), triton.cdiv(d, _BLOCK_D))
    _gather_sum_kernel[grid](vals.contiguous(), idx.contiguous(), W.contiguous(), out, B, k, d,
                             BLOCK_B=_BLOCK_B, BLOCK_D=_BLOCK_D)
    return out


def gather_dot(idx: torch.Tensor, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    B, k = idx.shape
    d = W.shape[1]
    out = torch.empty(B, k, dtype=W.dtype, device=W.device)
    _gather_dot_kernel[(B,)](idx.contiguous(), W.contiguous(), G.contiguous(), out, k, d,
                             BLOCK_K=triton.next_power_of_2(k), BLOCK_D=_BLOCK_D)
    return out


def scatter_outer(coeffs: torch.Tensor, idx: torch.Tensor, X: torch.Tensor, m: int) -> torch.Tensor:
    """Segment sum: sort the B*k (token, slot) pairs by latent, one program per latent row.

    Sorting (one argsort of B*k ints) rather than atomics makes every output row a single
    deterministic fp32 sum written once, needs no zero-initialised fp32 buffer for bf16
    outputs, and writes zeros for latents never selected. The price is load imbalance: a very
    frequent latent makes one long program (not yet measured on a GPU).
    """
    B, k = idx.shape
    d = X.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # [B*k] pairs grouped by latent
    starts = torch.zeros(m + 1, dtype=torch.long, device=idx.device)
    starts[1:] = torch.bincount(flat, minlength=m).cumsum(0)  # [m+1] segment bounds
    out = torch.empty(m, d, dtype=X.dtype, device=X.device)
    grid = (m, triton.cdiv(d, _BLOCK_D))
    _scatter_outer_kernel[grid](coeffs.contiguous(), order, starts, X.contiguous(), out, k, d,
                                BLOCK_N=_BLOCK_N, BLOCK_D=_BLOCK_D)
    return out
