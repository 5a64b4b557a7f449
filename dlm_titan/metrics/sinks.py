"""Where logged metrics go: the console line on rank 0, TensorBoard event files and Weights & Biases."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

# Console keys, in print order, with their format; other keys go to TensorBoard / W&B only. Scripts parse
# `step: N` at the start and `loss: X.XXXX`, so no other field may contain "step: " or end in "loss: ".
_CONSOLE = (
    ("loss", "loss: {:.4f}"),
    ("lr", "lr: {:.3e}"),
    ("grad_norm", "grad_norm: {:.3f}"),
    ("tokens_per_s", "tokens/s: {:,.0f}"),
    ("mfu", "mfu: {:.2%}"),
    ("memory_gib", "memory: {:.2f}GiB"),
    ("memory_reserved_gib", "reserved: {:.2f}GiB"),
    ("memory_rss_gib", "rss: {:.2f}GiB"),
    ("step_time_s", "time: {:.3f}s/it"),
    ("data_wait_fraction", "data: {:.1%}"),
)
_COLORS = {"step": "\033[36m", "loss": "\033[32m", "mfu": "\033[33m", "memory_gib": "\033[35m", "reset": "\033[39m"}

# TensorBoard / W&B tags of the metric keys; keys not listed (e.g. "loss_by_t/...", "validation/...") are
# used as tags unchanged.
TB_TAGS = {
    "loss": "loss/train",
    "lr": "optim/lr",
    "grad_norm": "optim/grad_norm",
    "tokens_per_s": "throughput/tokens_per_s",
    "tokens_per_s_per_device": "throughput/tokens_per_s_per_device",
    "mfu": "throughput/mfu",
    "memory_gib": "memory/max_active_gib",
    "memory_reserved_gib": "memory/max_reserved_gib",
    "memory_rss_gib": "memory/max_rss_gib",
    "tokens_seen": "progress/tokens_seen",
    "masked_fraction": "diffusion/masked_fraction",
    "step_time_s": "time/step_s",
    "data_time_s": "time/data_wait_s",
    "data_wait_fraction": "time/data_wait_fraction",
}


class MetricsLogger:
    """Prints one line per logged step (``step: N  loss: X.XXXX ...``) on rank 0 and, when enabled, writes
    the same scalars to TensorBoard event files and Weights & Biases.

    Args:
        log_dir: TensorBoard folder (None: no event files).
        rank: global rank; only rank 0 prints or writes.
        enable_tensorboard: write event files under ``log_dir``.
        enable_wandb: also log to W&B when the ``wandb`` package is installed (a warning otherwise).
        wandb_config: the run config recorded with the W&B run (a plain dict).
    """

    def __init__(self, log_dir: Path | None, rank: int, enable_tensorboard: bool, *, enable_wandb: bool = False,
                 wandb_config: dict[str, Any] | None = None):
        self.rank = rank
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        self.writer = None
        self.wandb = None
        if rank != 0:
            return
        if enable_tensorboard and log_dir is not None:
            from dlm_titan.metrics.event_file import EventFileWriter  # tensorboard is imported only when used

            self._guard_tensorboard(lambda: setattr(self, "writer", EventFileWriter(log_dir)))
        if enable_wandb:
            self.wandb = _init_wandb(log_dir.parent if log_dir is not None else None, wandb_config or {})

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """The training line of ``step`` and all non-None ``metrics`` as scalars (tags from TB_TAGS)."""
        if self.rank != 0:
            return
        parts = [self._paint("step", f"step: {step}")]
        for key, fmt in _CONSOLE:
            if metrics.get(key) is not None:
                parts.append(self._paint(key, fmt.format(metrics[key])))
        print("  ".join(parts), flush=True)
        self.write_scalars(step, {TB_TAGS.get(k, k): v for k, v in metrics.items()})

    def log_validation(self, step: int, scalars: dict[str, float], summary: str) -> None:
        """A validation line (``validation at step N -- <summary>``, never parsed as a training line) and
        ``scalars`` under their own tags."""
        if self.rank != 0:
            return
        print(self._paint("validation", f"validation at step {step} -- ") + summary, flush=True)
        self.write_scalars(step, scalars)

    def write_scalars(self, step: int, scalars: dict[str, float | None]) -> None:
        if self.rank != 0:
            return
        scalars = {tag: float(v) for tag, v in scalars.items() if v is not None}
        if self.writer is not None:
            self._guard_tensorboard(lambda: self._write_tensorboard(step, scalars))
        if self.wandb is not None and scalars:
            self._guard_wandb(lambda: self.wandb.log(scalars, step=step))

    def _write_tensorboard(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def _guard_tensorboard(self, write) -> None:
        """Runs a TensorBoard write; if the filesystem fails it (full disk, quota, vanished mount), warns once and
        stops writing TensorBoard: metrics are not worth a training run."""
        try:
            write()
        except OSError as e:
            print(f"warning: TensorBoard writing stopped: {e}; training goes on, the console keeps logging",
                  file=sys.stderr, flush=True)
            writer, self.writer = self.writer, None
            if writer is not None:
                with contextlib.suppress(OSError):
                    writer.close()

    def _guard_wandb(self, call) -> None:
        """Runs a W&B call; if it fails (its service process died, the network or the API key), warns once and
        stops logging to W&B: on rank 0 alone, an error here would end the run and leave the other ranks hanging."""
        try:
            call()
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds; none is worth the run
            print(f"warning: W&B logging stopped: {type(e).__name__}: {e}; training goes on, the console keeps "
                  "logging", file=sys.stderr, flush=True)
            self.wandb = None

    def _paint(self, key: str, text: str) -> str:
        color = _COLORS.get(key, "\033[34m" if key == "validation" else None)
        if not self.color or color is None:
            return text
        return f"{color}{text}{_COLORS['reset']}"

    def close(self) -> None:
        if self.writer is not None:
            self._guard_tensorboard(self.writer.close)
            self.writer = None
        if self.wandb is not None:
            self._guard_wandb(self.wandb.finish)
            self.wandb = None


def _init_wandb(folder: Path | None, config: dict[str, Any]):
    """Starts a W&B run (project from $WANDB_PROJECT, default "dlm_titan"), or warns when wandb is missing:
    W&B is optional, so a missing package must not stop a run."""
    try:
        import wandb
    except ImportError:
        print("warning: metrics.enable_wandb is set but wandb is not installed (pip install wandb); "
              "logging to the console and TensorBoard only", flush=True)
        return None
    try:
        wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dlm_titan"),
            name=config.get("job", {}).get("description"),
            dir=str(folder) if folder is not None else None,
            config=config,
        )
    except Exception as e:  # noqa: BLE001 - no API key, no network, a bad project: the run goes on without W&B
        print(f"warning: W&B logging is off: wandb.init failed ({type(e).__name__}: {e}); logging to the console "
              "and TensorBoard only", file=sys.stderr, flush=True)
        return None
    return wandb
