"""``python -m dlm_titan.train``: the masked-diffusion pretraining loop (or its autoregressive baseline).

The Trainer composes the pieces below it (config, model, parallelize, data, diffusion, optim, metrics,
checkpoint, validation) and nothing imports it. It owns the loop: the steps, the non-finite guard and the
preemption signals; the metrics component logs each step and the checkpoint manager saves. Launch through
``run_train.sh`` (torchrun) or directly for one process.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from dlm_kernels import fused_supported, masked_linear_cross_entropy

from dlm_titan import distributed as dist_utils
from dlm_titan.ar_validation import NextTokenValidator
from dlm_titan.autoregressive import next_token_micro_batch
from dlm_titan.checkpoint import CheckpointManager
from dlm_titan.checkpoint.write_errors import STORAGE_FULL_ERRNOS
from dlm_titan.checkpoint_layout import checkpoint_folder_of, newest_complete, print_warning
from dlm_titan.config import JobConfig, load_config, to_toml
from dlm_titan.config_checks import checkpoint_folder_inside
from dlm_titan.data import build_train_loader, resolve_data_path, resolve_vocab_size, used_sources
from dlm_titan.data.loader import micro_batches_per_step
from dlm_titan.data.shards import check_leading_ids, list_shards, read_header
from dlm_titan.diffusion import MaskedBatch, forward_process, sample_noise, ssl_length
from dlm_titan.errors import UserError, report, report_interrupted
from dlm_titan.fileio import atomic_write_text
from dlm_titan.flops import step_flops, steps_from_budget
from dlm_titan.interop.init_shape import InitialShape, build_training_model, run_flavor
from dlm_titan.metrics import TrainMetrics
from dlm_titan.models import get_model_args, model_config
from dlm_titan.nonfinite import NonFiniteGuard, NonFiniteStop
from dlm_titan.optim import build_lr_scheduler, build_optimizer, clip_grad_norm, resolve_warmup_steps
from dlm_titan.parallelize import parallelize_model, set_gradient_sync
from dlm_titan.preemption import StopSignals
from dlm_titan.profiling import Profiler
from dlm_titan.run_lock import hold_dump_folder
from dlm_titan.saved_config import RUN_CONFIG_FILE
from dlm_titan.transfers import to_device
from dlm_titan.validation import SequenceLossTap, build_validator, coverage_change


class Trainer:
    """Builds the model, optimizer, schedule, loader, metrics and checkpointing from a JobConfig, then trains."""

    def __init__(self, cfg: JobConfig, host_group: torch.distributed.ProcessGroup | None = None):
        """Args:
            cfg: the run's settings.
            host_group: the gloo group of all ranks for host-side agreements: ``main`` passes the one it held the
                run lock with, so a run makes one; None (a Trainer built directly, as tests do) makes one here.
        """
        # model.vocab_size 0 follows the tokenizer (or the shards' manifests); resolved before anything reads it,
        # so the printed and saved config hold the real size.
        cfg.model.vocab_size = resolve_vocab_size(cfg.model.vocab_size, cfg.data)
        self.cfg = cfg
        self.rank, world_size, self.device = dist_utils.init_distributed()
        self.host_group = host_group if host_group is not None else dist_utils.new_host_group()
        self.dims = dist_utils.resolve_parallel_dims(cfg.parallelism, world_size, self.rank)
        training = cfg.training
        self.micro_batches = micro_batches_per_step(training.global_batch_size, training.local_batch_size, world_size)
        self.dump_folder = Path(cfg.job.dump_folder)
        check_unresumed_checkpoints(cfg)  # before anything is written there (config.toml, tb, an export)
        self.log = print if self.rank == 0 else (lambda *a, **k: None)
        torch.manual_seed(training.seed)
        dist_utils.set_determinism(training.deterministic, cfg.model, self.device)  # before anything touches cuBLAS
        self._build_model()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.device.type)
        self.params = list(self.model.parameters())
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.optimizer.lr, self.steps)
        data_path = resolve_data_path(cfg.data)
        self.data_loader = train_loader(cfg, data_path, self.rank, world_size)
        self.autocast = _autocast(training.dtype, self.device, fsdp=self.dims.sharded)
        self.validator = run_validator(cfg, self.model, data_path, self.rank, world_size, self.device, self.autocast)
        self.step = 0
        self.tokens_seen = 0
        if self.rank == 0 and cfg.job.print_config:
            print(to_toml(cfg))
        for line in plan_summary(cfg, self.model, self.steps, self.dims.world_size, self.micro_batches, self.device,
                                 data_path, self.initial_shape):
            self.log(line)
        self.log(self.parallel_plan.describe())
        self._build_checkpointing()
        # after every refusal of a bad start (validation data, the resume): TensorBoard's folder and events are made
        # here, and a refused start must leave none in a dump folder it made
        self.metrics = TrainMetrics(cfg, self.model_args, self.rank, world_size, self.device)
        if self.rank == 0:  # after the load: a resume refused (another model, seq_len, ...) keeps the saved one
            write_config(cfg)
        self.keep_grads = keeps_gradients(self.dims.form, self.parallel_plan.cudagraphs, self.micro_batches)
        if self.keep_grads and self.parallel_plan.cudagraphs:
            allocate_gradients(self.params)

    def _build_model(self) -> None:
        """The model, built on the meta device, parallelized, then materialized and initialised; its loss."""
        training = self.cfg.training
        # read once: the model's shape, the flavor the run records and the plan's log line all come from it
        self.initial_shape = InitialShape.read(self.cfg.checkpoint.initial_load_path)
        self.model = build_training_model(self.cfg, training.seq_len, self.device,  # flavor, or initial folder
                                          causal=training.objective == "ar", initial=self.initial_shape)
        self.model_args = self.model.args
        self.steps = resolve_steps(self.cfg, self.model_args)
        mesh = dist_utils.build_mesh(self.dims, self.device)
        self.parallel_plan = parallelize_model(self.model, self.cfg, mesh, self.device)
        self.model.to_empty(device=self.device)
        self.model.init_weights(seed=training.seed)
        # The loss the model's forward computes: the masked cross-entropy, through a tap that also keeps the
        # per-sequence losses of logged steps (for the loss by t).
        check_loss_impl(self.cfg.diffusion.loss_impl, self.device)
        self.loss_tap = SequenceLossTap(partial(masked_linear_cross_entropy, impl=self.cfg.diffusion.loss_impl))
        self.loss_fn = self.loss_tap
        self.model.train()

    def _build_checkpointing(self) -> None:
        """The non-finite guard, the stop signals and the checkpoint manager, then the resume (or initial load)."""
        flags = self.host_group  # per-step agreements across ranks, off the GPU and its stream
        self.nonfinite = NonFiniteGuard(self.cfg.training.on_nonfinite, self.rank, flags,
                                        self.cfg.training.max_consecutive_skips)
        self.signals = StopSignals(flags)
        self.checkpointer = CheckpointManager(self.cfg, self.model, self.optimizer, self.lr_scheduler, self.data_loader,
                                              model_config(self.model, run_flavor(self.cfg, self.initial_shape)),
                                              barrier_group=flags)
        if self.cfg.checkpoint.enable:  # a stop signal saves; without checkpoints it ends the run as usual
            self.signals.install(self.data_loader)
        self.step, self.tokens_seen = self.checkpointer.load()  # resume, or initial_load_path weights
        for note in self.lr_scheduler.resume_notes:  # this run's hyper-parameters that differ from the checkpoint's
            self.log(note)
        if self.rank == 0 and (change := coverage_change(self.cfg, self.validator, self.checkpointer.resumed_layout,
                                                         self.step)):
            print_warning(change)

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` micro-batches.

        Loss normalisation: SMDM's loss of a batch is sum_{masked i} CE_i / p_i divided by its token count.
        Each micro-batch backpropagates its own masked sum divided by the token count T of the whole step
        (all micro-batches, all ranks: known up front, see step_token_count), and FSDP or DDP sums gradients
        over ranks (divide factor 1, or a summing comm hook). The accumulated gradient is then d/dθ [sum over
        the step / T], the same whatever the split into ranks and micro-batches, so 1 rank x 8 micro-batches
        equals 8 ranks x 1.
        """
        token_count = step_token_count(self.cfg, step)
        # losses by diffusion time t on logged steps (MDM only: the autoregressive baseline has no t)
        self.loss_tap.armed = self._is_log_step(step) and self.cfg.training.objective == "mdm"
        loss_sum = torch.zeros((), device=self.device)
        masked, data_time, micro_losses = 0, 0.0, []
        for i in range(self.micro_batches):
            if self.parallel_plan.accumulate_without_sync:
                set_gradient_sync(self.model, last_micro_batch=i == self.micro_batches - 1)
            start = time.perf_counter()
            batch = next(self.data_iter)
            data_time += time.perf_counter() - start
            mb, t, length = objective_micro_batch(self.cfg, batch, step, token_count, self.model_args.mask_id)
            masked += mb.num_masked
            inputs, targets, weights, index = (
                to_device(x, self.device) for x in (mb.inputs, mb.targets, mb.token_weights, mb.masked_index)
            )
            with self.autocast:
                loss = self.model(inputs, targets, weights, index, loss_fn=self.loss_fn)
            loss.backward()
            loss_sum += loss.detach()
            micro_losses.append(loss.detach())
            if self.loss_tap.armed:  # per-sequence loss: sum of CE / p over its tokens, divided by its length
                self.metrics.loss_by_t.add(t, self.loss_tap.take(len(t)) * (token_count / length))
        return {"loss_sum": loss_sum, "masked": masked, "tokens": token_count, "data_time": data_time,
                **self._update(step, micro_losses, token_count)}

    def _update(self, step: int, micro_losses: list[torch.Tensor], token_count: int) -> dict[str, Any]:
        """Clips, applies the update unless the non-finite guard drops it, moves the schedule on, clears grads."""
        # The Triton AdamW takes the clip coefficient into its update; other optimizers get clipped gradients.
        grad_norm, grad_scale = clip_grad_norm(self.params, self.cfg.training.max_norm, self.optimizer)
        lr = self.lr_scheduler.get_last_lr()[0]  # this step's, logged with it (the schedule moves on below)
        if self.nonfinite.check(step, micro_losses, grad_norm):  # else training.on_nonfinite
            self.optimizer.step(**({} if grad_scale is None else {"grad_scale": grad_scale}))
        self.lr_scheduler.step()
        # DDP keeps gradients as views of its buckets: zero them in place, or autograd allocates a second set and
        # the reducer copies it into the buckets at every synced backward. CUDA graphs accumulating over several
        # micro-batches need them in place too (keeps_gradients).
        self.optimizer.zero_grad(set_to_none=not self.keep_grads)
        self.tokens_seen += token_count
        return {"grad_norm": grad_norm, "lr": lr}

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
            self.signals.restore()  # _close restores them on success; a caller living on must get SIGTERM back
            raise
        finally:
            gc.enable()
            self.metrics.close()
            if hasattr(self.data_iter.it, "_shutdown_workers"):
                self.data_iter.it._shutdown_workers()  # else each persistent worker waits out a 5 s timeout
        self._close()

    def _train_loop(self) -> None:
        self.metrics.start()
        try:
            with Profiler(self.cfg.profiling, self.dump_folder, self.rank, self.device, self.step, self.log) as profiler:
                while self.step < self.steps:
                    if self._train_one_step(profiler):
                        break  # SIGTERM/SIGUSR1 or a non-finite step with on_nonfinite = "stop": state saved
        except BaseException:
            # e.g. on_nonfinite = "raise" raising one step late: still print the step it names. Best effort: the
            # device may be what failed.
            with contextlib.suppress(Exception):
                self.metrics.finish_log()
            raise
        self.metrics.finish_log()

    def _train_one_step(self, profiler: Profiler) -> bool:
        """One step and what follows it (logging, validation, checkpointing); True when the run must stop."""
        self.step += 1
        last = self.step == self.steps
        out = self.train_step(self.step)
        validate = self.validator is not None and (self.step % self.cfg.validation.freq == 0 or last)
        self.metrics.step_done(self.step, out, self.tokens_seen, log=self._is_log_step(self.step), flush=validate or last)
        if self.step % self.cfg.training.gc_freq == 0:
            gc.collect(1)
        profiler.step()
        if validate and not self.signals.received():  # a pending stop saves first: validating may outlast its grace
            result = self.validator.run()
            self.metrics.exclude(result.seconds)
            self.metrics.log_validation(self.step, result.scalars(), result.summary())
        return self._end_step(last)

    def _end_step(self, last: bool) -> bool:
        """Saves when due and tells whether the loop must stop: a stop signal on any rank (SIGTERM/SIGUSR1), or a
        non-finite step under on_nonfinite = "stop". Either way the state is saved first."""
        signalled = self.signals.received()
        stop = bool(signalled) or self.nonfinite.stop_requested
        if stop or self.checkpointer.save_due(self.step, last):
            self.nonfinite.resolve_deferred()  # a deferred "raise" verdict first: no checkpoint holds a bad update
        if not self.nonfinite.diverged:  # a diverged run saves nothing: its newest checkpoint is its last good one
            # An early stop saves only with checkpointing on: without it (a non-finite step under on_nonfinite =
            # "stop") step_end wrote a step-N the run had not asked for, while the error line said nothing was saved.
            self.checkpointer.step_end(self.step, self.tokens_seen, last=last,
                                       stop=stop and self.cfg.checkpoint.enable, last_loss=self.metrics.last_loss)
        if signalled:
            self.log(f"checkpoint: stopping at step {self.step} on signal {signal.Signals(signalled).name}; rerun the "
                     "same command to resume", flush=True)
        return stop

    def _close(self) -> None:
        """After the loop: waits for saves, exports a completed run's weights, restores the signal handlers; raises
        FloatingPointError if a non-finite step ended the run ("stop", or a deferred "raise"). Collective."""
        try:
            self.nonfinite.resolve_deferred()
            completed = self.step >= self.steps and not self.nonfinite.stop_requested
            self.checkpointer.close(self.step, export=completed)
        finally:
            self.signals.restore()
        if self.nonfinite.stop_requested:
            saved = str(self.checkpointer.step_folder(self.step)) if self.cfg.checkpoint.enable else None
            raise NonFiniteStop(self.nonfinite.stop_message(self.step, saved))

    def _is_log_step(self, step: int) -> bool:
        return step % self.cfg.metrics.log_freq == 0 or step in (1, self.steps)


