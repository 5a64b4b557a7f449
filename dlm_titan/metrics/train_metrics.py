"""The training loop's metrics: what a logged step reports, read from the device without stalling it.

The Trainer hands each finished step to :meth:`TrainMetrics.step_done`. On a logged step the device values
(loss and masked-token totals, grad norm, loss-by-t sums, all-reduced over ranks) are copied to the host behind
the step's work and read one step later, once the next step is queued behind them: the GPU never waits for the
host's logging. Throughput is measured over the window since the previous log (on the GPU's clock there), MFU
from it, and peak memory from the allocator's host-side counters (no sync), reset when a logged step is queued.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from dlm_titan.distributed import all_reduce_sum
from dlm_titan.metrics.loss_by_time import LossByTimeBins, bucket_means
from dlm_titan.metrics.sinks import MetricsLogger
from dlm_titan.metrics.throughput import (
    ThroughputWindow,
    device_memory,
    device_name,
    mfu,
    model_flops_per_token,
)
from dlm_titan.transfers import HostCopy, device_mark


@dataclasses.dataclass
class LoggedStep:
    """A logged step between :meth:`TrainMetrics.start_log` and :meth:`TrainMetrics.finish_log`."""

    step: int
    device: HostCopy  # loss and masked-token totals, grad norm, loss-by-t sums
    lr: float
    tokens_seen: int
    tokens: int
    memory: dict[str, float | None]  # peaks read as the step was queued: the next step's allocations are not in it


class TrainMetrics:
    """Logged steps' metrics, throughput windows, MFU, peak memory and the loss by t; the sinks behind them.

    Args:
        cfg: the JobConfig (metrics section, training.seq_len; the whole config goes to W&B).
        model_args: the model's shape (for FLOPs per token).
        rank: global rank (only rank 0 prints and writes).
        world_size: data-parallel ranks (per-device throughput).
        device: the training device.
    """

    def __init__(self, cfg: Any, model_args: Any, rank: int, world_size: int, device: torch.device):
        dump_folder = Path(cfg.job.dump_folder)
        self.logger = MetricsLogger(dump_folder / cfg.metrics.save_tb_folder, rank, cfg.metrics.enable_tensorboard,
                                    enable_wandb=cfg.metrics.enable_wandb, wandb_config=dataclasses.asdict(cfg))
        self.rank, self.world_size, self.device = rank, world_size, device
        self.loss_by_t = LossByTimeBins(device)
        # The autoregressive baseline predicts every token: no masked fraction (1.0 under a diffusion tag)
        self.diffusion = cfg.training.objective == "mdm"
        self.flops_per_token = model_flops_per_token(model_args, cfg.training.seq_len)
        # Read a logged step's metrics one step later, behind queued work (see start_log). On the CPU, work runs
        # as it is issued: nothing to hide the wait behind, and the throughput window would miss that step.
        self.defer = device.type == "cuda"
        self.pending: LoggedStep | None = None  # a logged step's metrics on their way to the host
        self.last_loss: float | None = None  # the latest logged training loss (the final export's model card)
        self.window = ThroughputWindow()
        self.window_mark: torch.cuda.Event | None = None

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Writes one logged step's metrics to every sink (the console line, TensorBoard, W&B)."""
        self.logger.log(step, metrics)

    def start(self) -> None:
        """Starts the first throughput window (call when the loop starts)."""
        self.window.reset()
        self.window_mark = device_mark(self.device)  # where the throughput window starts on the device's clock
        self.pending = None

    def step_done(self, step: int, out: dict[str, Any], tokens_seen: int, *, log: bool, flush: bool) -> None:
        """Counts a finished step and, on a logged one, queues its metrics (``out``: the trainer's step output).

        Args:
            step: the step just trained.
            out: ``loss_sum``, ``grad_norm`` (device tensors), ``masked``, ``tokens``, ``data_time``, ``lr``.
            tokens_seen: tokens trained on so far, this step included.
            log: whether this step is logged.
            flush: print it now rather than one step later (before validation, at the last step).
        """
        self.finish_log()  # the previous step's, read now that this step's work is queued behind it
        self.window.add(out["tokens"], out["data_time"])
        if log:
            self.pending = self.start_log(step, out, tokens_seen)
            if not self.defer or flush:  # nothing to hide the wait behind
                self.finish_log()

    def exclude(self, seconds: float) -> None:
        """Time spent outside training (validation) that the throughput window must not count."""
        self.window.exclude(seconds)

    def log_validation(self, step: int, scalars: dict[str, float], summary: str) -> None:
        self.logger.log_validation(step, scalars, summary)

    def start_log(self, step: int, out: dict[str, Any], tokens_seen: int) -> LoggedStep:
        """Queues the copy of a logged step's device metrics to the host (all-reduced over ranks) and notes its
        host-side values; :meth:`finish_log` reads and logs them, normally one step later (on a GPU: see
        ``defer``)."""
        loss_sum = out["loss_sum"].double()  # float64: masked-token counts of large batches stay exact
        totals = all_reduce_sum(torch.stack([loss_sum, loss_sum.new_full((), out["masked"])]))
        memory = device_memory(self.device)  # the allocator's host-side counters: no sync
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return LoggedStep(
            step=step,
            device=HostCopy({"totals": totals, "grad_norm": out["grad_norm"], "t_buckets": self.loss_by_t.take()}),
            lr=out["lr"],
            tokens_seen=tokens_seen,
            tokens=out["tokens"],
            memory=memory,
        )

    def finish_log(self) -> None:
        """Logs the step started by :meth:`start_log`, if one is pending."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        values = pending.device.read()
        seconds = None  # on a GPU, the window's length on its clock: right whenever the window is read
        if pending.device.event is not None and self.window_mark is not None:
            seconds = self.window_mark.elapsed_time(pending.device.event) / 1e3
            self.window_mark = pending.device.event
        rates = self.window.read(self.world_size, seconds)
        loss, masked = values["totals"].tolist()
        self.last_loss = loss
        grad_norm = values["grad_norm"].item()
        if not math.isfinite(grad_norm) and self.rank == 0:
            print(f"warning: non-finite grad norm at step {pending.step}")
        self.log(pending.step, {
            "loss": loss,
            "lr": pending.lr,
            "grad_norm": grad_norm,
            **rates,
            "mfu": mfu(rates["tokens_per_s_per_device"], self.flops_per_token, device_name(self.device)),
            "tokens_seen": float(pending.tokens_seen),
            **({"masked_fraction": masked / pending.tokens} if self.diffusion else {}),
            **pending.memory,
            **bucket_means(values["t_buckets"]),
        })

    def close(self) -> None:
        self.logger.close()
