"""Matching pursuit (saekit.kernels.pursuit) against the plain unrolled loop, and its invariants."""

import math

import pytest
import torch

from saekit.kernels import sparse_decode
from saekit.kernels.pursuit import distinct, gram, mp_pursue, mp_reference, mp_select, mp_values


def dictionary(m, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, d, generator=g, dtype=dtype)
    return W / W.norm(dim=1, keepdim=True)


def inputs(B, d, seed=1, dtype=torch.float64):
    return torch.randn(B, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(vals, idx, m):
    return torch.zeros(vals.shape[0], m, dtype=vals.dtype).scatter_add(1, idx, vals)


@pytest.mark.parametrize("rows", [1, 7, 128])
def test_codes_equal_the_plain_pursuit(rows):
    """Same latents and values as the unrolled loop, whatever the block of rows; each latent once."""
    W, x = dictionary(40, 8), inputs(50, 8)  # 40 atoms in 8 dims: coherent, so latents repeat
    k = 12
    z, _ = mp_reference(x, W, k)
    vals, idx = distinct(*reversed(mp_pursue(x, W, k, rows=rows)))
    torch.testing.assert_close(dense(vals, idx, 40), z, rtol=0, atol=1e-12)
    live = vals != 0
    assert all(len(set(i[v].tolist())) == int(v.sum()) for i, v in zip(idx, live, strict=True))
    assert bool((z != 0).sum(1).lt(k).any()), "the case should include repeated picks"
    assert (vals >= 0).all()


def test_fp32_selection_matches_fp32_reference():
    """The Gram-updated correlations pick the plain loop's latents in fp32 too (no drift over k)."""
    W, x = dictionary(512, 64, dtype=torch.float32), inputs(64, 64, dtype=torch.float32)
    z, _ = mp_reference(x, W, 32)
    vals, idx = mp_select(x, W, 32)
    got = dense(vals, idx, 512)
    assert torch.equal(got != 0, z != 0)
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-5)


def test_residual_orthogonal_to_last_row_and_values_are_the_solve():
    W, x = dictionary(30, 6), inputs(20, 6)
    order, coeffs = mp_pursue(x, W, 5)
    assert (order >= 0).all()
    vals, idx = mp_values(x, W, order)
    r = x - sparse_decode(vals, idx, W)
    last = W[order[:, -1]]
    torch.testing.assert_close((r * last).sum(1), torch.zeros(20, dtype=x.dtype), rtol=0, atol=1e-12)
    torch.testing.assert_close(vals, distinct(coeffs, order)[0], rtol=0, atol=1e-12)


def test_gradients_match_autograd_through_the_plain_loop():
    """mp_values (given the order) has the gradients of the unrolled loop, for x and every row."""
    W0, x0 = dictionary(12, 5), inputs(6, 5)
    k = 4
    order, _ = mp_pursue(x0, W0, k)
    probe = inputs(6, 5, seed=7)

    def loss(z_dense, W):  # a reconstruction-like loss touching every coefficient and row
        return ((z_dense @ W - probe) ** 2).sum() + (z_dense**3).sum()

    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    z, _ = mp_reference(x, W, k)
    ref = torch.autograd.grad(loss(z, W), (x, W))
    x, W = x0.clone().requires_grad_(), W0.clone().requires_grad_()
    got = torch.autograd.grad(loss(dense(*mp_values(x, W, order), 12), W), (x, W))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert (got[1].abs().sum(1) > 0).sum() >= len(set(order.flatten().tolist()))


def test_gradcheck_mp_values():
    W, x = dictionary(9, 4), inputs(3, 4)
    order, _ = mp_pursue(x, W, 3)
    order[0, 2] = -1  # a row that stopped early: its last step is padding
    f = lambda x, W: mp_values(x, W, order)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x.requires_grad_(), W.requires_grad_()))


def test_more_steps_lower_the_error_monotonically():
    W, x = dictionary(64, 16, dtype=torch.float32), inputs(100, 16, dtype=torch.float32)
    errs = []
    for k in range(1, 25):
        vals, idx = mp_select(x, W, k)
        errs.append((x - sparse_decode(vals, idx, W)).norm(dim=1))
    errs = torch.stack(errs)  # [k, B]
    assert (errs[1:] <= errs[:-1] + 1e-5).all()
    assert (errs[-1] < 0.5 * errs[0]).all()


def test_threshold_stops_a_row_once_its_residual_is_small():
    W, x = dictionary(40, 8), inputs(50, 8)
    thr = 0.8
    order, _ = mp_pursue(x, W, 30, threshold=thr)
    vals, idx = mp_select(x, W, 30, threshold=thr)
    z, r = mp_reference(x, W, 30, threshold=thr)
    torch.testing.assert_close(dense(vals, idx, 40), z, rtol=0, atol=1e-12)
    steps = (order >= 0).sum(1)
    assert (r.norm(dim=1) < thr).all() and (steps < 30).all()
    for b in range(len(x)):  # the row went on while its residual was at or above the threshold
        v, i = mp_select(x[b : b + 1], W, int(steps[b]) - 1)
        assert (x[b] - sparse_decode(v, i, W)[0]).norm() >= thr
    small = x[:3] / x[:3].norm(dim=1, keepdim=True) * 0.5  # below the threshold from the start
    assert (mp_select(small, W, 5, threshold=thr)[0] == 0).all()


def test_rows_without_a_positive_correlation_stop():
    W = torch.eye(3, dtype=torch.float64)
    x = torch.tensor([[-1.0, -2.0, -0.5], [3.0, -1.0, 0.0], [2.0, 1.0, 0.5]], dtype=torch.float64)
    order, coeffs = mp_pursue(x, W, 3)
    assert order.tolist() == [[-1, -1, -1], [0, -1, -1], [0, 1, 2]]
    assert coeffs.tolist() == [[0, 0, 0], [3, 0, 0], [2, 1, 0.5]]
    vals, idx = mp_select(x, W, 3)
    assert dense(vals, idx, 3).tolist() == [[0, 0, 0], [3, 0, 0], [2, 1, 0.5]]
    z, _ = mp_reference(x, W, 3)
    assert torch.equal(dense(vals, idx, 3), z)


def test_gram_is_reused():
    W, x = dictionary(20, 5), inputs(10, 5)
    G = gram(W)
    assert torch.equal(mp_select(x, W, 4, G=G)[0], mp_select(x, W, 4)[0])
    torch.testing.assert_close(G.diagonal(), torch.ones(20, dtype=W.dtype))
    assert math.isclose(float(G[3, 5]), float(W[3] @ W[5]))