def write_config(cfg: JobConfig) -> None:
    """The run's whole config as ``{dump_folder}/config.toml`` (what a rerun or a reader of the folder sees)."""
    dump_folder = Path(cfg.job.dump_folder)
    dump_folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dump_folder / RUN_CONFIG_FILE, to_toml(cfg))


def check_unresumed_checkpoints(cfg: JobConfig) -> None:
    """Refuses a run that would start afresh beside complete checkpoints of its dump folder that it cannot resume.

    With checkpoint.enable off, or a checkpoint.folder other than the one the dump folder's config.toml records, the
    run trained from step 0 without a word: its TensorBoard events mixed into the earlier run's, its config.toml
    replaced the earlier one (hiding where the checkpoints are) and its export replaced the earlier export.

    Raises:
        UserError: naming the checkpoints and the flag that resumes them.
    """
    dump = Path(cfg.job.dump_folder)
    previous = checkpoint_folder_of(dump)
    this = dump / cfg.checkpoint.folder if cfg.checkpoint.enable else None
    if previous == this:
        return
    newest = newest_complete(previous, warn=False)
    if newest is None:
        return
    if this is None:
        raise UserError(f"{dump} holds checkpoints (newest {newest}) that this run, with checkpoint.enable off, would "
                        "not resume: add --checkpoint.enable to resume them, or choose another --job.dump_folder")
    folder = previous.relative_to(dump) if previous.is_relative_to(dump) else previous
    if not checkpoint_folder_inside(folder, dump):  # recorded before checkpoint.folder had to stay inside
        raise UserError(f"{dump} holds checkpoints in {previous} (newest {newest.name}), outside the dump folder, "
                        f"where no run saves now: move that folder into {dump} and resume with --checkpoint.folder "
                        "set to its place there (e.g. checkpoint), or choose another --job.dump_folder")
    raise UserError(f"{dump} holds checkpoints in {previous} (newest {newest.name}) but this run saves to {this}: "
                    f"resume them with --checkpoint.folder {folder}, or choose another --job.dump_folder")


