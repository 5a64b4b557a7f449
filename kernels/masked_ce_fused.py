"""Fused masked-diffusion linear cross-entropy: gather, chunked cuBLAS GEMMs and the Triton row kernel.

Pipeline for the M rows with ``w_i != 0`` (see :mod:`dlm_kernels.masked_ce_triton` for the math), per chunk
of rows sized so that its logits fit a fixed byte budget:

1. ``Z = X_c W^T`` into one reused ``[rows, V]`` buffer (input dtype, cuBLAS);
2. the Triton row kernel writes ``w_i (lse_i - Z_{i,y_i})`` and overwrites ``Z`` with ``G``;
3. ``dX_c = G W`` (cuBLAS), written straight into the chunk's rows of a compact ``[M, d]`` block (kept in an
   ``[N, d]`` buffer: a static shape for the compiler), with ``row_of`` mapping each of the N rows to its masked
   row or -1;
4. ``dW += G^T X_c`` accumulated in fp32 (cuBLAS with an fp32 output).

All of it happens in forward (the loss is a scalar); backward only multiplies the stored gradients by the
upstream gradient and casts them: one Triton pass each, the one for ``dH`` also scattering the masked rows to
their places and writing zeros elsewhere (so ``dH`` is written once, never zero-filled and then copied into).
The forward and those passes are ``torch.library.custom_op`` s with fake implementations, and autograd sees
them through one ``torch.autograd.Function``, so ``torch.compile(fullgraph=True)`` traces the loss without a
graph break or a data-dependent shape (the gather happens inside the op).

Measured on an H200 (scripts/bench_loss.py, d=768 and 2048, V=32000, ~8k masked rows): a 256 MiB buffer
beat 128 MiB (more dW read-modify-write passes, smaller GEMMs) and matched 512 MiB at less memory; running
the dW GEMMs on a side stream, with or without a second logits buffer, was no faster, so it was dropped.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import masked_ce_triton as kernels
from .triton_utils import runs_on

# Bytes of the reused logits buffer: 256 MiB is 4096 rows of a 32000-entry bf16 vocabulary.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Chunk rows are a multiple of this, the last chunk padded with zero-weight rows. The masked count changes every
# step, and cuBLAS picks a kernel for each new GEMM shape on the host: for the dX GEMM (K = V) that took ~4 ms
# per step on an H200, more than the GPU time of the whole loss at 170M. With a quantum, the shapes repeat;
# the padding adds under 128 rows of GEMM work per chunk.
ROW_QUANTUM = 128


def chunk_rows_for(n_rows: int, vocab: int, elem_size: int, chunk_bytes: int, quantum: int = 1) -> int:
    """Rows per chunk: as many as ``chunk_bytes`` of logits allow, balanced so no chunk is a small tail, then
    rounded up to a multiple of ``quantum``. Where the budget holds at least one quantum, its row capacity is first
    rounded down to a multiple of it (so the rounded-up rows still fit); else the quantum is ignored."""
    max_rows = max(1, chunk_bytes // (vocab * elem_size))
    if max_rows >= quantum:
        max_rows -= max_rows % quantum
    else:
        quantum = 1
    n_chunks = -(-n_rows // max_rows)
    rows = -(-n_rows // n_chunks)
    return min(-(-rows // quantum) * quantum, max_rows)


def chunk_plan(m: int, n: int, vocab: int, elem_size: int, chunk_bytes: int, quantum: int, grad_hidden: bool
               ) -> tuple[int, int]:
    """``(rows per chunk, padded rows)`` of a call with ``m`` of ``n`` rows masked: chunks of ``chunk_rows_for``
    rows, padded to whole chunks unless dX (``n`` rows) has no room for the padding; then the last chunk is short."""
    rows = chunk_rows_for(m, vocab, elem_size, chunk_bytes, quantum)
    padded = -(-m // rows) * rows
    return rows, (max(m, min(padded, n)) if grad_hidden else padded)


# Whether cuBLAS addmm accepts an fp32 C with bf16/fp16 A and B (newer torch); probed on first use.
_FP32_C_ADDMM: list[bool] = []


def _accumulate_fp32(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``out (+)= a @ b`` with ``out`` fp32 and ``a``, ``b`` of the input dtype, accumulating in fp32."""
    if a.dtype == torch.float32:
        if first:
            torch.mm(a, b, out=out)
        else:
            out.addmm_(a, b)
    elif a.is_cuda:
        # cuBLAS writes (and reads back) an fp32 C directly: no transient [V, d] in the input dtype.
        if first:
            torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
            return
        if not _FP32_C_ADDMM or _FP32_C_ADDMM[0]:
            try:
                torch.ops.aten.addmm.dtype_out(out, a, b, torch.float32, out=out)
                _FP32_C_ADDMM[:] = [True]
                return
            except RuntimeError:  # older torch wants C in the input dtype: pay a transient fp32 product
                _FP32_C_ADDMM[:] = [False]
        out.add_(torch.ops.aten.mm.dtype(a, b, torch.float32))
    else:
        if first:
            torch.mm(a.float(), b.float(), out=out)
        else:
            out.addmm_(a.float(), b.float())


