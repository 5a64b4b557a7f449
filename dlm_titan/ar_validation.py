"""Validation of an autoregressive run: the exact negative log-likelihood per token of held-out windows.

Where MDM validation estimates an ELBO bound with Monte-Carlo noise (:mod:`dlm_titan.validation`), a causal model's
likelihood is exact: each window of ``seq_len + 1`` tokens gives ``seq_len`` next-token predictions, and the
loss is their mean cross-entropy in nats per token over every window of every rank (sums all-reduced), logged
under the same tag as MDM's (``validation/loss``, which the isoFLOP sweep reads), with the perplexity exp(loss)
and the standard error of the per-window means, std / sqrt(windows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from collections.abc import Iterable

import torch

from dlm_titan.autoregressive import next_token_batch, perplexity
from dlm_titan.distributed import all_reduce_sum
from dlm_titan.validation import LOSS_TAG, STDERR_TAG, Validator, per_token_weighted_ce

PPL_TAG = "validation/ppl"


@dataclasses.dataclass
class NextTokenValidationResult:
    """Exact NLL per token (nats), its perplexity and the standard error over ``sequences`` windows."""

    loss: float
    ppl: float
    stderr: float
    sequences: int
    tokens: int
    seconds: float

    def scalars(self) -> dict[str, float]:
        return {LOSS_TAG: self.loss, PPL_TAG: self.ppl, STDERR_TAG: self.stderr, "validation/time_s": self.seconds}

    def summary(self) -> str:
        return (f"loss {self.loss:.4f} +- {self.stderr:.4f} (std. error) nats/token, exact NLL; ppl {self.ppl:.2f}; "
                f"{self.sequences} sequences, {self.tokens:,} tokens, {self.seconds:.1f}s")


class NextTokenValidator:
    """Evaluates a causal model's exact NLL on ``loader``; every rank must call :meth:`run` together.

    Args:
        model: a causal TransEncoder (possibly FSDP-wrapped).
        loader: re-iterable validation micro-batches ``{"input": [b, >= seq_len + 1], ...}``.
        steps: micro-batches per rank per evaluation; -1 = the whole loader.
        seq_len: predicted tokens per window.
        device, autocast: where and how the forward runs (the trainer's).
    """

    def __init__(self, model: torch.nn.Module, loader: Iterable[dict[str, torch.Tensor]], *, steps: int, seq_len: int,
                 device: torch.device, autocast: contextlib.AbstractContextManager | None = None):
        self.model, self.loader, self.steps, self.seq_len, self.device = model, loader, steps, seq_len, device
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()

    @classmethod
    def like(cls, validator: Validator) -> NextTokenValidator:
        """The AR validation of the run that ``validator`` (built from the config) would validate: same model,
        loader, micro-batches per evaluation, seq_len, device and autocast."""
        return cls(validator.model, validator.loader, steps=validator.steps, seq_len=validator.seq_len,
                   device=validator.device, autocast=validator.autocast)

    @torch.no_grad()
    def run(self) -> NextTokenValidationResult:
        start = time.perf_counter()
        stats = torch.zeros(4, dtype=torch.float64, device=self.device)  # [sum NLL, tokens, sum x, sum x^2]
        was_training = self.model.training
        self.model.eval()
        try:
            batches = self.loader if self.steps < 0 else itertools.islice(self.loader, self.steps)
            for batch in batches:
                stats += self._evaluate(batch["input"])
        finally:
            self.model.train(was_training)
        nll, tokens, x_sum, x2_sum = all_reduce_sum(stats).tolist()
        windows = tokens / self.seq_len
        if windows == 0:
            raise RuntimeError("validation saw no sequences")
        var = max(x2_sum - x_sum * x_sum / windows, 0.0) / (windows - 1) if windows > 1 else float("nan")
        loss = nll / tokens
        return NextTokenValidationResult(loss=loss, ppl=perplexity(loss), stderr=math.sqrt(var / windows),
                                         sequences=int(windows), tokens=int(tokens), seconds=time.perf_counter() - start)

    def _evaluate(self, windows: torch.Tensor) -> torch.Tensor:
        """[sum of NLL, tokens, sum and sum of squares of the per-window mean NLL] of one micro-batch."""
        mb = next_token_batch(windows[:, : self.seq_len + 1], token_count=1)  # weight 1: per-token terms are CE
        inputs, targets, weights = (x.to(self.device, non_blocking=True) for x in (mb.inputs, mb.targets, mb.token_weights))
        with self.autocast:
            per_token = self.model(inputs, targets, weights, loss_fn=per_token_weighted_ce)
        per_window = per_token.view(inputs.shape).double()
        x = per_window.mean(1)
        return torch.stack([per_window.sum(), x.new_tensor(per_window.numel()), x.sum(), (x * x).sum()])