def check_loss_impl(impl: str, device: torch.device) -> None:
    """Refuses diffusion.loss_impl = "fused" where its Triton kernel cannot run, at start rather than as the kernel's
    ValueError traceback in the first step."""
    if impl == "fused" and not fused_supported(device):
        raise UserError(f'diffusion.loss_impl = "fused" cannot run on {device.type} (it needs triton and a CUDA GPU); '
                        "use --diffusion.loss_impl auto or torch")


def keeps_gradients(form: str, cudagraphs: bool, micro_batches: int) -> bool:
    """Whether gradients stay allocated between steps (zeroed in place) instead of being set to None.

    DDP keeps them as views of its buckets. CUDA-graphed backward passes write gradients into the graphs' memory
    pool, which the next replay overwrites: over several micro-batches (or with DDP's buckets) they must accumulate
    into buffers of their own. One graphed micro-batch without DDP needs none: the optimizer reads the pool's
    gradients and zero_grad drops them before the next replay, which spares a zero fill and an add per parameter
    (170M on one H200: 294.5k tokens/s against 289.0k).
    """
    return form == "ddp" or (cudagraphs and micro_batches > 1)


def allocate_gradients(params: list[torch.Tensor]) -> None:
    """Zeroed gradient buffers for CUDA-graphed backward passes to accumulate into (with zero_grad in place).

    A gradient left to the first backward would live in the graphs' memory pool and be overwritten by the next
    micro-batch. Call after the checkpoint load: DCP fills an optimizer's empty state (to load Adam's moments
    into) only while no parameter has a gradient.
    """
    for param in params:
        param.grad = torch.zeros_like(param)


