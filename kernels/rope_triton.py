"""Triton kernel of the rotary-embedding backward of a fused QKV projection.

Forward (GPT-NeoX half rotation over a head row of ``D`` features, ``x1, x2`` its halves, ``c, s`` the cos and
sin of its position's frequencies, which both halves of a row share, rounded to the activations' dtype)::

    y1 = x1 c - x2 s,   y2 = x2 c + x1 s            (q and k; v passes through)

Backward, given ``dy`` of rotated q and k and ``dv``::

    dx1 = dy1 c + dy2 s,   dx2 = dy2 c - dy1 s

written, with ``dv`` copied, straight into the gradient of the projection's output ``[B, L, 3, H, D]`` (slots q,
k, v), so the three gradients need no separate stack pass. One program per ``BLOCK_T`` positions of one (sequence,
head); the tables' first halves are read (their rows repeat: ``[cos(a), cos(a)]``); math in fp32, one rounding per
output; offsets int64; no atomics. Inductor's kernel for the same graph (a 1-D pass with masked loads from all
three slots per element) took 67 us a block at 170M on an H200 (~2.2 TB/s); a first version of this one (tables
rounded beforehand) took 39 us there and made 170M training 0.6-1.3% faster, 1028M 0.85% (November 2026).
Pure-PyTorch twin: :func:`dlm_kernels.rope.rope_qkv_backward_reference`.
"""

from __future__ import annotations

import torch
from torch.library import wrap_triton

from .triton_utils import next_pow2, tl, triton

if triton is not None:

    @triton.jit
    def _rope_qkv_bwd_kernel(
        dq_ptr, dk_ptr, dv_ptr, rope_ptr, out_ptr, L, H, half,
        sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, rope_table, rope_t,
        BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        bh = tl.program_id(0)  # axis 0: no 65535 limit on B x H; neighbouring programs share positions
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        j = tl.arange(0, BLOCK_HALF)
        mask = (t < L)[:, None] & (j < half)[None, :]
        dtype = out_ptr.dtype.element_ty
        # cos and sin of the first half (the second repeats it), rounded to the activations' dtype as the
        # forward rounds them, in fp32
        table = rope_ptr + t[:, None] * rope_t + j[None, :]
        c = tl.load(table, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(table + rope_table, mask=mask, other=0.0).to(tl.float32)
        c = c.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        s = s.to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        d = 2 * half
        out = out_ptr + (b * L + t)[:, None] * (3 * H * d) + h * d + j[None, :]
        for slot in tl.static_range(2):
            if slot == 0:
                src = dq_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + j[None, :]
            else:
                src = dk_ptr + b * sk_b + t[:, None] * sk_t + h * sk_h + j[None, :]
            dy1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
            dy2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
            dst = out + slot * H * d
            tl.store(dst, (dy1 * c + dy2 * s).to(dtype, fp_downcast_rounding="rtne"), mask=mask)
            tl.store(dst + half, (dy2 * c - dy1 * s).to(dtype, fp_downcast_rounding="rtne"), mask=mask)
        src = dv_ptr + b * sv_b + t[:, None] * sv_t + h * sv_h + j[None, :]
        dst = out + 2 * H * d
        tl.store(dst, tl.load(src, mask=mask, other=0.0), mask=mask)
        tl.store(dst + half, tl.load(src + half, mask=mask, other=0.0), mask=mask)


def rope_qkv_backward(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rope: torch.Tensor, block_t: int = 32, num_warps: int = 4
) -> torch.Tensor:
    """Gradient ``[B, L, 3, H, D]`` of a QKV projection output, from the gradients of rotated q, k and of v.

    Args:
        dq, dk, dv: ``[B, L, H, D]`` of one dtype, any strides (rows not unit-stride in ``D`` are copied first).
        rope: ``[2, >= L, D]`` cos and sin tables (any float dtype) whose rows repeat their first half.
        block_t: positions per program.
        num_warps: warps per program.
    """
    B, L, H, D = dq.shape
    out = torch.empty((B, L, 3, H, D), dtype=dq.dtype, device=dq.device)
    if out.numel() == 0:
        return out
    dq, dk, dv = (x if x.stride(-1) == 1 else x.contiguous() for x in (dq, dk, dv))
    rope = rope if rope.stride(-1) == 1 else rope.contiguous()
    if L > 65535 * block_t:
        raise ValueError(f"rope_qkv_backward: {L} positions exceed the grid's {65535 * block_t} (65535 x block_t)")
    half = D // 2
    wrap_triton(_rope_qkv_bwd_kernel)[(B * H, triton.cdiv(L, block_t))](
        dq, dk, dv, rope, out, L, H, half, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        rope.stride(0), rope.stride(1), BLOCK_T=block_t, BLOCK_HALF=next_pow2(half), num_warps=num_warps,
    )
    return out
