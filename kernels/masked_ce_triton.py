"""Triton kernels of the fused masked-diffusion linear cross-entropy.

Math. Let the M masked rows be gathered into ``X [M, d]`` with targets ``y [M]`` and fp32 weights
``w [M]`` (``w_i = 1 / (p_i * global_token_count)``), and let ``Z = X W^T`` (``[M, V]``) be their logits.
Then, with the upstream gradient ``g`` of the scalar loss::

    lse_i   = log sum_j exp(Z_ij)                           (max-shifted, exp2 based, fp32)
    loss    = sum_i w_i * (lse_i - Z_{i, y_i})
    G_ij    = d loss / d Z_ij = w_i * (softmax(Z_i)_j - [j == y_i])
    dX      = g * G W        ([M, d], scattered back to the masked rows of dH; other rows are exactly 0)
    dW      = g * G^T X      ([V, d], accumulated in fp32 over row chunks)

The loss is a scalar, so G is built in the forward pass chunk by chunk and nothing logits-sized is kept for
backward; ``g`` is applied in backward by :func:`scale_cast`. ``w_i`` multiplies the whole row of G before the
``G^T X`` product, which is the only correct place for a per-token weight.

:func:`ce_rows` runs one program per logits row. It reads the row once (``V <= BLOCK_V``: the row lives in
registers) or twice (tiled: an online max / sum-exp pass with scalar state, then a gradient pass that mostly
hits L2), writes
``w_i (lse_i - Z_{i, y_i})`` to a per-row loss buffer (every row is written, so a compiled graph never reads
garbage) and overwrites the row with ``G_i`` in the logits' dtype. The target logit is read before the row is
overwritten; ``p_y - 1`` is formed in fp32. Offsets are int64. Float atomics are never used: the loss is a
``torch.sum`` of the row buffer and dW comes from GEMMs, so results are deterministic.

The module imports without triton (see :mod:`dlm_kernels.triton_utils`: whether the kernels exist and where
they run).
"""

from __future__ import annotations

import torch

from .triton_utils import next_pow2, tl, triton, warps_for