def plan_summary(cfg: JobConfig, model, steps: int, world_size: int, micro_batches: int, device: torch.device,
                 data_path: Path, initial: InitialShape | None = None) -> list[str]:
    """The run's plan as the log lines printed before training: the model, and the steps and batch layout.
    ``initial``: the run's :class:`InitialShape` where already read."""
    training, a = cfg.training, model.args
    warmup = resolve_warmup_steps(cfg.lr_scheduler.warmup_steps, steps)
    initial = initial or InitialShape.read(cfg.checkpoint.initial_load_path)
    shaped_by_folder = initial.model_args(cfg.model.vocab_size) is not None
    name = f"of {cfg.checkpoint.initial_load_path}" if shaped_by_folder else cfg.model.flavor
    return [
        f"model {name}: {a.n_layers} layers, d={a.dim}, {a.non_embedding_params():,} non-embedding "
        f"params, {a.total_params(mask_row=not model.causal):,} total; attention backend {model.attn_backend}"
        + ("; objective ar (causal attention, next-token loss)" if training.objective == "ar" else ""),
        f"training: {steps:,} steps, {steps * training.global_batch_size * training.seq_len:,} tokens, warmup "
        f"{warmup} steps, global batch {training.global_batch_size} x {training.seq_len} = {world_size} ranks x "
        f"{micro_batches} micro-batches x {training.local_batch_size}; device {device}; data {data_path}",
    ]


