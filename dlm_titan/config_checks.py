"""Validation of a resolved run config: what :func:`dlm_titan.config.load_config` refuses beyond types.

tyro (CLI) and the TOML reader check each value's type and choices; this module checks the values
themselves: numeric ranges (one table, ``_RANGES``), finiteness of every float, float32 bounds of AdamW's
scalars, UTF-8 of every string, start-up memory bounds, the dump folder, and rules that tie fields together.
Each failure is a :class:`~dlm_titan.errors.UserError` naming the option. It imports nothing from dlm_titan at
run time except the error type (the config classes only for type hints), so config.py can call it without an
import cycle.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import typing
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from dlm_titan.errors import UserError

if TYPE_CHECKING:
    from dlm_titan.config import JobConfig, Training


def _validation_on(c: JobConfig) -> bool:
    return c.validation.enable


def _profiling_on(c: JobConfig) -> bool:
    return c.profiling.enable_profiling or c.profiling.enable_memory_snapshot


_SEED_MAX = 2**32 - 1  # numpy's seed range; every generator keyed by the seed (init, data order, noise) takes it

# The one home of numeric range checks: (key, ok, rule[, applies]). A value outside would end in a traceback deep
# in training or a silently wrong run. ``applies(config)`` limits a row to runs that use the value. Every float
# value (lists included) must also be finite (_check_finite), before these rows are read.
_RANGES = (
    ("model.vocab_size", lambda v: v >= 0, ">= 0 (0 = the tokenizer's vocabulary)"),
    ("training.global_batch_size", lambda v: v >= 1, ">= 1"),
    ("training.local_batch_size", lambda v: v >= 1, ">= 1"),
    ("training.seq_len", lambda v: v >= 1, ">= 1"),
    ("training.flops_budget", lambda v: v >= 0, ">= 0 (0 = use training.steps)"),
    ("training.seed", lambda v: 0 <= v <= _SEED_MAX, f"in [0, {_SEED_MAX}]"),
    ("training.gc_freq", lambda v: v >= 1, ">= 1"),
    ("training.max_consecutive_skips", lambda v: v >= 1, ">= 1"),
    ("diffusion.ssl_ratio", lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    ("diffusion.eps", lambda v: 0 < v < 1, "in (0, 1) (mask probability floor)"),
    ("optimizer.lr", lambda v: v > 0, "> 0"),
    ("optimizer.betas", lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
    ("optimizer.eps", lambda v: v > 0, "> 0"),
    ("optimizer.weight_decay", lambda v: v >= 0, ">= 0"),
    ("lr_scheduler.warmup_steps", lambda v: v >= -1, ">= 0, or -1 for SMDM's max(1% of steps, 100)"),
    ("lr_scheduler.min_lr", lambda v: v >= 0, ">= 0"),
    ("data.train_weights", lambda v: all(w >= 0 for w in v) and sum(v) > 0, ">= 0 with a positive sum"),
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("parallelism.data_parallel_shard_degree", lambda v: v >= 1 or v == -1,
     ">= 1 or -1 (all ranks the other degree leaves)"),
    ("parallelism.data_parallel_replicate_degree", lambda v: v >= 1 or v == -1,
     ">= 1 or -1 (all ranks the other degree leaves)"),
    ("parallelism.ddp_bucket_cap_mb", lambda v: v >= 1, ">= 1"),
    ("checkpoint.write_threads", lambda v: v >= 1, ">= 1"),
    ("checkpoint.interval", lambda v: v >= 0, ">= 0 (0 saves only at the end)"),
    ("checkpoint.keep_latest_k", lambda v: v >= 0, ">= 0 (0 keeps all)"),
    ("checkpoint.load_step", lambda v: v >= -1, ">= 0, or -1 for the newest complete checkpoint"),
    ("metrics.log_freq", lambda v: v >= 1, ">= 1"),
    ("activation_checkpoint.selective_ac_option", lambda v: v == "op" or (v.isdigit() and int(v) >= 1),
     '"op" or a positive integer (checkpoint every Nth block)', lambda c: c.activation_checkpoint.mode == "selective"),
    ("validation.freq", lambda v: v >= 1, ">= 1", _validation_on),
    ("validation.steps", lambda v: v >= 1 or v == -1, ">= 1, or -1 for the whole validation set", _validation_on),
    ("validation.mc_samples", lambda v: v >= 1, ">= 1", _validation_on),
    ("validation.seed", lambda v: 0 <= v <= _SEED_MAX, f"in [0, {_SEED_MAX}]", _validation_on),
    ("profiling.profile_freq", lambda v: v >= 1, ">= 1", _profiling_on),
)


def _value(config: JobConfig, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _float_keys(config: JobConfig) -> list[str]:
    """Every key whose value is a float or a list/tuple of floats."""
    keys = []
    for section, cls in typing.get_type_hints(type(config)).items():
        for key, hint in typing.get_type_hints(cls).items():
            if hint is float or float in typing.get_args(hint):
                keys.append(f"{section}.{key}")
    return keys


def _check_finite(config: JobConfig) -> None:
    """inf or nan passes most range checks (or fails them with a misleading rule) and then trains on silently:
    an infinite AdamW eps stops all learning, a nan max_norm turns clipping off."""
    for key in _float_keys(config):
        value = _value(config, key)
        if not all(math.isfinite(v) for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise UserError(f"--{key} must be finite (not inf or nan), got {value!r}")


def _check_utf8(config: JobConfig) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (sys.argv's surrogateescape): such a
    path or name cannot be written into the run's config.toml (TOML is UTF-8), which was a UnicodeEncodeError
    traceback after the dump folder was made. TOML values are UTF-8 already; this catches the CLI's."""
    for section in dataclasses.fields(config):
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            for text in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(text, str) and not _is_utf8(text):
                    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                    raise UserError(f"--{section.name}.{key} {shown} is not UTF-8 (the run records its config as "
                                    "UTF-8 TOML); rename it to a UTF-8 name, or give a symlink with one")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_ranges(config: JobConfig) -> None:
    _check_finite(config)
    for key, ok, rule, *applies in _RANGES:
        if applies and not applies[0](config):
            continue
        value = _value(config, key)
        if not ok(value):
            raise UserError(f"--{key} must be {rule}, got {value!r}")


