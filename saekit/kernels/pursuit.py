"""Matching pursuit over a tied dictionary (Costa et al. 2025, "From Flat to Hierarchical").

`W [m, d]` holds one (unit-norm) atom per row; `xc [B, d]` are centred inputs. Pursuit starts
from r = xc and takes up to k steps; each picks j = argmax_i <r, W[i]>, adds c_j = <r, W[j]> to
z_j and sets r <- r - c_j W[j]. A row stops when its best correlation is <= 0, or (with a
threshold) once ||r|| < threshold. A latent picked again accumulates, so a code holds at most k
distinct latents.

Selection (`mp_pursue`, no grad) never recomputes r W^T: it updates the correlations with rows
of the Gram matrix, c <- c - c_j G[j], G = W W^T (m^2 d once per dictionary, then B m per step
instead of B m d), over blocks of rows small enough to keep their correlations in cache.
Values (`mp_values`, differentiable): given the selection order j_1..j_k the coefficients solve
L c = W_sel xc, L unit lower triangular with L[t,s] = <W[j_t], W[j_s]> (s < t), since
c_t = <xc - sum_{s<t} c_s W[j_s], W[j_t]>; gradients reach xc, every coefficient and every
chosen row. `mp_reference` is the plain unrolled loop (k dense correlation matmuls, autograd
through all of them): the tests' ground truth and the benchmarks' baseline
(benchmarks/RESULTS.md).

Codes follow saekit's sparse convention: `vals [B, k]`, `idx [B, k]`, one slot per distinct
latent, padding slots with value 0 (and the row's first latent as id, or 0 for an empty row).
"""

import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.kernels import backend
from saekit.kernels.torch_ops import by_latent, segment_sums
from saekit.runtime import torch_threads

# Rows per block of the selection on CPU: their [rows, m] correlations stay in cache across the
# k steps. CUDA: one block. Columns per chunk of the two-level row argmax (`_row_max`).
ROWS = 256
CHUNK = 64


@torch.no_grad()
def gram(W: Tensor) -> Tensor:
    """G = W W^T [m, m]: the selection's correlation updates; reuse it while W is unchanged."""
    return W @ W.T


@torch.no_grad()
def mp_pursue(xc: Tensor, W: Tensor, k: int, threshold: float | None = None,
              G: Tensor | None = None, rows: int = ROWS) -> tuple[Tensor, Tensor]:
    """The pursuit's selection order `order [B, k]` (latent ids, -1 once a row has stopped)
    and each step's coefficient `coeffs [B, k]` (0 where stopped). `G`: `gram(W)` if known.

    On CPU the blocks of rows are shared by as many Python threads as torch has intra-op
    threads, each running its block's k small steps on one thread: no barrier per op (with
    the cores shared, each multi-threaded op can wait a time slice at its barrier)."""
    B = xc.shape[0]
    G = gram(W) if G is None else G
    order = torch.full((B, k), -1, dtype=torch.long, device=xc.device)
    coeffs = torch.zeros(B, k, dtype=W.dtype, device=xc.device)
    sq_norms = W.square().sum(1)
    rows = max(B, 1) if W.is_cuda else rows

    inference = torch.is_inference_mode_enabled()

    def block(s: int) -> None:  # grad and inference modes are per thread: the workers take the caller's
        with torch.inference_mode(inference), torch.no_grad():
            _pursue_block(xc[s : s + rows].to(W.dtype), W, G, sq_norms, k, threshold,
                          order[s : s + rows], coeffs[s : s + rows])

    if W.is_cuda:
        block(0)
        return order, coeffs
    starts = range(0, B, rows)
    workers = min(torch.get_num_threads(), len(starts))
    with torch_threads(1):
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(block, starts))
        else:
            for s in starts:
                block(s)
    return order, coeffs


def _pursue_block(x, W, G, sq_norms, k, threshold, order, coeffs):
    """k pursuit steps for the rows `x [R, d]`, writing their `order` and `coeffs` [R, k]."""
    c = x @ W.T  # [R, m] correlations of the current residual
    rr = x.square().sum(1)  # ||r||^2, updated exactly per step: ||r - a w||^2 = rr - 2a c_j + a^2 ||w||^2
    alive = torch.ones(len(x), dtype=torch.bool, device=x.device)
    crow = torch.arange(len(x) + 1, device=x.device)
    for t in range(k):
        best, j = _row_max(c)
        alive &= best > 0
        if threshold is not None:
            alive &= rr >= threshold * threshold
        if not alive.any():
            break
        a = best * alive
        order[:, t] = torch.where(alive, j, -1)
        coeffs[:, t] = a
        rr = rr - a * (2 * best - a * sq_norms[j])
        if c.is_cuda:
            c.sub_(F.embedding_bag(j[:, None], G, per_sample_weights=a[:, None].to(G.dtype), mode="sum"))
        else:  # c -= a G[j] as a one-entry-per-row CSR product: one pass over c, half the gather's
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                c.addmm_(torch.sparse_csr_tensor(crow, j, a.to(G.dtype), size=c.shape), G, alpha=-1)


