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

import torch
import torch.nn.functional as F
from torch import Tensor

from saekit.runtime import torch_threads

# Rows per block of the selection on CPU: their [rows, m] correlations stay in cache across the
# k steps (128 measured fastest of 32-4096 at m 9,216: benchmarks/RESULTS.md). CUDA: one block.
ROWS = 128


@torch.no_grad()
def gram(W: Tensor) -> Tensor:
    """G = W W^T [m, m]: the selection's correlation updates; reuse it while W is unchanged."""
    return W @ W.T


@torch.no_grad()
def mp_pursue(xc: Tensor, W: Tensor, k: int, threshold: float | None = None,
              G: Tensor | None = None, rows: int = ROWS) -> tuple[Tensor, Tensor]:
    """The pursuit's selection order `order [B, k]` (latent ids, -1 once a row has stopped)
    and each step's coefficient `coeffs [B, k]` (0 where stopped). `G`: `gram(W)` if known.

    On CPU the k small steps per block run on one thread: with the cores shared, each
    multi-threaded op waits for a time slice at its barrier (measured 3-5x slower per step)."""
    B = xc.shape[0]
    G = gram(W) if G is None else G
    if W.is_cuda:
        return _pursue(xc, W, k, threshold, G, max(B, 1))
    with torch_threads(1):
        return _pursue(xc, W, k, threshold, G, rows)


def _pursue(xc, W, k, threshold, G, rows):
    B = xc.shape[0]
    sq_norms = G.diagonal()
    order = torch.full((B, k), -1, dtype=torch.long, device=xc.device)
    coeffs = torch.zeros(B, k, dtype=W.dtype, device=xc.device)
    for s in range(0, B, rows):
        x = xc[s : s + rows].to(W.dtype)
        c = x @ W.T  # [R, m] correlations of the current residual
        rr = x.square().sum(1)  # ||r||^2, updated exactly per step: ||r - a w||^2 = rr - 2a c_j + a^2 ||w||^2
        alive = torch.ones(len(x), dtype=torch.bool, device=xc.device)
        for t in range(k):
            best, j = c.max(1)
            alive &= best > 0
            if threshold is not None:
                alive &= rr >= threshold * threshold
            if not alive.any():
                break
            a = best * alive
            order[s : s + rows, t] = torch.where(alive, j, -1)
            coeffs[s : s + rows, t] = a
            rr = rr - a * (2 * best - a * sq_norms[j])
            c.sub_(F.embedding_bag(j[:, None], G, per_sample_weights=a[:, None], mode="sum"))  # a G[j]
    return order, coeffs


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


def mp_values(xc: Tensor, W: Tensor, order: Tensor) -> tuple[Tensor, Tensor]:
    """The code of a given selection order (`mp_pursue`'s), differentiable in `xc` and `W`:
    the coefficients solve L c = W_sel xc (unit lower triangular, L[t,s] = <W[j_t], W[j_s]>),
    then repeated latents merge as in `distinct`. Equals `mp_select` up to rounding."""
    live = order >= 0
    W_sel = F.embedding(order.clamp_min(0), W)  # [B, k, d]
    rhs = torch.einsum("bkd,bd->bk", W_sel, xc.to(W.dtype)) * live
    L = (W_sel @ W_sel.transpose(1, 2)) * live[:, :, None]  # stopped steps: c_t = 0
    c = torch.linalg.solve_triangular(L, rhs[..., None], upper=False, unitriangular=True)
    return distinct(c.squeeze(-1), order)


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
