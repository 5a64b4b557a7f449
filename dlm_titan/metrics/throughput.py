"""Throughput windows, MFU and peak memory: what a logged step's speed and footprint were."""

from __future__ import annotations

import resource
import sys
import time

import torch

from dlm_titan.flops import flops_per_token, peak_flops


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
