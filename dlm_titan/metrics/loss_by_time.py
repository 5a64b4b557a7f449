"""The loss by noise level: mean per-sequence MDM loss in bins of the diffusion time t."""

from __future__ import annotations

import torch

from dlm_titan.distributed import all_reduce_sum
from dlm_titan.transfers import to_device

T_BUCKET_PREFIX = "loss_by_t/"
"""Tag prefix of the loss-by-t scalars (``loss_by_t/train_t0.0-0.1``, ``loss_by_t/validation_t...``)."""


class LossByTimeBins:
    """Mean per-sequence loss in ``bins`` equal bins of t in [0, 1), summed over ranks.

    A sequence's loss is its own MDM estimate, sum over its masked tokens of CE / p divided by its length,
    so the mean over bins of uniform t is the loss itself and each bin shows how hard that noise level is.
    """

    def __init__(self, device: torch.device, bins: int = 10):
        self.bins = bins
        self.sums = torch.zeros(bins, dtype=torch.float64, device=device)
        self.counts = torch.zeros(bins, dtype=torch.float64, device=device)

    def add(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Adds sequences with noise levels ``t`` [B] (any device) and per-sequence losses ``losses`` [B]."""
        idx = to_device((t.to(torch.float64) * self.bins).long().clamp_(0, self.bins - 1), self.sums.device)
        self.sums.index_add_(0, idx, losses.to(self.sums.device, torch.float64))
        self.counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def take(self) -> torch.Tensor:
        """``[2, bins]`` sums and counts over all ranks (on the device, not read), then clears. Every rank must
        call it (one all-reduce)."""
        totals = all_reduce_sum(torch.stack([self.sums, self.counts]))
        self.sums.zero_()
        self.counts.zero_()
        return totals

    def scalars(self, prefix: str = T_BUCKET_PREFIX + "train_t") -> dict[str, float]:
        """``{prefix + "0.0-0.1": mean, ...}`` over all ranks for the non-empty bins, then clears. Collective."""
        return bucket_means(self.take(), prefix)


def bucket_means(totals: torch.Tensor, prefix: str = T_BUCKET_PREFIX + "train_t") -> dict[str, float]:
    """The non-empty bins' means of :meth:`LossByTimeBins.take`'s ``[2, bins]`` sums and counts."""
    sums, counts = totals.tolist()
    bins = len(sums)
    return {f"{prefix}{b / bins:.1f}-{(b + 1) / bins:.1f}": s / n for b, (s, n) in enumerate(zip(sums, counts)) if n > 0}