# float32's largest finite and smallest normal values: AdamW updates every parameter in float32 (the Triton kernel
# takes lr, betas and eps as float32 arguments; PyTorch's AdamW casts its scalars to the parameters' dtype), so a
# Python float beyond these overflows (a RuntimeError traceback, or inf), rounds to 0 (no update, or 0/0 = nan for
# eps), or a beta rounds to 1.0 (the moment never moves).
_FP32_MAX = 3.4028234663852886e38
_FP32_TINY = 1.1754943508222875e-38


def _as_fp32(value: float) -> float:
    """``value`` rounded to float32 (inf past float32's range)."""
    return struct.unpack("f", struct.pack("f", value))[0] if abs(value) <= _FP32_MAX else math.copysign(math.inf, value)


def _check_fp32_optimizer(config: JobConfig) -> None:
    """AdamW's scalars must survive float32: lr, the first step size ``lr / (1 - beta1)``, the decay factor
    ``1 - lr * weight_decay``, eps, betas below 1 and a clipping max_norm not rounded to 0. Runs after the range
    rows, so every value here is finite and in range."""
    opt, max_norm = config.optimizer, config.training.max_norm
    beta1 = opt.betas[0]
    step_size = opt.lr / (1.0 - beta1)
    if step_size > _FP32_MAX:
        raise UserError(f"--optimizer.lr {opt.lr!r} overflows float32 in AdamW's first update (lr / (1 - betas[0]) = "
                        f"{step_size:.3g} > {_FP32_MAX:.4g}); use --optimizer.lr at most "
                        f"{_FP32_MAX * (1.0 - beta1):.3g} (SMDM uses 2e-4)")
    if opt.lr < _FP32_TINY:
        raise UserError(f"--optimizer.lr {opt.lr!r} is below float32's smallest normal value {_FP32_TINY:.4g} (AdamW's "
                        "float32 update would be zero); use a larger --optimizer.lr (SMDM uses 2e-4)")
    if opt.lr * opt.weight_decay > _FP32_MAX:
        raise UserError(f"--optimizer.weight_decay {opt.weight_decay!r} with --optimizer.lr {opt.lr!r} overflows "
                        f"float32 in AdamW's decay factor 1 - lr * weight_decay; use a --optimizer.weight_decay of at "
                        f"most {_FP32_MAX / opt.lr:.3g} (SMDM uses 0.1)")
    if not _FP32_TINY <= opt.eps <= _FP32_MAX:
        raise UserError(f"--optimizer.eps must be representable in float32 (in [{_FP32_TINY:.4g}, {_FP32_MAX:.4g}]: "
                        f"smaller rounds to 0 and divides 0 by 0), got {opt.eps!r}; SMDM uses 1e-8")
    if any(_as_fp32(b) >= 1.0 for b in opt.betas):
        raise UserError(f"--optimizer.betas {tuple(opt.betas)!r} round to 1.0 in float32 (the moment would never "
                        f"move); use betas of at most {_as_fp32(1.0 - 2.0**-24):.8f} (SMDM uses 0.9 0.95)")
    if 0 < max_norm < _FP32_TINY:
        raise UserError(f"--training.max_norm {max_norm!r} rounds to 0 in float32 (every gradient would be clipped to "
                        "zero); use a larger --training.max_norm, or 0 to turn clipping off")


