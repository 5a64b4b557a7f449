"""Public entry point: the masked-diffusion linear cross-entropy, dispatched to the fused or reference path."""

from __future__ import annotations

from typing import Literal

import torch

from .masked_ce_fused import fused_masked_linear_cross_entropy
from .reference import masked_linear_cross_entropy_reference
from .triton_utils import runs_on

Impl = Literal["auto", "fused", "torch"]
IMPLS = ("auto", "fused", "torch")


def fused_supported(device: torch.device) -> bool:
    """Whether ``impl="fused"`` can run on ``device``: CUDA with triton, or CPU under ``TRITON_INTERPRET=1``."""
    return runs_on(device)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The path ``impl`` means on ``device``: "auto" is "fused" on CUDA with triton, else "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}: use one of {', '.join(IMPLS)}")
    if impl == "auto":
        return "fused" if device.type == "cuda" and fused_supported(device) else "torch"
    if impl == "fused" and not fused_supported(device):
        raise ValueError(
            f"impl='fused' cannot run on {device.type}: it needs triton and a CUDA device "
            "(or TRITON_INTERPRET=1 on CPU); use impl='auto' or 'torch'"
        )
    return impl


def _check_inputs(hidden, weight, targets, token_weights) -> None:
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [..., d] and [V, d]"
        )
    if targets.shape != hidden.shape[:-1] or token_weights.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets {tuple(targets.shape)} and token_weights {tuple(token_weights.shape)} must both have "
            f"hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast them to one dtype")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be floating point, got {hidden.dtype}")


def masked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    token_weights: torch.Tensor,
    impl: Impl = "auto",
    masked_index: torch.Tensor | None = None,
    per_token: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy of an LM head over the masked rows, without logits for the unmasked ones.

    Args:
        hidden: ``[N, d]`` (or ``[..., d]``) final hidden states, bf16 or fp32.
        weight: ``[V, d]`` output-head weight (all-gathered, same dtype as ``hidden``).
        targets: ``[N]`` int64 targets (clean tokens).
        token_weights: ``[N]`` fp32, ``1 / (p_i * global_token_count)`` at masked rows and exactly 0 elsewhere.
        impl: "auto" (fused on CUDA when triton works, else "torch"), "fused" (Triton row kernel + cuBLAS,
            gradients in forward) or "torch" (the chunked pure-PyTorch reference).
        masked_index: optional int64 ``[M]`` indices (into the flattened rows) of exactly the rows with a
            non-zero weight, ascending. Passing it avoids a device-to-host sync to count them.
        per_token: also return the summands (per-sequence losses for metrics, at no extra cost on the fused path).

    Returns:
        fp32 scalar ``sum_i w_i * CE(hidden_i @ weight^T, targets_i)``, differentiable wrt ``hidden`` and
        ``weight``; exactly 0 with zero gradients when no row is masked. With ``per_token``, the pair
        ``(loss, terms)``: ``terms`` is fp32 of ``hidden``'s leading shape, ``w_i * CE_i`` (0 at unmasked rows),
        without gradient.
    """
    _check_inputs(hidden, weight, targets, token_weights)
    path = resolve_impl(impl, hidden.device)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    y = targets.reshape(-1).long()
    w = token_weights.reshape(-1).float()
    if path == "fused":
        out = fused_masked_linear_cross_entropy(h, weight, y, w, masked_index, per_token=per_token)
    else:
        out = masked_linear_cross_entropy_reference(h, weight, y, w, masked_index, per_token=per_token)
    if not per_token:
        return out
    loss, terms = out
    return loss, terms.view(hidden.shape[:-1])
