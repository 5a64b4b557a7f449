"""Training metrics: the console line, TensorBoard and W&B sinks, MFU, throughput windows, memory, loss by t.

Every rank computes the metrics (some need all-reduces); only rank 0 prints and writes them.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dlm_titan.distributed import all_reduce_sum
from dlm_titan.flops import flops_per_token, peak_flops
from dlm_titan.transfers import to_device

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
T_BUCKET_PREFIX = "loss_by_t/"


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
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
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
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if self.wandb is not None and scalars:
            self.wandb.log(scalars, step=step)

    def _paint(self, key: str, text: str) -> str:
        color = _COLORS.get(key, "\033[34m" if key == "validation" else None)
        if not self.color or color is None:
            return text
        return f"{color}{text}{_COLORS['reset']}"

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
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
    wandb.init(
        project=os.environ.get("WANDB_PROJECT", "dlm_titan"),
        name=config.get("job", {}).get("description"),
        dir=str(folder) if folder is not None else None,
        config=config,
    )
    return wandb


class ThroughputWindow:
    """Tokens, steps and data-wait time since the last log, for tokens/s, step time and data-wait time.

    Validation time is passed to :meth:`exclude` so it does not count against throughput; checkpoint saves
    count (their stall is part of what training costs).
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.tokens, self.steps, self.data_time, self.excluded = 0, 0, 0.0, 0.0

    def add(self, tokens: int, data_time: float) -> None:
        """Counts one optimizer step of ``tokens`` tokens (global) that waited ``data_time`` s for data."""
        self.tokens += tokens
        self.steps += 1
        self.data_time += data_time

    def exclude(self, seconds: float) -> None:
        self.excluded += seconds

    def read(self, world_size: int, seconds: float | None = None) -> dict[str, float]:
        """Rates since the last reset, then resets.

        Args:
            seconds: the window's length measured on the device (CUDA events between the ends of the windows'
                last steps), or None for host time since the last read (then call it once the device's work is
                done, e.g. after reading the loss).
        """
        seconds = time.perf_counter() - self.start if seconds is None else seconds
        elapsed = max(seconds - self.excluded, 1e-9)
        steps = max(self.steps, 1)
        out = {
            "tokens_per_s": self.tokens / elapsed,
            "tokens_per_s_per_device": self.tokens / elapsed / world_size,
            "step_time_s": elapsed / steps,
            "data_time_s": self.data_time / steps,
            "data_wait_fraction": self.data_time / elapsed,
        }
        self.reset()
        return out


def model_flops_per_token(model_args, seq_len: int) -> float:
    """Training FLOPs per token of a TransEncoder: torchtitan's formula over every parameter but the input
    embedding (see :func:`dlm_titan.flops.flops_per_token`)."""
    a = model_args
    return flops_per_token(a.total_params() - (a.vocab_size + 1) * a.dim, a.n_layers, a.dim, seq_len)


def mfu(tokens_per_s_per_device: float, flops_per_tok: float, device_name: str | None) -> float | None:
    """Model FLOPs utilisation (a fraction) of one device, or None when the device's peak is unknown
    (CPU, unlisted GPU): a wrong MFU is worse than none."""
    peak = peak_flops(device_name) if device_name else None
    return None if peak is None else tokens_per_s_per_device * flops_per_tok / peak


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def device_memory(device: torch.device) -> dict[str, float | None]:
    """Peak active and reserved CUDA memory since the last reset, in GiB; on CPU the process's peak resident
    set size since start instead (ru_maxrss, never reset)."""
    gib = 1024**3
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss_bytes = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
        return {"memory_gib": None, "memory_reserved_gib": None, "memory_rss_gib": rss_bytes / gib}
    stats = torch.cuda.memory_stats(device)
    return {
        "memory_gib": stats.get("active_bytes.all.peak", 0) / gib,
        "memory_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
    }


class TBuckets:
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
    """The non-empty bins' means of :meth:`TBuckets.take`'s ``[2, bins]`` sums and counts."""
    sums, counts = totals.tolist()
    bins = len(sums)
    return {f"{prefix}{b / bins:.1f}-{(b + 1) / bins:.1f}": s / n for b, (s, n) in enumerate(zip(sums, counts)) if n > 0}
