"""Chunked pure-PyTorch reference of the masked-diffusion linear cross-entropy.

``loss = sum_i w_i * CE(hidden_i @ weight^T, targets_i)`` over the rows with ``w_i != 0``. Runs anywhere
(CPU, CUDA, under ``torch.compile``) and is the fallback of :func:`dlm_kernels.masked_linear_cross_entropy`
when the Triton kernel cannot run. Autograd differentiates it; the logits of each chunk are upcast to fp32
for the softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_ROWS = 4096


def gather_masked_rows(
    hidden: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor, masked_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gather the rows with a non-zero weight (one device-to-host sync for their count, unless the caller
    passes ``masked_index``, the indices of those rows).

    Args:
        hidden: ``[N, d]`` hidden states.
        targets: ``[N]`` int64 class ids.
        token_weights: ``[N]`` fp32 weights, exactly 0 at rows that do not count.

    Returns:
        ``(hidden_m [M, d], targets_m [M], weights_m [M])`` for the ``M`` rows with a non-zero weight.
    """
    idx = torch.nonzero(token_weights).squeeze(1) if masked_index is None else masked_index
    return hidden.index_select(0, idx), targets.index_select(0, idx), token_weights.index_select(0, idx)


def _chunk_terms(
    hidden_m: torch.Tensor, weight: torch.Tensor, targets_m: torch.Tensor, weights_m: torch.Tensor, chunk_rows: int
) -> list[torch.Tensor]:
    """``weights_m[i] * CE(hidden_m[i] @ weight^T, targets_m[i])`` chunk by chunk (one empty chunk when there are
    no rows, so a zero loss stays connected to ``hidden_m`` and ``weight``)."""
    terms = []
    for start in range(0, max(hidden_m.shape[0], 1), chunk_rows):
        stop = start + chunk_rows
        logits = hidden_m[start:stop] @ weight.t()
        ce = F.cross_entropy(logits.float(), targets_m[start:stop], reduction="none")
        terms.append(ce * weights_m[start:stop])
    return terms


def chunked_weighted_cross_entropy(
    hidden_m: torch.Tensor,
    weight: torch.Tensor,
    targets_m: torch.Tensor,
    weights_m: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """``sum_i weights_m[i] * CE(hidden_m[i] @ weight^T, targets_m[i])`` in chunks of ``chunk_rows`` rows.

    With no rows it still runs one empty chunk, so the zero loss stays connected to ``hidden_m`` and
    ``weight`` and backward gives zero gradients instead of none.
    """
    total = None
    for part in _chunk_terms(hidden_m, weight, targets_m, weights_m, chunk_rows):
        total = part.sum() if total is None else total + part.sum()
    return total


def masked_linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_weights: torch.Tensor,
    masked_index: torch.Tensor | None = None, *, chunk_rows: int = DEFAULT_CHUNK_ROWS, per_token: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy of the masked rows, chunked pure PyTorch (differentiable by autograd).

    Args:
        hidden: ``[N, d]`` hidden states (bf16 or fp32).
        weight: ``[V, d]`` output-head weight, same dtype as ``hidden``.
        targets: ``[N]`` int64 targets.
        token_weights: ``[N]`` fp32 weights, ``1 / (p_i * global_token_count)`` at masked rows, 0 elsewhere.
        chunk_rows: rows of logits materialized at once.
        per_token: also return each row's term (see below).

    Returns:
        fp32 scalar ``sum_i token_weights[i] * CE(hidden[i] @ weight^T, targets[i])``; with ``per_token``, the pair
        ``(loss, terms)``, ``terms`` the ``[N]`` fp32 summands (0 at unmasked rows, no gradient).
    """
    idx = torch.nonzero(token_weights).squeeze(1) if masked_index is None else masked_index
    hidden_m, targets_m, weights_m = gather_masked_rows(hidden, targets, token_weights, idx)
    if not per_token:
        return chunked_weighted_cross_entropy(hidden_m, weight, targets_m, weights_m, chunk_rows)
    terms = _chunk_terms(hidden_m, weight, targets_m, weights_m, chunk_rows)
    loss = sum((t.sum() for t in terms[1:]), terms[0].sum())
    return loss, _scatter_terms(torch.cat(terms).detach(), idx, token_weights.shape)


@torch.no_grad()
def per_token_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """``token_weights[i] * CE(hidden[i] @ weight^T, targets[i])`` for every row, without gradients (evaluation).

    Logits are computed only for rows with a non-zero weight, ``chunk_rows`` at a time, in the inputs' dtype
    with the softmax in fp32 (as the training loss). Other rows are exactly 0.

    Args:
        hidden: ``[N, d]`` hidden states; weight: ``[V, d]`` output head.
        targets: ``[N]`` int64 targets; token_weights: ``[N]`` weights, 0 at rows that do not count.
        chunk_rows: rows of logits materialized at once.

    Returns:
        fp32 ``[N]``.
    """
    token_weights = token_weights.float()
    idx = torch.nonzero(token_weights).squeeze(1)
    hidden_m, targets_m, weights_m = gather_masked_rows(hidden, targets, token_weights, idx)
    terms = torch.cat(_chunk_terms(hidden_m, weight, targets_m, weights_m, chunk_rows))
    return _scatter_terms(terms, idx, token_weights.shape)


def _scatter_terms(terms_m: torch.Tensor, idx: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The ``[N]`` terms of all rows from those of the rows ``idx`` (zeros elsewhere)."""
    return terms_m.new_zeros(shape).index_copy_(0, idx, terms_m)