def _row_max(c: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise (max, argmax) of `c [R, m]`: chunk maxima by the vectorised `amax`, then the argmax
    inside each row's best chunk. `c.max(1)` with indices is ~4x slower on CPU."""
    R, m = c.shape
    n = m - m % CHUNK
    chunks = c.as_strided((R, n // CHUNK, CHUNK), (c.stride(0), CHUNK, 1)).amax(2)
    if n < m:
        chunks = torch.cat([chunks, c[:, n:].amax(1, keepdim=True)], 1)
    best, ch = chunks.max(1)
    cols = (ch[:, None] * CHUNK + torch.arange(CHUNK, device=c.device)).clamp_max(m - 1)
    return best, cols.gather(1, c.gather(1, cols).argmax(1, keepdim=True)).squeeze(1)


def distinct(coeffs: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """Merge a row's repeated latents: (vals [B, k], idx [B, k]) with each latent once, its
    coefficients summed (differentiable in `coeffs`), stopped steps (-1) dropped, padding 0."""
    ids = torch.where(order >= 0, order, order[:, :1].clamp_min(0))  # stopped: first latent, coefficient 0
    sorted_ids, perm = ids.sort(1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    slot = new.cumsum(1) - 1  # each step's slot among the row's distinct latents
    vals = torch.zeros_like(coeffs).scatter_add(1, slot, coeffs.gather(1, perm))
    idx = ids[:, :1].expand_as(ids).clone().scatter_(1, slot, sorted_ids)
    return vals, idx


@torch.no_grad()
def mp_select(xc: Tensor, W: Tensor, k: int, threshold: float | None = None,
              G: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The pursuit's code of `xc [B, d]` over `W [m, d]`: at most k distinct latents per row,
    (vals [B, k], idx [B, k]), repeated picks accumulated, padding value 0."""
    return distinct(*reversed(mp_pursue(xc, W, k, threshold, G)))


class _PursuitSolve(torch.autograd.Function):
    """Per-step coefficients c [B, k] of a selection order: L c = W_sel xc (see `mp_values`),
    L gathered from the Gram matrix, W_sel xc by the sparse `gather_dot`.

    Backward, with lambda = L^-T g: d xc = sum_t lambda_t w_t (a gather-sum), and the row of
    step t receives lambda_t xc - sum_{s != t} M[t,s] w_s, M[t,s] = lambda_t c_s (s < t) or
    c_t lambda_s (s > t). Both sums go straight into the [m, d] gradient as segment sums over
    the (token, step) pairs sorted by latent (one embedding bag of k rows per pair for the
    second), never materialising a [B, k, d] gather.
    """

    @staticmethod
    def forward(ctx, xc, W, order, G):
        live = order >= 0
        j = order.clamp_min(0)
        rhs = backend(W).gather_dot(j, W, xc) * live
        L = G[j[:, :, None], j[:, None, :]].to(W.dtype) * live[:, :, None]  # stopped steps: c_t = 0
        c = torch.linalg.solve_triangular(L, rhs[:, :, None], upper=False, unitriangular=True).squeeze(-1)
        ctx.save_for_backward(xc, W, order, L, c)
        return c

    @staticmethod
    def backward(ctx, g):
        xc, W, order, L, c = ctx.saved_tensors
        B, k = order.shape
        live, j = order >= 0, order.clamp_min(0)
        lam = torch.linalg.solve_triangular(L.transpose(1, 2), g[:, :, None], upper=True, unitriangular=True)
        lam = lam.squeeze(-1) * live
        grad_x = backend(W).gather_sum(lam, j, W) if ctx.needs_input_grad[0] else None
        grad_W = None
        if ctx.needs_input_grad[1]:
            M = (lam[:, :, None] * c[:, None, :]).tril(-1) + (c[:, :, None] * lam[:, None, :]).triu(1)
            _, pair, tok, starts = by_latent(j, live)
            m = W.shape[0]
            grad_W = segment_sums(lam, pair, tok, starts, xc, m)
            offsets = F.pad(starts, (0, m - len(starts)), value=len(pair)) * k
            grad_W -= F.embedding_bag(j[tok].flatten(), W, offsets, mode="sum",
                                      per_sample_weights=M.flatten(0, 1)[pair].flatten())
        return grad_x, grad_W, None, None


def mp_values(xc: Tensor, W: Tensor, order: Tensor, G: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The code of a given selection order (`mp_pursue`'s), differentiable in `xc` and `W`:
    the coefficients solve L c = W_sel xc (unit lower triangular, L[t,s] = <W[j_t], W[j_s]>),
    then repeated latents merge as in `distinct`. Equals `mp_select` up to rounding.
    `G`: `gram(W)` if known (L is read from it)."""
    G = gram(W) if G is None else G
    return distinct(_PursuitSolve.apply(xc.to(W.dtype), W, order, G), order)


def mp_reference(xc: Tensor, W: Tensor, k: int, threshold: float | None = None) -> tuple[Tensor, Tensor]:
    """Plain matching pursuit: k dense [B, m] correlation matmuls, autograd through each.
    Returns the dense code `z [B, m]` and the final residual `r [B, d]`."""
    r = xc.to(W.dtype)
    z = torch.zeros(xc.shape[0], W.shape[0], dtype=W.dtype, device=xc.device)
    for _ in range(k):
        best, j = (r @ W.T).max(1)
        alive = best > 0
        if threshold is not None:
            alive &= r.norm(dim=1) >= threshold
        a = best * alive
        z = z.scatter_add(1, j[:, None], a[:, None])
        r = r - a[:, None] * W[j]
    return z, r