def resolve_steps(cfg: JobConfig, model_args) -> int:
    """training.steps, or the steps that spend training.flops_budget (SMDM's 6 N tokens rule) when it is set."""
    training = cfg.training
    if training.flops_budget <= 0:
        return training.steps
    steps = steps_from_budget(training.flops_budget, model_args.non_embedding_params(), training.global_batch_size,
                              training.seq_len, cfg.diffusion.ssl_ratio)
    if steps < 1:  # name the least budget that trains
        one_step = step_flops(model_args.non_embedding_params(), training.global_batch_size, training.seq_len,
                              cfg.diffusion.ssl_ratio)
        raise UserError(f"training.flops_budget = {training.flops_budget:.3g} is less than one step of this model and "
                        f"batch ({math.ceil(one_step)} FLOPs); raise --training.flops_budget to at least that, or "
                        "set it to 0 and use --training.steps")
    return steps


def step_token_count(cfg: JobConfig, step: int) -> int:
    """Tokens in the whole optimizer step, over every micro-batch of every rank. Each micro-batch's length is
    keyed by its first global position, so every rank computes the same total before any forward."""
    training = cfg.training
    return sum(
        training.local_batch_size * ssl_length(training.seed, step, first, training.seq_len, cfg.diffusion.ssl_ratio)
        for first in range(0, training.global_batch_size, training.local_batch_size)
    )


