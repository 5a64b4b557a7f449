"""Preemption: SIGTERM/SIGUSR1 (Slurm, torchrun) ask the trainer to save at the next step boundary and exit 0."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Preemption signals: save at the next step boundary and exit 0."""


class StopSignals:
    """Records STOP_SIGNALS instead of dying on them, and tells every rank at a step boundary whether any got one.

    Args:
        group: a gloo group for the per-step agreement across ranks, or None for one process.
    """

    def __init__(self, group: dist.ProcessGroup | None):
        self.group = group
        self._signal: int | None = None
        self._old_handlers: dict[int, Any] = {}

    def install(self, data_loader: Any) -> None:
        """Handles STOP_SIGNALS in this (main) thread; the loader's worker processes ignore them."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        # Slurm signals every process of a job step: loader workers must outlive the signal until the trainer
        # has saved (torch's worker handler would kill them, failing the next batch). Workers start on iter().
        if hasattr(data_loader, "worker_init_fn"):
            data_loader.worker_init_fn = _IgnoreStopSignals(data_loader.worker_init_fn)

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    def received(self) -> int:
        """The signal any rank received (0 if none). Collective: all ranks agree, so they stop at the same step."""
        if self.group is None:
            return self._signal or 0
        flag = torch.tensor([self._signal or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())

    def _on_signal(self, signum: int, frame) -> None:
        # Only record it: the save happens at the next step boundary, where every rank agrees on the state.
        self._signal = signum


class _IgnoreStopSignals:
    """A loader ``worker_init_fn`` (picklable) that makes the worker ignore STOP_SIGNALS, then runs ``inner``.
    Workers still end with the trainer: on shutdown, or by their parent watchdog if it dies."""

    def __init__(self, inner=None):
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)