@torch.library.custom_op("dlm_kernels::masked_lce_fwd", mutates_args=())
def masked_lce_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    masked_index: Optional[torch.Tensor],  # noqa: UP045 (custom_op schema inference wants Optional)
    grad_hidden: bool,
    grad_weight: bool,
    chunk_bytes: int,
    block_v: int,
    row_quantum: int,
    per_token: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and (unscaled) gradients of the masked weighted linear cross-entropy.

    Returns:
        ``(loss, dX, row_of, dW, terms)``: fp32 scalar; ``dX [N, d]`` in ``hidden``'s dtype, whose first M rows are
        the gradients of the masked rows in index order (the rest is never read); ``row_of [N]`` int64, the row of
        ``dX`` that belongs to each hidden row, -1 for unmasked rows; ``dW [V, d]`` fp32; ``terms [N]`` fp32, each
        row's ``w_i CE_i`` (0 at unmasked rows: the row kernel computes them anyway). ``dX`` and ``row_of`` are
        empty if not ``grad_hidden``, ``dW`` if not ``grad_weight``, ``terms`` if not ``per_token``.
    """
    n, d = hidden.shape
    vocab = weight.shape[0]
    dx = hidden.new_empty((n, d)) if grad_hidden else hidden.new_empty((0,))
    row_of = torch.full((n,) if grad_hidden else (0,), -1, dtype=torch.long, device=hidden.device)
    dw = weight.new_empty((vocab, d) if grad_weight else (0,), dtype=torch.float32)
    terms = torch.zeros((n,) if per_token else (0,), dtype=torch.float32, device=hidden.device)
    # A caller that knows the masked rows (the trainer builds masks on the CPU) passes them: nonzero on the
    # device would stall the host until the GPU catches up, once per micro-batch.
    idx = torch.nonzero(token_weights).squeeze(1) if masked_index is None else masked_index
    m = idx.numel()
    if m == 0:
        if grad_weight:
            dw.zero_()
        return hidden.new_zeros((), dtype=torch.float32), dx, row_of, dw, terms
    if grad_hidden:
        row_of.index_copy_(0, idx, torch.arange(m, device=idx.device))
    rows, padded = chunk_plan(m, n, vocab, hidden.element_size(), chunk_bytes, row_quantum, grad_hidden)
    x, y, w = _gather_padded(hidden, targets, token_weights, idx, padded)
    logits = hidden.new_empty((rows, vocab))
    row_loss = torch.empty(padded, dtype=torch.float32, device=hidden.device)
    weight_t = weight.t()
    for start in range(0, padded, rows):
        stop = min(start + rows, padded)
        z = logits[: stop - start]
        torch.mm(x[start:stop], weight_t, out=z)
        kernels.ce_rows(
            z, y[start:stop], w[start:stop], row_loss[start:stop], grad_hidden or grad_weight, block_v
        )
        if grad_hidden:
            torch.mm(z, weight, out=dx[start:stop])
        if grad_weight:
            _accumulate_fp32(dw, z.t(), x[start:stop], first=start == 0)
    if per_token:
        terms.index_copy_(0, idx, row_loss[:m])
    return row_loss[:m].sum(), dx, row_of, dw, terms


def _gather_padded(hidden: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, idx: torch.Tensor,
                   padded: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states, targets and weights of the masked rows ``idx``, padded to ``padded`` rows (whole chunks) with
    copies of the first masked row at weight 0: a masked row's logits are finite unless the loss is not, so their
    loss and gradients are exact zeros, and their dX rows land past the M masked ones, never read."""
    m = idx.numel()
    if padded > m:
        idx = torch.cat([idx, idx[:1].expand(padded - m)])
    w = token_weights.index_select(0, idx)
    w[m:] = 0
    return hidden.index_select(0, idx), targets.index_select(0, idx), w


