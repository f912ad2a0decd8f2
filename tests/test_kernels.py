"""Triton sparse kernels against the torch reference (under TRITON_INTERPRET=1 without a GPU),
and gradient checks of the autograd functions built on them."""

import os

import pytest
import torch

import saekit.kernels as kernels
from saekit.kernels import selected_preacts, sparse_decode, torch_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (conftest sets it)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is an extra (saekit[gpu], and in saekit[dev] for these tests)")

from saekit.kernels import triton_ops  # noqa: E402  (after the interpreter check)


def sparse_code(B, k, m, seed, used=None, pad_from=None, repeat=False):
    """A [B, k] code: indices drawn from the first `used` latents, values zeroed from slot
    `pad_from` on in every other row (BatchTopK padding), optionally a repeated index per row."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, used or m, (B, k), generator=g)
    vals = torch.rand(B, k, generator=g) + 0.1
    if repeat:
        idx[:, -1] = idx[:, 0]
    if pad_from is not None:
        vals[::2, pad_from:] = 0
    return vals, idx


# (B, k, d, m, code options): B not a multiple of the 16-row block, d not of the 128-column
# block, k = 1, repeated indices in a row, latents never selected, zero-padded rows.
CASES = {
    "plain": (37, 5, 200, 64, {}),
    "k1": (19, 1, 48, 16, {}),
    "repeated": (23, 4, 130, 32, {"repeat": True}),
    "unused_latents": (21, 3, 64, 80, {"used": 10}),
    "padded": (33, 6, 96, 40, {"pad_from": 2}),
}


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    B, k, d, m, opts = CASES[request.param]
    vals, idx = sparse_code(B, k, m, seed=len(request.param), **opts)
    g = torch.Generator().manual_seed(1)
    W, G = torch.randn(m, d, generator=g), torch.randn(B, d, generator=g)
    return vals, idx, W, G


def compare(fn: str, *args, dtype: torch.dtype) -> torch.Tensor:
    """triton_ops.fn on float args cast to `dtype` vs torch_ops.fn in fp32 on the same values."""
    cast = [a.to(DEVICE, dtype) if torch.is_tensor(a) and a.is_floating_point() else
            a.to(DEVICE) if torch.is_tensor(a) else a for a in args]
    ref = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in cast]
    got, want = getattr(triton_ops, fn)(*cast), getattr(torch_ops, fn)(*ref)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=3e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    return got


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


@DTYPES
def test_gather_sum_matches_torch(case, dtype):
    vals, idx, W, _ = case
    compare("gather_sum", vals, idx, W, dtype=dtype)


@DTYPES
def test_gather_dot_matches_torch(case, dtype):
    _, idx, W, G = case
    compare("gather_dot", idx, W, G, dtype=dtype)


@DTYPES
def test_scatter_outer_matches_torch(case, dtype):
    vals, idx, W, G = case
    m = W.shape[0]
    got = compare("scatter_outer", vals, idx, G, m, dtype=dtype)
    never = torch.ones(m, dtype=torch.bool)
    never[idx.flatten()] = False
    assert (got[never.to(got.device)] == 0).all()


@DTYPES
def test_decode_backward_matches_torch(case, dtype):
    vals, idx, W, G = case
    vals, W, G = (t.to(DEVICE, dtype) for t in (vals, W, G))
    idx = idx.to(DEVICE)
    got = triton_ops.decode_backward(vals, idx, W, G)
    want = torch_ops.decode_backward(vals.float(), idx, W.float(), G.float())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=3e-2)
    for g, w in zip(got, want, strict=False):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, **tol)


def test_decode_backward_is_both_products_and_skips_padding(case):
    """Fused backward = gather_dot (zeroed where vals is 0) and scatter_outer, on both paths."""
    vals, idx, W, G = (t.to(DEVICE) for t in case)
    for ops in (torch_ops, triton_ops):
        grad_vals, grad_W = ops.decode_backward(vals, idx, W, G)
        torch.testing.assert_close(grad_vals, ops.gather_dot(idx, W, G) * (vals != 0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_W, ops.scatter_outer(vals, idx, G, W.shape[0]), rtol=1e-5, atol=1e-5)
        dense = torch.zeros(len(idx), W.shape[0], device=DEVICE).scatter_add_(1, idx, vals)
        torch.testing.assert_close(grad_W, dense.T @ G, rtol=1e-4, atol=1e-4)  # the dense definition


def test_kernels_match_float64(case):
    """fp32 Triton results sit at fp32 rounding of the float64 torch reference (relative norm)."""
    dev = [t.to(DEVICE) for t in case]
    ref = [t.double() if t.is_floating_point() else t for t in case]
    got = [triton_ops.gather_sum(dev[0], dev[1], dev[2]), *triton_ops.decode_backward(*dev)]
    want = [torch_ops.gather_sum(ref[0], ref[1], ref[2]), *torch_ops.decode_backward(*ref)]
    for g, w in zip(got, want, strict=False):
        assert float((g.cpu().double() - w).norm() / w.norm()) < 1e-5


def test_bf16_inputs_accumulate_in_fp32():
    """256 + 254 * 1: a bf16 running sum sticks at 256 (its spacing there is 2); fp32 gives 510."""
    n, bf = 255, dict(device=DEVICE, dtype=torch.bfloat16)
    terms = torch.ones(n, **bf)
    terms[0] = 256
    ones = torch.ones(n, 1, **bf)
    same = torch.zeros(1, n, dtype=torch.long, device=DEVICE)
    assert triton_ops.gather_sum(terms[None], same, ones[:1]).item() == 510
    assert triton_ops.gather_dot(same[:, :1], ones.T, terms[None]).item() == 510
    assert triton_ops.scatter_outer(terms[:, None], same.T, ones, 1).item() == 510


def preacts(x, b_dec, W_enc, b_enc, idx):
    return ((x - b_dec) @ W_enc.T + b_enc).gather(1, idx)


def sae_like_loss(x, b_dec, W_enc, b_enc, W_dec, idx):
    """Encode at fixed selected latents, decode sparsely, squared error: both autograd functions."""
    with torch.no_grad():
        pre = preacts(x, b_dec, W_enc, b_enc, idx)
    vals = selected_preacts(x, b_dec, W_enc, b_enc, idx, pre).relu()
    return (sparse_decode(vals, idx, W_dec) + b_dec - x).pow(2).sum()


def params(B=9, d=7, m=12, k=3, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x, b_dec = torch.randn(B, d, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    W_enc, W_dec = torch.randn(m, d, generator=g, dtype=dtype), torch.randn(m, d, generator=g, dtype=dtype)
    b_enc = torch.randn(m, generator=g, dtype=dtype)
    idx = preacts(x, b_dec, W_enc, b_enc, torch.arange(m).expand(B, m)).topk(k, dim=1).indices
    idx[0, 1] = idx[0, 0]  # a repeated index
    return [t.to(device).requires_grad_() for t in (x, b_dec, W_enc, b_enc, W_dec)] + [idx.to(device)]


def test_gradcheck_sparse_decode():
    _, _, _, _, W, idx = params()
    vals = torch.rand(idx.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sparse_decode, (vals, idx, W))


def test_gradcheck_selected_preacts():
    x, b_dec, W_enc, b_enc, _, idx = params()

    def f(x, b_dec, W_enc, b_enc):  # the selection's values follow the inputs, as in encode()
        with torch.no_grad():
            pre = preacts(x, b_dec, W_enc, b_enc, idx)
        return selected_preacts(x, b_dec, W_enc, b_enc, idx, pre)

    assert torch.autograd.gradcheck(f, (x, b_dec, W_enc, b_enc))


def test_autograd_grads_same_with_triton_backend(monkeypatch):
    args = params(B=21, d=40, m=24, k=4, dtype=torch.float32, device=DEVICE)
    grads = {}
    for name, ops in (("torch", torch_ops), ("triton", triton_ops)):
        monkeypatch.setattr(kernels, "backend", lambda t, ops=ops: ops)
        for a in args[:5]:
            a.grad = None
        sae_like_loss(*args).backward()
        grads[name] = [a.grad.clone() for a in args[:5]]
    for g_torch, g_triton in zip(grads["torch"], grads["triton"], strict=False):  # fp32 rounding of sums of large terms
        torch.testing.assert_close(g_triton, g_torch, rtol=1e-5, atol=1e-5 * float(g_torch.abs().max()))


def test_unknown_kernel_choice_is_refused(monkeypatch):
    from saekit.errors import SaekitError

    monkeypatch.setenv("SAEKIT_KERNELS", "trition")
    with pytest.raises(SaekitError, match="SAEKIT_KERNELS"):
        sparse_decode(torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.long), torch.ones(3, 4))
