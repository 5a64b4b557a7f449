"""SMDM's autoregressive baseline objective (``pretrain/train_ar.py``): next-token targets and exact NLL.

The loader yields windows of ``seq_len + 1`` tokens. A sequence's inputs are its first L tokens and its targets
the L tokens after each of them (``window[:, :L]`` and ``window[:, 1:L + 1]``, as SMDM's collate shift), so every
input position predicts one token. The training loss is the mean cross-entropy over all predicted tokens of the
optimizer step: every row weighs ``1 / token_count`` with ``token_count`` the step's global token count (all
micro-batches, all ranks), the MDM loss's divisor. So the batch goes through the same weighted loss kernel as
MDM (all rows, equal weights), the gradient is the same whatever the split into ranks and micro-batches, and a
resumed run repeats it exactly: the objective draws no noise.

:func:`next_token_batch` is the AR twin of :func:`dlm_titan.diffusion.forward_process`: both return a
:class:`~dlm_titan.diffusion.MaskedBatch`, so the trainer picks the objective with one branch.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dlm_titan.diffusion import MaskedBatch, ssl_length

OBJECTIVES = ("mdm", "ar")


def next_token_batch(windows: torch.Tensor, *, token_count: int, length: int | None = None) -> MaskedBatch:
    """Inputs, next-token targets and equal loss weights of a micro-batch of windows.

    Args:
        windows: int64 ``[B, >= length + 1]`` token windows (the loader's ``batch["input"]``).
        token_count: predicted tokens in the whole optimizer step (every micro-batch of every rank); each row's
            weight is ``1 / token_count``, so the loss kernel's weighted sum is this micro-batch's share of the
            step's mean cross-entropy.
        length: tokens per input sequence L; default ``windows.shape[1] - 1``.

    Returns:
        A MaskedBatch whose ``inputs`` are ``windows[:, :L]``, ``targets`` ``windows[:, 1:L + 1]``, every row
        weighted and indexed (``masked_index`` is all rows, ``num_masked`` their count).
    """
    length = windows.shape[1] - 1 if length is None else length
    if not 1 <= length < windows.shape[1]:
        raise ValueError(f"windows of {windows.shape[1]} tokens hold no input of {length} tokens and its next tokens")
    if token_count < 1:
        raise ValueError(f"token_count must be >= 1, got {token_count}")
    inputs, targets = windows[:, :length], windows[:, 1 : length + 1]
    weights = torch.full(inputs.shape, 1.0 / token_count, dtype=torch.float32, device=windows.device)
    index = torch.arange(inputs.numel(), device=windows.device)
    return MaskedBatch(inputs=inputs, targets=targets, token_weights=weights, masked_index=index, num_masked=inputs.numel())


def next_token_micro_batch(cfg: Any, batch: dict[str, torch.Tensor], step: int, token_count: int
                           ) -> tuple[MaskedBatch, None, int]:
    """The AR objective's inputs of one training micro-batch, the twin of the trainer's MDM micro-batch:
    ``(batch, None, length)`` (no diffusion time t). ``length`` is ``training.seq_len``, or SMDM's stochastic
    sequence length when ``diffusion.ssl_ratio`` > 0 (keyed as for MDM, so the step's token count agrees)."""
    training = cfg.training
    length = ssl_length(training.seed, step, int(batch["position"][0]), training.seq_len, cfg.diffusion.ssl_ratio)
    return next_token_batch(batch["input"], token_count=token_count, length=length), None, length


@torch.no_grad()
def next_token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact negative log-likelihood of each target token, ``-log p(targets[b, i] | tokens before it)``.

    Args:
        logits: ``[B, L, V]`` logits of a causal model on the inputs (any float dtype; softmax in float32, or
            float64 when the logits are).
        targets: int64 ``[B, L]`` next tokens.

    Returns:
        ``[B, L]`` nats, float32 (float64 for float64 logits).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def perplexity(nats_per_token: float) -> float:
    """exp(NLL per token), capped so a diverged run reports inf-free numbers."""
    return math.exp(min(nats_per_token, 700.0))
