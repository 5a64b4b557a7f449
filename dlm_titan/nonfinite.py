"""The non-finite guard: what a step with a NaN/inf loss or grad norm does (``training.on_nonfinite``)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from dlm_titan.transfers import HostCopy


class NonFiniteGuard:
    """Checks each step's micro-batch losses and grad norm before the optimizer step.

    "skip" drops the update (the caller zeroes the grads, the optimizer does not step, the lr schedule and data
    move on), "stop" does the same and sets :attr:`stop_requested` (the training loop then saves and ends the
    run), "raise" raises FloatingPointError. The log names the step, rank and micro-batch.

    Args:
        action: training.on_nonfinite.
        rank: this process's rank (for the log).
        group: a gloo group to agree on the verdict across ranks, or None for one process.
    """

    def __init__(self, action: str, rank: int, group: dist.ProcessGroup | None):
        self.action = action
        self.rank = rank
        self.group = group
        self.stop_requested = False
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
            return True
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
        return False
