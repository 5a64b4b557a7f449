"""The non-finite guard: what a step with a NaN/inf loss or grad norm does (``training.on_nonfinite``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dlm_titan.transfers import HostCopy


class NonFiniteStop(FloatingPointError):
    """The run ended on non-finite steps (on_nonfinite = "stop", or too many skipped in a row): the entry point
    prints its message as one line and exits 1 (not 2: the input may be fine, the run diverged)."""


class NonFiniteGuard:
    """Checks each step's micro-batch losses and grad norm before the optimizer step.

    "skip" drops the update (the caller zeroes the grads, the optimizer does not step, the lr schedule and data
    move on), "stop" does the same and sets :attr:`stop_requested` (the training loop then saves and ends the
    run), "raise" raises FloatingPointError. The log names the step, rank and micro-batch. Under "skip",
    ``max_skips`` non-finite steps in a row mean the run has diverged: :attr:`diverged` is set and the loop ends
    without saving (the newest checkpoint stays the last good one) or exporting.

    Args:
        action: training.on_nonfinite.
        rank: this process's rank (for the log).
        group: a gloo group to agree on the verdict across ranks, or None for one process.
        max_skips: training.max_consecutive_skips.
    """

    def __init__(self, action: str, rank: int, group: dist.ProcessGroup | None, max_skips: int = 10):
        self.action = action
        self.rank = rank
        self.group = group
        self.max_skips = max_skips
        self.skipped_in_a_row = 0
        self.stop_requested = False
        self.diverged = False
        self.defer_raise = False  # tests set it to exercise the deferred path on the CPU
        self._deferred: tuple[int, HostCopy] | None = None  # a step and its losses and norm, on their way

    def check(self, step: int, micro_losses: list[torch.Tensor], grad_norm: torch.Tensor) -> bool:
        """Whether to apply this step's update.

        "skip" and "stop" must decide before the optimizer step: one host sync (and, with several ranks, one
        scalar gloo all-reduce) per step. "raise" on a GPU costs no sync: the verdict is copied to the host
        asynchronously and read one step later (before any save, so no checkpoint holds a non-finite update).
        """
        losses = torch.stack([x.detach().float().reshape(()) for x in micro_losses])
        norm = grad_norm.detach().float().reshape(())
        if self.action == "raise" and (norm.device.type == "cuda" or self.defer_raise):
            self.resolve_deferred()  # the previous step's verdict, long since computed: no pipeline stall
            self._deferred = (step, HostCopy({"losses": losses, "norm": norm}))
            return True
        return self._verdict(step, losses.cpu(), norm.cpu())

    def resolve_deferred(self) -> None:
        """Reads a deferred "raise" verdict (see :meth:`check`); raises if that step was non-finite."""
        if self._deferred is None:
            return
        (step, copy), self._deferred = self._deferred, None
        values = copy.read()
        self._verdict(step, values["losses"], values["norm"])

    def _verdict(self, step: int, losses: torch.Tensor, norm: torch.Tensor) -> bool:
        """Applies the action to one step's (CPU) micro-batch losses and grad norm; True = update."""
        local_bad = ~torch.isfinite(losses)
        flag = torch.stack([local_bad.any(), ~torch.isfinite(norm)]).float()
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.any():
            self.skipped_in_a_row = 0
            return True
        self.skipped_in_a_row += 1
        for m in local_bad.nonzero().flatten().tolist():
            print(f"warning: non-finite loss at step {step}, rank {self.rank}, micro-batch {m}: "
                  f"{losses[m].item()}", file=sys.stderr, flush=True)
        msg = f"non-finite {'loss' if flag[0] else 'grad norm'} at step {step} (grad norm {norm.item()})"
        if self.action == "raise":
            raise FloatingPointError(f"{msg}; training.on_nonfinite = raise")
        if self.rank == 0:
            print(f"warning: {msg}: update skipped (training.on_nonfinite = {self.action})", file=sys.stderr, flush=True)
        if self.action == "stop":
            self.stop_requested = True
        elif self.skipped_in_a_row >= self.max_skips:
            self.stop_requested = self.diverged = True
        return False

    def stop_message(self, step: int, saved_in: str | None) -> str:
        """The one line that ends a run stopped by this guard (see :class:`NonFiniteStop`)."""
        if self.diverged:
            return (f"training diverged: {self.skipped_in_a_row} non-finite steps in a row up to step {step} "
                    f"(training.max_consecutive_skips = {self.max_skips}); nothing saved or exported, the newest "
                    "checkpoint is the last good state: lower optimizer.lr or check the data, then resume or restart")
        saved = f"state saved in {saved_in}" if saved_in else "nothing saved (checkpoint.enable is off)"
        return f"stopped at step {step} after a non-finite loss or grad norm (training.on_nonfinite = stop); {saved}"