def check_config(config: JobConfig) -> None:
    """Refuses a config whose values tyro and the TOML reader let through but the run cannot use.

    Literal-typed fields are checked by tyro on the CLI and by config._coerce in TOML; this checks the rest.

    Args:
        config: the config as resolved from defaults, TOML and CLI.

    Raises:
        UserError: the first value out of range, non-finite, too large for this machine's memory, or at odds
            with another field; or a dump folder this process cannot create or write into.
    """
    _check_utf8(config)  # first: messages below print these strings
    t = config.training
    if len(config.data.train_prefixes) != len(config.data.train_weights):
        raise UserError(
            f"data.train_prefixes has {len(config.data.train_prefixes)} entries but data.train_weights has "
            f"{len(config.data.train_weights)}: give one weight per prefix"
        )
    _check_ranges(config)
    _check_fp32_optimizer(config)
    if t.steps < 1 and t.flops_budget <= 0:
        raise UserError("--training.steps must be >= 1 (or set --training.flops_budget)")
    if config.lr_scheduler.decay_type != "constant" and config.lr_scheduler.min_lr > config.optimizer.lr:
        raise UserError(f"--lr_scheduler.min_lr ({config.lr_scheduler.min_lr}) must not exceed the peak "
                        f"--optimizer.lr ({config.optimizer.lr})")
    if config.compile.enable and config.compile.cudagraphs and config.diffusion.ssl_ratio > 0:
        raise UserError("--compile.cudagraphs needs fixed shapes, but --diffusion.ssl_ratio > 0 crops batches to "
                        "random lengths (each would record new graphs): add --compile.no_cudagraphs")
    _check_ar_noise_options(config)
    _check_memory(t, config.model.vocab_size)
    _check_dump_folder(config.job.dump_folder)
    _check_checkpoint_folder(config)
    _check_output_folders(config)


def _check_ar_noise_options(config: JobConfig) -> None:
    """An AR run draws no masking noise: diffusion.eps or t_sampling off their defaults would do nothing without a
    word. (ssl_ratio crops AR batches and loss_impl picks the kernel: both apply and stay accepted.)"""
    if config.training.objective != "ar":
        return
    d, defaults = config.diffusion, type(config.diffusion)()
    unused = [f"--diffusion.{k} {getattr(d, k)}" for k in ("eps", "t_sampling") if getattr(d, k) != getattr(defaults, k)]
    if unused:
        raise UserError(f"--training.objective ar draws no masking noise, so {' and '.join(unused)} would do "
                        f"nothing; remove {'them' if len(unused) > 1 else 'it'}, or train --training.objective mdm")


# What a run allocates at start whatever its flavor, as lower bounds: per sequence position the RoPE table (cos and
# sin in float32 over the head dim, >= 64 in every flavor) and, per sequence of a micro-batch, the loader's int64
# window; per vocabulary entry an embedding row and a head row in float32 (width >= 256 in every flavor).
# tests/test_bad_input.py checks both facts against the flavor table.
_ROPE_BYTES_PER_POSITION = 2 * 4 * 64
_TOKEN_BYTES = 8
_VOCAB_BYTES_PER_ENTRY = 2 * 4 * 256


