"""torch profiler traces and CUDA memory snapshots at chosen steps (the ``profiling`` config section).

Every ``profile_freq`` steps (steps N with N % profile_freq == 0) the profiler records one step after up to 3
warm-up steps and writes ``{dump}/{save_traces_folder}/iteration_N/rank{R}_trace.json`` (open it in
https://ui.perfetto.dev or chrome://tracing). With ``enable_memory_snapshot`` on CUDA, the allocator history
is recorded from the start and dumped at the same steps to
``{dump}/{save_memory_snapshot_folder}/iteration_N/rank{R}_memory_snapshot.pickle`` (drag it onto
https://pytorch.org/memory_viz), and once more as ``iteration_N_oom`` if the run dies of an out-of-memory
error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

WARMUP_STEPS = 3
MEMORY_HISTORY_ENTRIES = 100_000


class Profiler:
    """Context manager around the training loop; call :meth:`step` after each optimizer step.

    Args:
        cfg: the ``profiling`` config section (its ranges are checked when the config loads).
        dump_folder: the run's dump folder.
        rank: global rank (file names).
        device: training device (memory snapshots need CUDA).
        start_step: the step the loop resumes from (0 for a new run), so traces land on multiples of the freq.
        log: printer for the one-line notices (rank 0's print, a no-op elsewhere).
    """

    def __init__(self, cfg: Any, dump_folder: Path, rank: int, device: torch.device, start_step: int = 0, log=print):
        self.freq = cfg.profile_freq
        self.rank = rank
        self.step_num = start_step
        self.log = log
        self.trace_dir = Path(dump_folder) / cfg.save_traces_folder
        self.snapshot_dir = Path(dump_folder) / cfg.save_memory_snapshot_folder
        self.torch_profiler = None
        self.snapshots = False
        if cfg.enable_profiling:
            self.torch_profiler = self._build_profiler(device, start_step)
        if cfg.enable_memory_snapshot:
            if device.type == "cuda":
                self.snapshots = True
            else:
                log("warning: profiling.enable_memory_snapshot needs CUDA; no memory snapshots on this device")

    def _build_profiler(self, device: torch.device, start_step: int):
        warmup = min(WARMUP_STEPS, self.freq - 1)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        prof = profile(
            activities=activities,
            schedule=schedule(wait=self.freq - 1 - warmup, warmup=warmup, active=1),
            on_trace_ready=self._save_trace,
            record_shapes=True,
        )
        # The schedule counts from here: the active step is a multiple of freq. The action of the first step was
        # computed for step 0 when the profiler was built: recompute it, or a resume one step before a multiple of
        # freq skips that step's trace.
        prof.step_num = start_step
        prof.current_action = prof.schedule(start_step)
        return prof

    def _save_trace(self, prof) -> None:
        folder = self.trace_dir / f"iteration_{prof.step_num}"
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))
        self.log(f"profiler trace of step {prof.step_num} saved to {folder}")

    def __enter__(self) -> Profiler:
        if self.torch_profiler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle.*")
                self.torch_profiler.__enter__()
        if self.snapshots:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
        return self

    def step(self) -> None:
        """Marks the end of one optimizer step: advances the trace schedule and dumps due snapshots."""
        self.step_num += 1
        if self.torch_profiler is not None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*clears events at the end of each cycle.*")
                self.torch_profiler.step()
        if self.snapshots and self.step_num % self.freq == 0:
            self._dump_snapshot(f"iteration_{self.step_num}")

    def _dump_snapshot(self, name: str) -> None:
        folder = self.snapshot_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(folder / f"rank{self.rank}_memory_snapshot.pickle"))
        self.log(f"CUDA memory snapshot saved to {folder}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.snapshots:
            if exc_type is not None and issubclass(exc_type, torch.OutOfMemoryError):
                self._dump_snapshot(f"iteration_{self.step_num + 1}_oom")
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.torch_profiler is not None:
            self.torch_profiler.__exit__(exc_type, exc, tb)
