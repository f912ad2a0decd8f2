"""Sparse-code products with autograd, dispatched to Triton on CUDA and to torch elsewhere.
Triton is an optional extra (`saekit[gpu]`): nothing on the CPU path imports it.

`sparse_decode` and `selected_preacts` are the only places a training step touches the
latent dimension after the encoder matmul: both cost O(B * k * d), never O(B * m * d).
Set `SAEKIT_KERNELS=torch` to force the torch path on a GPU (for comparison or debugging).
Matching pursuit (the `mp` architecture) has its own selection and solve: `saekit.kernels.pursuit`.
"""

import os
from types import ModuleType

import torch

from saekit.errors import SaekitError
from saekit.kernels import torch_ops
from saekit.kernels.topk import row_topk

__all__ = ["backend", "cat_padded", "row_topk", "selected_preacts", "sparse_decode"]


def backend(t: torch.Tensor) -> ModuleType:
    """The primitive set for tensors on `t`'s device: Triton for CUDA, torch otherwise."""
    choice = os.environ.get("SAEKIT_KERNELS", "auto")
    if choice not in ("auto", "torch"):
        raise SaekitError(f"SAEKIT_KERNELS must be 'auto' or 'torch', got {choice!r}")
    if t.is_cuda and choice == "auto":
        try:
            from saekit.kernels import triton_ops
        except ImportError:
            raise SaekitError("CUDA tensors use saekit's Triton kernels, and triton is not installed: "
                              "pip install 'saekit[gpu]' (or set SAEKIT_KERNELS=torch)") from None
        return triton_ops
    return torch_ops


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, vals, idx, W):
        ctx.save_for_backward(vals, idx, W)
        return backend(W).gather_sum(vals, idx, W)

    @staticmethod
    def backward(ctx, grad_out):
        vals, idx, W = ctx.saved_tensors
        ops = backend(W)
        need_vals, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_vals = grad_W = None
        if need_vals and need_W:  # one pass over the latent-sorted pairs for both
            grad_vals, grad_W = ops.decode_backward(vals, idx, W, grad_out)
        elif need_vals:
            grad_vals = ops.gather_dot(idx, W, grad_out).masked_fill(vals == 0, 0)
        elif need_W:
            grad_W = ops.scatter_outer(vals, idx, grad_out, W.shape[0])
        return grad_vals, None, grad_W


class _SelectedPreacts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, idx, pre_vals):
        xc = x - b_dec
        ctx.save_for_backward(xc, W_enc, idx)
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc, idx = ctx.saved_tensors
        ops = backend(W_enc)
        m = W_enc.shape[0]
        # per-latent sum of the k gradients of every token: the b_enc gradient, and (times
        # W_enc) the b_dec gradient, without the [B, d] input gradient.
        grad_b = torch.zeros(m, dtype=grad.dtype, device=grad.device)
        grad_b.index_add_(0, idx.reshape(-1), grad.reshape(-1))
        grad_x = ops.gather_sum(grad, idx, W_enc) if ctx.needs_input_grad[0] else None
        grad_b_dec = -(grad_b @ W_enc) if ctx.needs_input_grad[1] else None
        grad_W = ops.scatter_outer(grad, idx, xc, m) if ctx.needs_input_grad[2] else None
        return grad_x, grad_b_dec, grad_W, grad_b if ctx.needs_input_grad[3] else None, None, None


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """`out[b] = sum_j vals[b,j] * W[idx[b,j]]` -> [B, d]; differentiable in vals and W.

    A zero value is padding and gets gradient 0 (exact for post-ReLU codes)."""
    return _SparseDecode.apply(vals, idx, W)


def selected_preacts(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor,
    idx: torch.Tensor, pre_vals: torch.Tensor,
) -> torch.Tensor:
    """Attach sparse gradients to encoder pre-activations picked by a (no-grad) selection.

    `pre_vals[b,j]` must equal `(x[b] - b_dec) . W_enc[idx[b,j]] + b_enc[idx[b,j]]`; the
    selection computed it already, so the forward is a copy and the backward touches only
    the k selected rows of W_enc per token.
    """
    return _SelectedPreacts.apply(x, b_dec, W_enc, b_enc, idx, pre_vals)


def cat_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row blocks of zero-padded codes `(values, ids) [r, w]` stacked into one, padded with zeros
    to the widest block."""
    width = max(v.shape[1] for v, _ in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
    return torch.cat([pad(v) for v, _ in parts]), torch.cat([pad(i) for _, i in parts])