if triton is not None:
    # Globals read inside @triton.jit must be constexpr.
    _LOG2E = tl.constexpr(1.4426950408889634)
    _LN2 = tl.constexpr(0.6931471805599453)

    @triton.jit
    def _ce_rows_kernel(
        z_ptr,
        stride_z,
        y_ptr,
        w_ptr,
        loss_ptr,
        V,
        BLOCK_V: tl.constexpr,
        SINGLE_TILE: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        y = tl.load(y_ptr + row)
        w = tl.load(w_ptr + row)
        cols = tl.arange(0, BLOCK_V)
        # A target outside [0, V) is a caller bug; masking the load keeps it from reading foreign memory.
        y_ok = (y >= 0) & (y < V)
        z_y = tl.load(z_row + y, mask=y_ok, other=0.0).to(tl.float32)
        if SINGLE_TILE:
            in_row = cols < V
            z = tl.load(z_row + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            m = tl.max(z, axis=0)
            s = tl.sum(tl.exp2((z - m) * _LOG2E), axis=0)
            lse = m + tl.log2(s) * _LN2
            tl.store(loss_ptr + row, w * (lse - z_y))
            if WRITE_GRAD:
                p = tl.exp2((z - lse) * _LOG2E)
                grad = w * (p - tl.where(cols == y, 1.0, 0.0))
                tl.store(
                    z_row + cols, grad.to(z_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=in_row
                )
        else:
            # Running max and sum-exp as scalars, updated once per tile: per-lane running vectors would cost
            # registers (fewer programs in flight per SM) and a second exp2 per element to rescale them. The
            # first tile is full (V > BLOCK_V), so m is finite after it and exp2(-inf) = 0 rescales s = 0.
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK_V):
                c = start + cols
                z = tl.load(z_row + c, mask=c < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(z, axis=0))
                s = s * tl.exp2((m - m_new) * _LOG2E) + tl.sum(tl.exp2((z - m_new) * _LOG2E), axis=0)
                m = m_new
            lse = m + tl.log2(s) * _LN2
            tl.store(loss_ptr + row, w * (lse - z_y))
            if WRITE_GRAD:
                for start in range(0, V, BLOCK_V):
                    c = start + cols
                    in_row = c < V
                    z = tl.load(z_row + c, mask=in_row, other=float("-inf")).to(tl.float32)
                    p = tl.exp2((z - lse) * _LOG2E)
                    grad = w * (p - tl.where(c == y, 1.0, 0.0))
                    tl.store(
                        z_row + c, grad.to(z_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=in_row
                    )

    @triton.jit
    def _scatter_rows_kernel(src_ptr, row_of_ptr, dst_ptr, scale_ptr, d, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
        in_row = cols < d
        src_row = tl.load(row_of_ptr + row)
        scale = tl.load(scale_ptr).to(tl.float32)
        # Rows without a source (src_row = -1) load nothing and store zeros.
        limit = tl.where(src_row >= 0, d, 0)
        x = tl.load(src_ptr + src_row * d + cols, mask=cols < limit, other=0.0).to(tl.float32)
        tl.store(
            dst_ptr + row * d + cols, (x * scale).to(dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=in_row
        )

    @triton.jit
    def _scale_cast_kernel(src_ptr, dst_ptr, scale_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < n
        scale = tl.load(scale_ptr).to(tl.float32)
        x = tl.load(src_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        tl.store(
            dst_ptr + offs,
            (x * scale).to(dst_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
            mask=in_range,
        )


# Rows up to this width are kept in registers by one program; wider rows are walked in tiles of this width
# (the second pass mostly hits L2). Measured at V=32000 (bench_loss --sweep-rows, 4096 rows, read + write): on an
# H100, tiles of 16384 with 16 warps moved 2.63 TB/s, 8192/16 2.49, 4096/8 1.93, a whole 32768-wide row with 32
# warps 2.36 (with per-lane running max/sum vectors, 4096/8 had been best on an H200).
_TILE = 16384


def row_kernel_config(vocab: int, block_v: int = 0) -> tuple[int, bool, int]:
    """(BLOCK_V, single_tile, num_warps) for rows of ``vocab`` logits; ``block_v > 0`` forces the tile."""
    if block_v <= 0:
        block_v = min(next_pow2(vocab), _TILE)
    single = vocab <= block_v
    num_warps = warps_for(block_v)
    return block_v, single, num_warps


def ce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    row_loss: torch.Tensor,
    write_grad: bool,
    block_v: int = 0,
    num_warps: int = 0,
) -> None:
    """Write ``weights * CE(logits, targets)`` into ``row_loss`` and, if asked, the row gradients into ``logits``.

    Args:
        logits: ``[rows, V]`` logits, row-contiguous; overwritten with ``G`` when ``write_grad``.
        targets: ``[rows]`` int64 class ids in ``[0, V)``.
        weights: ``[rows]`` fp32 per-row weights ``w_i``.
        row_loss: ``[rows]`` fp32 output.
        write_grad: whether to overwrite ``logits`` with ``w_i (softmax - onehot)``.
        block_v: tile width (power of two); 0 picks one from ``V``.
        num_warps: warps per program; 0 picks one from the tile.
    """
    rows, vocab = logits.shape
    if rows == 0:
        return
    assert logits.stride(1) == 1, "logits rows must be contiguous"
    block, single, warps = row_kernel_config(vocab, block_v)
    _ce_rows_kernel[(rows,)](
        logits,
        logits.stride(0),
        targets,
        weights,
        row_loss,
        vocab,
        BLOCK_V=block,
        SINGLE_TILE=single,
        WRITE_GRAD=write_grad,
        num_warps=num_warps or warps,
    )


def scale_cast(src: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = 4096) -> torch.Tensor:
    """Return ``(src * scale).to(dtype)`` in one pass (math in fp32); ``scale`` is a one-element tensor."""
    src = src.contiguous()
    out = torch.empty(src.shape, dtype=dtype, device=src.device)
    n = src.numel()
    if n == 0:
        return out
    grid = (triton.cdiv(n, block),)
    _scale_cast_kernel[grid](src, out, scale.reshape(1), n, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out


def scatter_rows(src: torch.Tensor, row_of: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[r] = scale * src[row_of[r]]`` where ``row_of[r] >= 0``, else 0; one pass, math in fp32.

    Args:
        src: ``[R, d]`` rows (row-contiguous); only the rows that ``row_of`` names are read.
        row_of: ``[N]`` int64 source row of each output row, or -1 for a zero row.
        scale: one-element tensor (no host sync).
        dtype: output dtype.

    Returns:
        ``[N, d]`` tensor of ``dtype``.
    """
    n, d = row_of.shape[0], src.shape[1]
    out = torch.empty((n, d), dtype=dtype, device=src.device)
    if n == 0 or d == 0:
        return out
    src = src.contiguous()
    block = min(next_pow2(d), 2048)
    _scatter_rows_kernel[(n, triton.cdiv(d, block))](
        src, row_of, out, scale.reshape(1), d, BLOCK_D=block, num_warps=warps_for(block, per_warp=256, most=8)
    )
    return out


def scatter_rows_reference(
    src: torch.Tensor, row_of: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """PyTorch twin of :func:`scatter_rows` (CPU fallback and test reference)."""
    out = torch.zeros((row_of.shape[0], src.shape[1]), dtype=dtype, device=src.device)
    has_src = row_of >= 0
    out[has_src] = (src[row_of[has_src]].float() * scale.float()).to(dtype)
    return out