@masked_lce_fwd.register_fake
def _(hidden, weight, targets, token_weights, masked_index, grad_hidden, grad_weight, chunk_bytes, block_v, row_quantum,
      per_token):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        hidden.new_empty((hidden.shape[0],) if grad_hidden else (0,), dtype=torch.long),
        weight.new_empty(weight.shape if grad_weight else (0,), dtype=torch.float32),
        hidden.new_empty((hidden.shape[0],) if per_token else (0,), dtype=torch.float32),
    )


@torch.library.custom_op("dlm_kernels::scale_cast", mutates_args=())
def scale_cast(src: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(src * scale).to(dtype)``, one pass; ``scale`` is a one-element tensor (no host sync)."""
    if runs_on(src.device):
        return kernels.scale_cast(src, scale, dtype)
    return (src.float() * scale.float()).to(dtype)


@scale_cast.register_fake
def _(src, scale, dtype):
    return torch.empty(src.shape, dtype=dtype, device=src.device)


@torch.library.custom_op("dlm_kernels::scatter_rows", mutates_args=())
def scatter_rows(src: torch.Tensor, row_of: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[r] = scale * src[row_of[r]]`` (0 where ``row_of[r] < 0``) as ``dtype``: one Triton pass, no host sync
    (the PyTorch fallback, for devices the kernel cannot run on, indexes with a mask)."""
    if runs_on(src.device):
        return kernels.scatter_rows(src, row_of, scale, dtype)
    return kernels.scatter_rows_reference(src, row_of, scale, dtype)


@scatter_rows.register_fake
def _(src, row_of, scale, dtype):
    return torch.empty((row_of.shape[0], src.shape[1]), dtype=dtype, device=src.device)


class _MaskedLCE(torch.autograd.Function):
    """Autograd view of :func:`masked_lce_fwd`: gradients come from forward, backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, token_weights, masked_index, grad_hidden, grad_weight, chunk_bytes, block_v,
                row_quantum, per_token):
        loss, dx, row_of, dw, terms = masked_lce_fwd(
            hidden, weight, targets, token_weights, masked_index, grad_hidden, grad_weight, chunk_bytes, block_v,
            row_quantum, per_token,
        )
        ctx.save_for_backward(dx, row_of, dw)
        ctx.mark_non_differentiable(terms)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.wants = (grad_hidden, grad_weight)
        return loss, terms

    @staticmethod
    def backward(ctx, grad_loss, _grad_terms):
        dx, row_of, dw = ctx.saved_tensors
        scale = grad_loss.float().reshape(1)
        grad_h = scatter_rows(dx, row_of, scale, ctx.dtypes[0]) if ctx.wants[0] else None
        grad_w = scale_cast(dw, scale, ctx.dtypes[1]) if ctx.wants[1] else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def fused_masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    masked_index: torch.Tensor | None = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    block_v: int = 0,
    row_quantum: int = ROW_QUANTUM,
    per_token: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused path of :func:`dlm_kernels.masked_linear_cross_entropy` on 2-D, validated inputs.

    Args:
        hidden, weight, targets, token_weights, masked_index: as in ``masked_linear_cross_entropy``.
        chunk_bytes: byte budget of the reused logits buffer (sets the rows per chunk).
        block_v: row-kernel tile width (power of two); 0 picks one from ``V``.
        row_quantum: chunk rows are a multiple of it (see ``ROW_QUANTUM``).
        per_token: also return the ``[N]`` per-row terms (as ``masked_linear_cross_entropy``).
    """
    if row_quantum < 1:
        raise ValueError(f"row_quantum must be a positive number of rows, got {row_quantum}")
    grads = torch.is_grad_enabled()
    grad_hidden = grads and hidden.requires_grad
    grad_weight = grads and weight.requires_grad
    if not (grad_hidden or grad_weight):
        loss, *_, terms = masked_lce_fwd(hidden, weight, targets, token_weights, masked_index, False, False, chunk_bytes,
                                         block_v, row_quantum, per_token)
    else:
        loss, terms = _MaskedLCE.apply(hidden, weight, targets, token_weights, masked_index, grad_hidden, grad_weight,
                                       chunk_bytes, block_v, row_quantum, per_token)
    return (loss, terms) if per_token else loss
