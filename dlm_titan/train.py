"""``python -m dlm_titan.train``: the masked-diffusion pretraining loop.

The Trainer composes the pieces below it (config, model, parallelize, data, diffusion, optim, metrics) and
nothing imports it. Launch through ``run_train.sh`` (torchrun) or directly for one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from dlm_titan import distributed as dist_utils
from dlm_titan.checkpoint import CheckpointManager
from dlm_titan.config import JobConfig, load_config, to_toml
from dlm_titan.data import build_train_loader, resolve_data_path
from dlm_titan.diffusion import forward_process, sample_noise, ssl_length
from dlm_titan.errors import UserError, report
from dlm_titan.checkpoint.export import model_config
from dlm_titan.flops import steps_from_budget
from dlm_titan.metrics import (
    MetricsLogger,
    TBuckets,
    ThroughputWindow,
    bucket_means,
    device_memory,
    device_name,
    mfu,
    model_flops_per_token,
)
from dlm_titan.models import build_model
from dlm_titan.optim import build_lr_scheduler, build_optimizer, clip_grad_norm, resolve_warmup_steps
from dlm_titan.parallelize import parallelize_model, set_gradient_sync
from dlm_titan.profiling import Profiler
from dlm_titan.transfers import HostCopy, device_mark, to_device
from dlm_titan.validation import SequenceLossTap, build_validator


@dataclasses.dataclass
class _LoggedStep:
    """A logged step between :meth:`Trainer._start_log` and :meth:`Trainer._finish_log`."""

    step: int
    device: HostCopy  # loss and masked-token totals, grad norm, loss-by-t sums
    lr: float
    tokens_seen: int
    tokens: int
    memory: dict[str, float | None]  # peaks read as the step was queued: the next step's allocations are not in it


class Trainer:
    """Builds the model, optimizer, schedule, loader and loggers from a JobConfig, then trains."""

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.rank, world_size, self.device = dist_utils.init_distributed()
        self.dims = dist_utils.resolve_parallel_dims(cfg.parallelism, world_size, self.rank)
        t = cfg.training
        self.micro_batches = _accumulation_steps(t.global_batch_size, t.local_batch_size, world_size)
        self.dump_folder = Path(cfg.job.dump_folder)
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        torch.manual_seed(t.seed)
        dist_utils.set_determinism(t.deterministic, cfg.model, self.device)  # before anything touches cuBLAS

        self.model = build_model(cfg.model, t.seq_len, self.device)
        self.model_args = self.model.args
        self.steps = self._resolve_steps()
        self.parallel_plan = parallelize_model(self.model, cfg, dist_utils.build_mesh(self.dims, self.device), self.device)
        self.model.to_empty(device=self.device)
        self.model.init_weights(seed=t.seed)
        self.loss_tap = SequenceLossTap(partial(_loss_fn(), impl=cfg.diffusion.loss_impl))  # per-sequence losses on log steps
        self.model.loss_fn = self.loss_tap
        self.model.train()

        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.params = list(self.model.parameters())
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.optimizer.lr, self.steps)
        data_path = resolve_data_path(cfg.data)
        self.data_loader = _train_loader(cfg, data_path, self.rank, world_size)
        self.autocast = _autocast(t.dtype, self.device, fsdp=self.dims.sharded)
        self.metrics = MetricsLogger(self.dump_folder / cfg.metrics.save_tb_folder, self.rank, cfg.metrics.enable_tensorboard,
                                     enable_wandb=cfg.metrics.enable_wandb, wandb_config=dataclasses.asdict(cfg))
        self.validator = build_validator(cfg, self.model, data_path, self.rank, world_size, self.device, self.autocast)
        self.t_buckets = TBuckets(self.device)
        # Read a logged step's metrics one step later, behind queued work (see _start_log). On the CPU, work runs
        # as it is issued: nothing to hide the wait behind, and the throughput window would miss that step.
        self.defer_logs = self.device.type == "cuda"
        self.pending_log: _LoggedStep | None = None  # a logged step's metrics on their way to the host
        self.step = 0
        self.tokens_seen = 0
        if self.rank == 0 and cfg.job.print_config:
            print(to_toml(cfg))
        self._print_plan(data_path)
        self.checkpointer = CheckpointManager(cfg, self.model, self.optimizer, self.lr_scheduler, self.data_loader,
                                              model_config(self.model, cfg.model.flavor))
        self.step, self.tokens_seen = self.checkpointer.load()  # resume, or initial_load_path weights
        self._write_config()  # after the load: a resume refused (another model, seq_len, ...) keeps the saved one
        self.keep_grads = keeps_gradients(self.dims.form, self.parallel_plan["cudagraphs"], self.micro_batches)
        if self.keep_grads and self.parallel_plan["cudagraphs"]:
            self._allocate_gradients()

    def _allocate_gradients(self) -> None:
        """Zeroed gradient buffers for CUDA-graphed backward passes to accumulate into (with zero_grad in place).

        A gradient left to the first backward would live in the graphs' memory pool and be overwritten by the
        next micro-batch. Call after the checkpoint load: DCP fills an optimizer's empty state (to load Adam's
        moments into) only while no parameter has a gradient.
        """
        for param in self.params:
            param.grad = torch.zeros_like(param)

    def _resolve_steps(self) -> int:
        t = self.cfg.training
        if t.flops_budget <= 0:
            return t.steps
        steps = steps_from_budget(
            t.flops_budget, self.model_args.non_embedding_params(), t.global_batch_size, t.seq_len, self.cfg.diffusion.ssl_ratio
        )
        if steps < 1:
            raise UserError(f"training.flops_budget = {t.flops_budget:.3g} is less than one step of this model and batch")
        return steps

    def _write_config(self) -> None:
        if self.rank == 0:
            self.dump_folder.mkdir(parents=True, exist_ok=True)
            (self.dump_folder / "config.toml").write_text(to_toml(self.cfg))

    def _print_plan(self, data_path: Path) -> None:
        t, a = self.cfg.training, self.model_args
        warmup = resolve_warmup_steps(self.cfg.lr_scheduler.warmup_steps, self.steps)
        self.log(
            f"model {self.cfg.model.flavor}: {a.n_layers} layers, d={a.dim}, {a.non_embedding_params():,} non-embedding "
            f"params, {a.total_params():,} total; attention backend {self.model.attn_backend}"
        )
        self.log(
            f"training: {self.steps:,} steps, {self.steps * t.global_batch_size * t.seq_len:,} tokens, warmup "
            f"{warmup} steps, global batch {t.global_batch_size} x {t.seq_len} = {self.dims.world_size} ranks x "
            f"{self.micro_batches} micro-batches x {t.local_batch_size}; device {self.device}; data {data_path}"
        )
        p = self.parallel_plan
        self.log(f"parallelism: {p['data_parallel'] or 'one process'}; compiled blocks {p['compiled_blocks']}"
                 f"{' (CUDA graphs)' if p['cudagraphs'] else ''}; "
                 f"activation checkpointing {p['ac']}; float8 linears {p['float8_linears']}")

    def _step_token_count(self, step: int) -> int:
        """Tokens in the whole optimizer step, over every micro-batch of every rank. Each micro-batch's length
        is keyed by its first global position, so every rank computes the same total before any forward."""
        t = self.cfg.training
        return sum(
            t.local_batch_size * ssl_length(t.seed, step, first, t.seq_len, self.cfg.diffusion.ssl_ratio)
            for first in range(0, t.global_batch_size, t.local_batch_size)
        )

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step over ``micro_batches`` micro-batches.

        Loss normalisation: SMDM's loss of a batch is sum_{masked i} CE_i / p_i divided by its token count.
        Each micro-batch backpropagates its own masked sum divided by the token count T of the whole step
        (all micro-batches, all ranks: known up front, see _step_token_count), and FSDP or DDP sums gradients
        over ranks (divide factor 1, or a summing comm hook). The accumulated gradient is then d/dθ [sum over the step / T], the same
        whatever the split into ranks and micro-batches, so 1 rank x 8 micro-batches equals 8 ranks x 1.
        """
        t, d = self.cfg.training, self.cfg.diffusion
        token_count = self._step_token_count(step)
        self.loss_tap.armed = self._is_log_step(step)
        loss_sum = torch.zeros((), device=self.device)
        masked, data_time, micro_losses = 0, 0.0, []
        for i in range(self.micro_batches):
            set_gradient_sync(self.model, last_micro_batch=i == self.micro_batches - 1)
            start = time.perf_counter()
            batch = next(self.data_iter)
            data_time += time.perf_counter() - start
            positions = batch["position"]
            length = ssl_length(t.seed, step, int(positions[0]), t.seq_len, d.ssl_ratio)
            tokens = batch["input"][:, :length]
            noise = sample_noise(
                positions, t.seq_len, seed=t.seed, step=step, t_sampling=d.t_sampling, num_positions=t.global_batch_size
            )
            mb = forward_process(tokens, noise, eps=d.eps, mask_id=self.model_args.mask_id, token_count=token_count)
            masked += mb.num_masked
            inputs, targets, weights, index = (
                to_device(x, self.device) for x in (mb.inputs, mb.targets, mb.token_weights, mb.masked_index)
            )
            with self.autocast:
                loss = self.model(inputs, targets, weights, index)
            loss.backward()
            loss_sum += loss.detach()
            micro_losses.append(loss.detach())
            if self.loss_tap.armed:  # per-sequence loss: sum of CE / p over its tokens, divided by its length
                self.t_buckets.add(noise.t, self.loss_tap.take(len(positions)) * (token_count / length))
        # The Triton AdamW takes the clip coefficient into its update; other optimizers get clipped gradients.
        grad_norm, grad_scale = clip_grad_norm(self.params, self.cfg.training.max_norm, self.optimizer)
        lr = self.lr_scheduler.get_last_lr()[0]  # this step's, logged with it (the schedule moves on below)
        if self.checkpointer.check_finite(step, micro_losses, grad_norm):  # else training.on_nonfinite
            self.optimizer.step(**({} if grad_scale is None else {"grad_scale": grad_scale}))
        self.lr_scheduler.step()
        # DDP keeps gradients as views of its buckets: zero them in place, or autograd allocates a second set and
        # the reducer copies it into the buckets at every synced backward. CUDA graphs accumulating over several
        # micro-batches need them in place too (keeps_gradients).
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        self.tokens_seen += token_count
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "masked": masked, "tokens": token_count, "data_time": data_time,
                "lr": lr}

    def train(self) -> None:
        """Runs steps until ``self.steps``, logging every metrics.log_freq steps and at the last step, and
        validating every validation.freq steps and at the end."""
        self.data_iter = iter(self.data_loader)
        gc.disable()  # automatic collection stalls steps at random; collect every gc_freq steps instead
        try:
            self._train_loop()
        except BaseException:
            # A bad shard met mid-run, Ctrl-C, a bug: let a save being written in the background finish (its thread
            # marks it complete) before the process ends, so the run loses nothing it had saved.
            self.checkpointer.finish_in_flight()
            raise
        finally:
            gc.enable()
            self.metrics.close()
            if hasattr(self.data_iter.it, "_shutdown_workers"):
                self.data_iter.it._shutdown_workers()  # else each persistent worker waits out a 5 s timeout
        self.checkpointer.close(self.step, completed=self.step >= self.steps)  # export; raises after a "stop"

    def _train_loop(self) -> None:
        self.window = ThroughputWindow()
        self.window_mark = device_mark(self.device)  # where the throughput window starts on the device's clock
        self.pending_log = None
        try:
            with Profiler(self.cfg.profiling, self.dump_folder, self.rank, self.device, self.step, self.log) as profiler:
                while self.step < self.steps:
                    if self._train_one_step(profiler):
                        break  # SIGTERM/SIGUSR1 or a non-finite step with on_nonfinite = "stop": state saved
        except BaseException:
            # e.g. on_nonfinite = "raise" raising one step late: still print the step it names. Best effort: the
            # device may be what failed.
            with contextlib.suppress(Exception):
                self._finish_log()
            raise
        self._finish_log()

    def _train_one_step(self, profiler: Profiler) -> bool:
        """One step and what follows it (logging, validation, checkpointing); True when the run must stop."""
        self.step += 1
        out = self.train_step(self.step)
        self._finish_log()  # the previous step's, read now that this step's work is queued behind it
        self.window.add(out["tokens"], out["data_time"])
        if self.step % self.cfg.training.gc_freq == 0:
            gc.collect(1)
        validate = self.validator is not None and (self.step % self.cfg.validation.freq == 0 or self.step == self.steps)
        if self._is_log_step(self.step):
            self.pending_log = self._start_log(out)
            if not self.defer_logs or validate or self.step == self.steps:  # nothing to hide the wait behind
                self._finish_log()
        profiler.step()
        if validate:
            self._validate()
        return self.checkpointer.step_end(self.step, self.tokens_seen, last=self.step == self.steps)

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.metrics.log_freq == 0 or step in (1, self.steps)

    def _validate(self) -> None:
        result = self.validator.run()
        self.window.exclude(result.seconds)
        self.metrics.log_validation(self.step, result.scalars(), result.summary())

    def _start_log(self, out: dict) -> _LoggedStep:
        """Queues the copy of a logged step's device metrics to the host (all-reduced over ranks) and notes its
        host-side values; :meth:`_finish_log` reads and logs them, normally one step later (on a GPU: see
        ``defer_logs``)."""
        loss_sum = out["loss_sum"].double()  # float64: masked-token counts of large batches stay exact
        totals = dist_utils.all_reduce_sum(torch.stack([loss_sum, loss_sum.new_full((), out["masked"])]))
        memory = device_memory(self.device)  # the allocator's host-side counters: no sync
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return _LoggedStep(
            step=self.step,
            device=HostCopy({"totals": totals, "grad_norm": out["grad_norm"], "t_buckets": self.t_buckets.take()}),
            lr=out["lr"],
            tokens_seen=self.tokens_seen,
            tokens=out["tokens"],
            memory=memory,
        )

    def _finish_log(self) -> None:
        """Logs the step started by :meth:`_start_log`, if one is pending."""
        pending, self.pending_log = self.pending_log, None
        if pending is None:
            return
        values = pending.device.read()
        seconds = None  # on a GPU, the window's length on its clock: right whenever the window is read
        if pending.device.event is not None and self.window_mark is not None:
            seconds = self.window_mark.elapsed_time(pending.device.event) / 1e3
            self.window_mark = pending.device.event
        rates = self.window.read(self.dims.world_size, seconds)
        loss, masked = values["totals"].tolist()
        grad_norm = values["grad_norm"].item()
        if not math.isfinite(grad_norm):
            self.log(f"warning: non-finite grad norm at step {pending.step}")
        fpt = model_flops_per_token(self.model_args, self.cfg.training.seq_len)
        metrics = {
            "loss": loss,
            "lr": pending.lr,
            "grad_norm": grad_norm,
            **rates,
            "mfu": mfu(rates["tokens_per_s_per_device"], fpt, device_name(self.device)),
            "tokens_seen": float(pending.tokens_seen),
            "masked_fraction": masked / pending.tokens,
            **pending.memory,
            **bucket_means(values["t_buckets"]),
        }
        self.metrics.log(pending.step, metrics)