def objective_micro_batch(cfg: JobConfig, batch: dict[str, torch.Tensor], step: int, token_count: int,
                          mask_id: int) -> tuple[MaskedBatch, torch.Tensor | None, int]:
    """The training objective's inputs of one micro-batch: SMDM's forward process, or next-token targets for the
    autoregressive baseline (every token predicted, no t); each weighted by the step's token count."""
    if cfg.training.objective == "ar":
        return next_token_micro_batch(cfg, batch, step, token_count)
    return diffusion_micro_batch(cfg, batch, step, token_count, mask_id)


def run_validator(cfg: JobConfig, model, data_path: str, rank: int, world_size: int, device: torch.device,
                  autocast):
    """The run's validator, or None when validation is off: the MDM loss with fixed noise, or the exact NLL per
    token for the autoregressive baseline."""
    validator = build_validator(cfg, model, data_path, rank, world_size, device, autocast)
    if validator is not None and cfg.training.objective == "ar":  # the exact NLL instead of the ELBO
        validator = NextTokenValidator.like(validator)
    return validator


def diffusion_micro_batch(cfg: JobConfig, batch: dict[str, torch.Tensor], step: int, token_count: int,
                          mask_id: int) -> tuple[MaskedBatch, torch.Tensor, int]:
    """The MDM objective's inputs of one micro-batch: SMDM's forward process on its tokens (cropped by SSL), with
    noise keyed by (seed, step, global position). Returns (the batch, each sequence's t, the length)."""
    training, diffusion = cfg.training, cfg.diffusion
    positions = batch["position"]
    length = ssl_length(training.seed, step, int(positions[0]), training.seq_len, diffusion.ssl_ratio)
    noise = sample_noise(positions, training.seq_len, seed=training.seed, step=step, t_sampling=diffusion.t_sampling,
                         num_positions=training.global_batch_size)
    mb = forward_process(batch["input"][:, :length], noise, eps=diffusion.eps, mask_id=mask_id, token_count=token_count)
    return mb, noise.t, length


