"""Console and TensorBoard logging of training metrics, and device memory readings."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

# Console keys, in print order, with their format; other keys go to TensorBoard only.
_CONSOLE = (
    ("loss", "loss: {:.4f}"),
    ("lr", "lr: {:.3e}"),
    ("grad_norm", "grad_norm: {:.3f}"),
    ("tokens_per_s", "tokens/s: {:,.0f}"),
    ("mfu", "mfu: {:.2%}"),
    ("memory_gib", "memory: {:.2f}GiB"),
)
_COLORS = {"step": "\033[36m", "loss": "\033[32m", "reset": "\033[39m"}

# TensorBoard tags of the console keys.
TB_TAGS = {
    "loss": "loss/train",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "throughput/tokens_per_s",
    "tokens_per_s_per_device": "throughput/tokens_per_s_per_device",
    "mfu": "throughput/mfu",
    "memory_gib": "memory/max_active_gib",
    "memory_reserved_gib": "memory/max_reserved_gib",
    "tokens_seen": "progress/tokens_seen",
    "masked_fraction": "diffusion/masked_fraction",
    "step_time_s": "time/step_s",
    "data_time_s": "time/data_wait_s",
}


class MetricsLogger:
    """Prints one line per logged step (``step: N  loss: X.XXXX ...``) on rank 0 and, when enabled, writes
    the same scalars to TensorBoard event files."""

    def __init__(self, log_dir: Path | None, rank: int, enable_tensorboard: bool):
        self.rank = rank
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.writer = None
        if rank == 0 and enable_tensorboard and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        parts = [self._paint("step", f"step: {step}")]
        for key, fmt in _CONSOLE:
            if metrics.get(key) is not None:
                parts.append(self._paint(key, fmt.format(metrics[key])))
        print("  ".join(parts), flush=True)
        if self.writer is not None:
            for key, value in metrics.items():
                if value is not None:
                    self.writer.add_scalar(TB_TAGS.get(key, key), value, step)

    def _paint(self, key: str, text: str) -> str:
        if not self.color or key not in _COLORS:
            return text
        return f"{_COLORS[key]}{text}{_COLORS['reset']}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def device_memory(device: torch.device) -> dict[str, float | None]:
    """Peak active and reserved memory since the last reset, in GiB (None on CPU)."""
    if device.type != "cuda":
        return {"memory_gib": None, "memory_reserved_gib": None}
    stats = torch.cuda.memory_stats(device)
    gib = 1024**3
    return {
        "memory_gib": stats.get("active_bytes.all.peak", 0) / gib,
        "memory_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
    }