def keeps_gradients(form: str, cudagraphs: bool, micro_batches: int) -> bool:
    """Whether gradients stay allocated between steps (zeroed in place) instead of being set to None.

    DDP keeps them as views of its buckets. CUDA-graphed backward passes write gradients into the graphs' memory
    pool, which the next replay overwrites: over several micro-batches (or with DDP's buckets) they must accumulate
    into buffers of their own. One graphed micro-batch without DDP needs none: the optimizer reads the pool's
    gradients and zero_grad drops them before the next replay, which spares a zero fill and an add per parameter
    (170M on one H200: 294.5k tokens/s against 289.0k).
    """
    return form == "ddp" or (cudagraphs and micro_batches > 1)


def _accumulation_steps(global_batch: int, local_batch: int, world_size: int) -> int:
    if global_batch % (local_batch * world_size):
        raise UserError(
            f"training.global_batch_size ({global_batch}) must be a multiple of local_batch_size ({local_batch}) x "
            f"data-parallel ranks ({world_size}); e.g. --training.global_batch_size {local_batch * world_size * max(1, global_batch // (local_batch * world_size))}"
        )
    return global_batch // (local_batch * world_size)


def _autocast(dtype: str, device: torch.device, fsdp: bool):
    """bf16 autocast on GPU for one process or DDP (with FSDP, its mixed-precision policy casts instead);
    float32 on CPU unless asked otherwise."""
    if dtype == "float32" or (dtype == "auto" and (device.type != "cuda" or fsdp)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _loss_fn():
    from dlm_kernels import masked_linear_cross_entropy

    return masked_linear_cross_entropy


def check_config(cfg: JobConfig, world_size: int) -> int:
    """Validates what can be checked without building the model (run_train.sh runs it once before torchrun, so
    that bad input ends in one line and exit 2 rather than in every rank's error and torchrun's traceback): the
    flavor, parallel degrees, batch layout, the data folder, its shards' headers and the tokenizer."""
    from dlm_titan.models import get_model_args

    get_model_args(cfg.model.flavor, cfg.model.vocab_size)
    dist_utils.resolve_parallel_dims(cfg.parallelism, world_size, rank=0)
    _accumulation_steps(cfg.training.global_batch_size, cfg.training.local_batch_size, world_size)
    _train_loader(cfg, resolve_data_path(cfg.data), 0, world_size)
    return 0


def _train_loader(cfg: JobConfig, data_path: str, rank: int, world_size: int):
    """The training loader of one rank; every rank is data-parallel (FSDP, HSDP and DDP alike)."""
    t = cfg.training
    return build_train_loader(cfg.data, data_path=data_path, seq_len=t.seq_len, local_batch_size=t.local_batch_size,
                              global_batch_size=t.global_batch_size, dp_rank=rank, dp_world_size=world_size,
                              seed=t.seed, vocab_size=cfg.model.vocab_size)


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input prints one line and returns 2; bugs raise with their traceback."""
    try:
        cfg = load_config(argv)
        if os.environ.get("DLM_TITAN_CHECK_ONLY"):
            return check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        Trainer(cfg).train()
    except UserError as e:
        return report(e)
    finally:
        dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