def _check_memory(t: Training, vocab_size: int) -> None:
    """Refuses a seq_len or vocab_size whose start-up buffers alone exceed this machine's memory (else a
    MemoryError or an allocator traceback while the model is built)."""
    available = _physical_memory()
    if available is None:
        return
    have = f"more than this machine's {available / 2**30:,.0f} GiB of memory"
    per_position = _ROPE_BYTES_PER_POSITION + _TOKEN_BYTES * t.local_batch_size
    if t.seq_len * per_position > available:
        raise UserError(
            f"--training.seq_len {t.seq_len} needs at least {t.seq_len * per_position / 2**30:,.0f} GiB for its "
            f"position table and one micro-batch of {t.local_batch_size} sequences, {have}; use a shorter "
            f"--training.seq_len (at most {available // per_position:,})"
        )
    if vocab_size * _VOCAB_BYTES_PER_ENTRY > available:
        raise UserError(
            f"--model.vocab_size {vocab_size} needs at least {vocab_size * _VOCAB_BYTES_PER_ENTRY / 2**30:,.0f} GiB "
            f"for its embedding and output head, {have}; use a smaller --model.vocab_size (at most "
            f"{available // _VOCAB_BYTES_PER_ENTRY:,})"
        )


def _physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _check_dump_folder(folder: str) -> None:
    """The dump folder must be a folder this process can create or write into (checked without writing)."""
    if not folder.strip():  # Path("") is the working directory: the run would write its files all over it
        raise UserError("--job.dump_folder is empty (an unset shell variable?); give a folder for the run's "
                        "outputs, e.g. --job.dump_folder ./outputs/run1")
    try:
        _check_dump_folder_path(folder)
    except OSError as e:  # a name too long, a symlink loop, ...: stat itself fails
        raise UserError(f"--job.dump_folder {folder} cannot be used ({e.strerror}); choose another "
                        "--job.dump_folder") from None


def _check_dump_folder_path(folder: str) -> None:
    """The checks of _check_dump_folder on the path itself; stat errors propagate as OSError."""
    path = Path(folder).absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"--job.dump_folder {folder} is a file, not a folder; choose another --job.dump_folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--job.dump_folder {folder} cannot be created: {existing} is a file; choose another "
                        "--job.dump_folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--job.dump_folder {folder} is not writable ({existing} is read-only for this user); "
                        "choose another --job.dump_folder")


def _output_folders(config: JobConfig) -> list[tuple[str, str]]:
    """(option, folder) of each folder inside the dump folder that this run writes into."""
    wanted = [
        ("checkpoint.folder", config.checkpoint.folder, config.checkpoint.enable),
        ("metrics.save_tb_folder", config.metrics.save_tb_folder, config.metrics.enable_tensorboard),
        ("profiling.save_traces_folder", config.profiling.save_traces_folder, config.profiling.enable_profiling),
        ("profiling.save_memory_snapshot_folder", config.profiling.save_memory_snapshot_folder,
         config.profiling.enable_memory_snapshot),
    ]
    return [(key, folder) for key, folder, used in wanted if used]


def checkpoint_folder_inside(folder: str | PurePath, dump_folder: str | PurePath) -> bool:
    """Whether checkpoint.folder ``folder`` lies inside ``dump_folder``: a relative path without ``..``, or an
    absolute one under the dump folder. Any ``..`` is outside: a lexical check cannot tell where "a/.." leads when
    a is a symlink, and no layout needs one. Symlinks inside the dump folder are the user's to place."""
    path = PurePath(folder)
    if ".." in path.parts:
        return False
    return not path.is_absolute() or PurePath(os.path.abspath(path)).is_relative_to(os.path.abspath(dump_folder))


def _check_checkpoint_folder(config: JobConfig) -> None:
    """checkpoint.folder must stay inside the dump folder, whose run.lock is what keeps a second trainer from
    saving over this run's checkpoints (:func:`checkpoint_folder_inside`)."""
    folder = config.checkpoint.folder
    if config.checkpoint.enable and not checkpoint_folder_inside(folder, config.job.dump_folder):
        raise UserError(f"--checkpoint.folder {folder} lies outside --job.dump_folder {config.job.dump_folder}, whose "
                        "run.lock guards the checkpoints; give a folder inside it (e.g. --checkpoint.folder "
                        "checkpoint), and to save elsewhere choose a --job.dump_folder there")


def _check_output_folders(config: JobConfig) -> None:
    """A file in the place of an output folder: refused at start, not a NotADirectoryError traceback when the
    first trace is written (or TensorBoard silently off after a warning)."""
    for key, folder in _output_folders(config):
        path = Path(config.job.dump_folder) / folder
        try:
            is_file = path.exists() and not path.is_dir()
        except OSError:  # reported by the folder's own writer, as before
            continue
        if is_file:
            raise UserError(f"--{key}: {path} is a file, not a folder; move it away or choose another --{key}")
