"""Rotary embeddings (GPT-NeoX half rotation) of a fused QKV projection, as one autograd op.

``rope_qkv`` splits a ``[B, L, 3, H, D]`` projection output into rotated q, rotated k and v. Its forward is
PyTorch (:func:`apply_rope`; torch.compile fuses it into one pass); its backward is one ``triton_op`` on CUDA
(the kernel of :mod:`.rope_triton`, whose docstring carries the math), which writes the projection's whole
gradient, and :func:`rope_qkv_backward_reference` elsewhere (and as the test reference).
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from . import rope_triton as kernels
from .triton_utils import runs_on


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotates x ``[B, L, H, D]`` by position: ``x cos + rotate_half(x) sin`` with ``rotate_half(x) = [-x2, x1]``;
    ``rope`` is ``[2, >= L, D]`` (cos, sin), rounded to x's dtype."""
    cos, sin = (r[: x.shape[1], None, :].to(x.dtype) for r in rope)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_qkv_backward_reference(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """PyTorch twin of the backward kernel: ``[B, L, 3, H, D]`` in dq's dtype, math in fp32 (float64 stays).
    Reads the tables' first halves, as the kernel: each row of ``rope`` repeats them."""
    ftype = torch.promote_types(dq.dtype, torch.float32)
    half = dq.shape[-1] // 2
    cos, sin = (r[: dq.shape[1], None, :half].to(dq.dtype).to(ftype) for r in rope)

    def rotate_back(dy: torch.Tensor) -> torch.Tensor:
        dy1, dy2 = dy.to(ftype).split(half, dim=-1)
        return torch.cat([dy1 * cos + dy2 * sin, dy2 * cos - dy1 * sin], dim=-1).to(dq.dtype)

    return torch.stack([rotate_back(dq), rotate_back(dk), dv.to(dq.dtype)], dim=2)


@triton_op("dlm_kernels::rope_qkv_bwd", mutates_args=())
def rope_qkv_bwd(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Gradient ``[B, L, 3, H, D]`` of the projection output, from those of rotated q, rotated k and v."""
    if not runs_on(dq.device) or dq.dtype == torch.float64:
        return rope_qkv_backward_reference(dq, dk, dv, rope)
    return kernels.rope_qkv_backward(dq, dk.to(dq.dtype), dv.to(dq.dtype), rope)


class _RopeQKV(torch.autograd.Function):
    """Autograd view: forward in PyTorch, backward the op above (nothing saved but the tables)."""

    @staticmethod
    def forward(ctx, qkv, rope):
        q, k, v = qkv.unbind(dim=2)
        ctx.save_for_backward(rope)
        return apply_rope(q, rope), apply_rope(k, rope), v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        (rope,) = ctx.saved_tensors
        return rope_qkv_bwd(dq, dk, dv, rope), None


def rope_qkv(qkv: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, k, v)``, each ``[B, L, H, D]``, of a fused projection output ``qkv [B, L, 3, H, D]``: q and k rotated
    by position (:func:`apply_rope`), v as is (a view of ``qkv``).

    Args:
        qkv: the projection output viewed as ``[B, L, 3, H, D]``, ``D`` even.
        rope: ``[2, >= L, D]`` cos and sin tables whose rows repeat their first half, as GPT-NeoX's
            (``dlm_titan.models.attention.rope_cache``); not differentiated.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[-1] % 2:
        raise ValueError(f"rope_qkv: qkv must be [B, L, 3, H, D] with D even, got {tuple(qkv.shape)}")
    if rope.dim() != 3 or rope.shape[0] != 2 or rope.shape[1] < qkv.shape[1] or rope.shape[2] != qkv.shape[-1]:
        raise ValueError(f"rope_qkv: rope must be [2, >= {qkv.shape[1]}, {qkv.shape[-1]}], got {tuple(rope.shape)}")
    return _RopeQKV.apply(qkv, rope.detach())