def _autocast(dtype: str, device: torch.device, fsdp: bool):
    """bf16 autocast on GPU for one process or DDP (with FSDP, its mixed-precision policy casts instead);
    float32 on CPU unless asked otherwise."""
    if dtype == "float32" or (dtype == "auto" and (device.type != "cuda" or fsdp)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train_loader(cfg: JobConfig, data_path: str, rank: int, world_size: int):
    """The training loader of one rank; every rank is data-parallel (FSDP, HSDP and DDP alike)."""
    training = cfg.training
    return build_train_loader(cfg.data, data_path=data_path, seq_len=training.seq_len,
                              local_batch_size=training.local_batch_size, global_batch_size=training.global_batch_size,
                              dp_rank=rank, dp_world_size=world_size, seed=training.seed, vocab_size=cfg.model.vocab_size)


def check_config(cfg: JobConfig, world_size: int) -> int:
    """Validates what can be checked without building the model (run_train.sh runs it once before torchrun, so
    that bad input ends in one line and exit 2 rather than in every rank's error and torchrun's traceback): the
    processes per node against its GPUs, the flavor, parallel degrees, batch layout, the data folder, its shards'
    headers and the tokenizer, and the dump folder (another trainer's lock, checkpoints this run would not resume)."""
    # run_train.sh's check on the node it starts the processes on passes their count (NGPU) as LOCAL_WORLD_SIZE
    dist_utils.check_local_devices(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cfg.model.vocab_size = resolve_vocab_size(cfg.model.vocab_size, cfg.data)
    get_model_args(cfg.model.flavor, cfg.model.vocab_size)
    dist_utils.resolve_parallel_dims(cfg.parallelism, world_size, rank=0)
    micro_batches_per_step(cfg.training.global_batch_size, cfg.training.local_batch_size, world_size)
    data_path = resolve_data_path(cfg.data)
    train_loader(cfg, data_path, 0, world_size)
    for prefix, _ in used_sources(cfg.data):  # a header whose dtype code is wrong: found here, not mid-run on a rank
        for path in list_shards(data_path, prefix):
            check_leading_ids(read_header(path), cfg.model.vocab_size)
    # another trainer on this folder: refused now, not later; the check leaves no folder or lock file behind
    with hold_dump_folder(cfg.job.dump_folder, rank=0, leave_no_trace=True):
        check_unresumed_checkpoints(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input (or a full disk) prints one line and returns 2; a run ended by non-finite steps
    (training.on_nonfinite) prints one line and returns 1; Ctrl-C prints one line and returns 130; bugs raise with
    their traceback."""
    try:
        cfg = load_config(argv)
        if os.environ.get("DLM_TITAN_CHECK_ONLY"):
            return check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        rank = dist_utils.init_distributed()[0]
        host_group = dist_utils.new_host_group()  # the lock's broadcast, then the Trainer's per-step agreements
        with hold_dump_folder(cfg.job.dump_folder, rank, host_group):  # one run per dump folder
            Trainer(cfg, host_group).train()
    except UserError as e:
        return report(e)
    except KeyboardInterrupt:  # Ctrl-C: no save (SIGTERM and SIGUSR1 save first); one line instead of a traceback
        return report_interrupted("complete checkpoints already saved are intact (a save cut short is skipped on "
                                  "resume): rerun the same command to resume; SIGTERM or SIGUSR1 instead saves "
                                  "before stopping")
    except NonFiniteStop as e:  # the run diverged: not bad input, but no traceback either; state as it says
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk outside a checkpoint save (which reports its own): the config, an export
        if e.errno not in STORAGE_FULL_ERRNOS:
            raise
        return report(UserError(f"{e.strerror} ({e.filename or 'writing the dump folder'}); complete checkpoints "
                                "already saved are intact: free space (or fix the filesystem) and rerun the same "
                                "command"))
    finally:
        dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
