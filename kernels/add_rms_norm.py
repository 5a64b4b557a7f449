"""Residual add + RMSNorm as one autograd op: ``h = x + delta``, ``y = rmsnorm(h) * w``, returning both.

A transformer block adds each branch's output to the residual stream and normalises the sum for the next branch;
doing both in one op lets a model hand its last branch output to the next block, whose first norm adds it (see
``dlm_titan.models.transformer``). On CUDA the op runs the Triton kernels of :mod:`.add_rms_norm_triton`, whose
docstring carries the math; elsewhere (and as the test reference) its PyTorch twin
:func:`add_rms_norm_reference`. Forward and backward are ``triton_op`` custom ops: torch.compile traces into them,
and Inductor launches the kernels from its own generated code as it launches the kernels it generates. (As opaque
custom ops, their host-side dispatch at every call made 170M training 5-8% slower on an H100, where the host is
nearly the limit.)
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from . import add_rms_norm_triton as kernels
from .triton_utils import runs_on


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch twin of the forward kernel: ``(h, y, rstd)``, math in fp32 (float64 inputs stay float64)."""
    h = x if delta is None else (x + delta).to(x.dtype)
    hf = h.to(torch.promote_types(h.dtype, torch.float32))
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    y = (hf * rstd[..., None] * weight.to(hf.dtype)).to(out_dtype)
    return h, y, rstd


def add_rms_norm_backward_reference(
    dy: torch.Tensor, dh_in: torch.Tensor | None, h: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch twin of the backward kernel: ``(dh, dw)`` in the math dtype (see the Triton module's docstring)."""
    ftype = rstd.dtype
    xh = h.to(ftype) * rstd[..., None]
    g = dy.to(ftype) * weight.to(ftype)
    dh = rstd[..., None] * (g - xh * (g * xh).mean(-1, keepdim=True))
    if dh_in is not None:
        dh = dh + dh_in.to(ftype)
    dw = (dy.to(ftype) * xh).reshape(-1, h.shape[-1]).sum(0)
    return dh, dw


def _uses_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take ``x`` (float64, e.g. in tests, always takes the reference)."""
    return runs_on(x.device) and x.dtype != torch.float64


@triton_op("dlm_kernels::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, y, rstd)``; ``h`` is empty when ``delta`` is None (then ``h`` is ``x``)."""
    if not _uses_kernels(x):
        h, y, rstd = add_rms_norm_reference(x, delta, weight, eps, out_dtype)
        return (x.new_empty(0) if delta is None else h), y, rstd
    delta = None if delta is None else delta.contiguous()
    return kernels.add_rms_norm_forward(x.contiguous(), delta, weight.contiguous(), eps, out_dtype)


@triton_op("dlm_kernels::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(
    dy: torch.Tensor, dh_in: torch.Tensor | None, h: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
    ddelta_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, ddelta, dw)``: ``dx`` in h's dtype, ``ddelta`` the same gradient in ``ddelta_dtype`` (empty when
    None), ``dw`` in the weight's dtype."""
    if not _uses_kernels(h):
        dh, dw = add_rms_norm_backward_reference(dy, dh_in, h, rstd, weight)
        ddelta = h.new_empty(0) if ddelta_dtype is None else dh.to(ddelta_dtype, copy=True)  # never dx itself
        return dh.to(h.dtype), ddelta, dw.to(weight.dtype)
    dh_in = None if dh_in is None else dh_in.contiguous()
    dx, ddelta, dw = kernels.add_rms_norm_backward(
        dy.contiguous(), dh_in, h.contiguous(), rstd.contiguous(), weight.contiguous(), h.dtype, ddelta_dtype
    )
    return dx, ddelta, dw.to(weight.dtype)


class _AddRMSNorm(torch.autograd.Function):
    """Autograd view of the two ops. Returns ``(h, y)`` given ``delta``, else ``y``."""

    @staticmethod
    def forward(ctx, x, delta, weight, eps, out_dtype):
        h, y, rstd = add_rms_norm_fwd(x, delta, weight, eps, out_dtype)
        ctx.has_delta = delta is not None
        ctx.save_for_backward(h if ctx.has_delta else x, rstd, weight)
        # d delta equals dx; a second copy is written only when the dtypes differ (fp32 stream, bf16 branch).
        ctx.ddelta_dtype = delta.dtype if ctx.has_delta and delta.dtype != x.dtype else None
        return (h, y) if ctx.has_delta else y

    @staticmethod
    def backward(ctx, *grads):
        # Kept to what torch 2.11's Dynamo was seen to trace on the GPU (no once_differentiable, no
        # set_materialize_grads): an unused h (the final norm's, outside the compiled blocks) brings a zero
        # gradient, which costs one extra read of it.
        dh_in, dy = grads if ctx.has_delta else (None, grads[0])
        h, rstd, weight = ctx.saved_tensors
        dx, ddelta, dw = add_rms_norm_bwd(dy, dh_in, h, rstd, weight, ctx.ddelta_dtype)
        if not ctx.has_delta:
            ddelta = None
        elif ctx.ddelta_dtype is None:
            ddelta = dx
        return dx, ddelta, dw, None, None


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, y)`` with ``h = x + delta`` (in x's dtype; ``x`` itself when ``delta`` is None) and
    ``y = h / rms(h) * weight`` over the last dim, in ``out_dtype`` (default x's dtype).

    Args:
        x: the residual stream ``[..., D]``.
        delta: a branch output to add first, same shape, or None.
        weight: ``[D]`` norm weight.
        eps: added to the mean square.
        out_dtype: dtype of ``y`` (bf16 when it feeds a bf16 GEMM).
    """
    dim = x.shape[-1]
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_rms_norm: delta has shape {tuple(delta.shape)}, x {tuple(x.shape)}; they must match")
    if weight.shape != (dim,):
        raise ValueError(f"add_rms_norm: weight has shape {tuple(weight.shape)}, expected ({dim},)")
    out_dtype = out_dtype or x.dtype
    if delta is None:
        return x, _AddRMSNorm.apply(x, None, weight, eps, out_dtype)
    h, y = _AddRMSNorm.apply(x, delta, weight, eps, out_dtype)
    return h, y
