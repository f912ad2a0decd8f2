"""Exact per-row top-k by grouped candidate selection: the encoder's selection step."""

import torch


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (unsorted values, column ids; [R, k] each) of every row of `pre [R, n]`.

    The k largest entries of a row lie in the k groups (of any partition of the columns) with
    the largest maxima. With G groups of n/G strided columns (group j = columns j + t*n/G),
    the group maxima are an elementwise max of G contiguous slices: one streaming pass, fast
    on CPU and GPU alike. Keeping the k best groups (G = 32, then 4 within them) leaves k*4
    candidates per row for `torch.topk`, whose cost is linear in the row length on CPU and
    several passes on CUDA. A level with fewer than 4k groups is skipped (k = 128 of 9,216,
    BatchTopK's candidates, uses groups of 4 only). Measured: benchmarks/tune_triton.py (GPU),
    RESULTS.md (CPU).
    """
    R = pre.shape[0]
    cand, cols = pre, None  # candidates [R, n'] and their columns in pre
    for G in (32, 4):
        n = cand.shape[1]
        if n % G or n < 4 * k * G:
            continue  # too few groups at this size: try the finer level
        w = n // G  # groups; group j holds columns j, j + w, j + 2w, ...
        groups = cand.view(R, G, w).amax(1).topk(k, 1, sorted=False).indices  # [R, k]
        c = (groups[:, None, :] + torch.arange(G, device=pre.device)[:, None] * w).view(R, G * k)
        cand = cand.gather(1, c)
        cols = c if cols is None else cols.gather(1, c)
    vals, j = cand.topk(k, 1, sorted=False)
    return vals, (j if cols is None else cols.gather(1, j))
