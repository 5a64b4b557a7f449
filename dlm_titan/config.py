"""Run configuration: one dataclass per TOML section, overridden from the command line with tyro.

Precedence is CLI > TOML > defaults. ``--job.config_file`` names the TOML file; every other field is
``--section.key value`` on the command line and ``[section] key = value`` in the file. Unknown sections or keys
in either place are a :class:`~dlm_titan.errors.UserError` naming the key; so are values the run cannot
use, checked by :mod:`dlm_titan.config_checks` once the config is resolved. This module is the ground of the
package: it imports nothing from dlm_titan except the error type and those checks (which import only the
error type).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import tyro

from dlm_titan.config_checks import check_config
from dlm_titan.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class Job:
    config_file: str | None = None
    """TOML file with the run's settings; CLI flags override it."""
    dump_folder: str = "./outputs"
    """Folder for everything the run writes: config, checkpoints, TensorBoard events, exports."""
    description: str = "dlm_titan run"
    """Free text shown at start and saved with the config."""
    print_config: bool = True
    """Print the resolved config at start."""


@dataclass
class Model:
    flavor: str = "6M"
    """SMDM model size, one of the 30 Diff_LLaMA names ("6M" ... "2121M"); "1B" is an alias of "1028M"."""
    vocab_size: int = 32000
    """Output vocabulary; the embedding has one more row, the mask token (id = vocab_size). 0 = the tokenizer's
    (data.tokenizer_path, else the shards' preparation manifests, else 32000)."""
    attn_backend: Literal["auto", "cudnn", "flash", "efficient", "math", "flash_attn"] = "auto"
    """Attention kernel: SDPA backends, or "flash_attn" for the flash-attn package. "auto": cuDNN on Hopper,
    flash elsewhere on CUDA, math on CPU."""


@dataclass
class Diffusion:
    eps: float = 1e-3
    """Mask probability floor: p = (1 - eps) * t + eps. An AR run (training.objective = "ar") refuses another
    value: it draws no noise."""
    t_sampling: Literal["uniform", "stratified"] = "uniform"
    """How t is drawn per sequence: i.i.d. uniform (SMDM) or stratified over the global batch. An AR run
    (training.objective = "ar") refuses "stratified": it draws no noise."""
    ssl_ratio: float = 0.0
    """Stochastic sequence length: probability that a micro-batch is cropped to a random length (SMDM uses
    0.01). Breaks layout invariance by design. On a GPU each new length costs ~0.2-0.3 s when first met (new
    attention and GEMM plans)."""
    loss_impl: Literal["auto", "fused", "torch"] = "auto"
    """LM-head loss: "fused" Triton kernel, "torch" chunked reference, "auto" fused on CUDA."""


@dataclass
class Optimizer:
    lr: float = 2e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to every parameter as in SMDM."""
    implementation: Literal["auto", "triton", "fused", "foreach", "for-loop"] = "auto"
    """AdamW kernel: "triton" (one launch over every parameter, gradient clipping folded in), PyTorch's "fused",
    "foreach" or "for-loop"; "auto" = triton on CUDA (fused without triton), foreach on CPU."""


@dataclass
class LRScheduler:
    warmup_steps: int = -1
    """Linear warmup steps; -1 = SMDM's rule max(1% of steps, 100), capped at the run length."""
    min_lr: float = 2e-5
    """Learning rate at the end of the decay."""
    decay_type: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape of the decay from lr to min_lr after warmup."""


@dataclass
class Training:
    global_batch_size: int = 256
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    local_batch_size: int = 8
    """Sequences per micro-batch on one rank; accumulation = global / (local * data-parallel ranks)."""
    seq_len: int = 2048
    """Tokens per sequence."""
    steps: int = 1000
    """Optimizer steps (ignored when flops_budget > 0)."""
    flops_budget: float = 0.0
    """Training FLOPs C; > 0 sets steps = floor(C / (6 N global_batch_size seq_len)) as SMDM."""
    max_norm: float = 1.0
    """Global gradient-norm clip; <= 0 disables clipping."""
    seed: int = 3407
    """Seed for init, data order and diffusion noise."""
    mixed_precision_param: Literal["bfloat16", "float32"] = "bfloat16"
    """FSDP parameter dtype during compute (GPU); float32 whatever this says when dtype is "float32"."""
    mixed_precision_reduce: Literal["float32", "bfloat16"] = "float32"
    """FSDP gradient reduce-scatter dtype."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Compute dtype: "auto" = bf16 autocast on GPU (FSDP: mixed_precision_param), float32 on CPU; "float32"
    computes in float32 under every data-parallel form (FSDP gathers float32 parameters)."""
    gc_freq: int = 50
    """Run Python's garbage collector every this many steps (automatic GC is disabled: it stalls steps)."""
    on_nonfinite: Literal["skip", "stop", "raise"] = "raise"
    """Non-finite loss or grad norm: skip the step, save and stop, or raise."""
    max_consecutive_skips: int = 10
    """With on_nonfinite = "skip": this many non-finite steps in a row end the run (exit 1, no save, no export):
    the run has diverged, and the newest checkpoint stays the last good one."""
    deterministic: bool = False
    """Deterministic algorithms (slower); for debugging numerics."""
    objective: Literal["mdm", "ar"] = "mdm"
    """"mdm" = SMDM's masked diffusion; "ar" = SMDM's autoregressive baseline: the same flavor with causal
    attention and no mask row, next-token loss (mean CE over all predicted tokens of the step), same data,
    FLOPs budget (6 N tokens) and MFU formula."""


@dataclass
class Data:
    path: str = ""
    """Folder of LITPKDS shards; "" = the embedded corpus, prepared on first use and cached."""
    train_prefixes: list[str] = field(default_factory=lambda: ["train_slim"])
    """Shard file-name prefixes of the training sources (TinyLlama names: train_slim, train_star)."""
    train_weights: list[float] = field(default_factory=lambda: [1.0])
    """Sampling weight of each training prefix."""
    val_prefix: str = "validation"
    """Shard file-name prefix of the validation set."""
    tokenizer_path: str = ""
    """SentencePiece .model, Hugging Face tokenizer.json, or a folder holding either; "" = the embedded 32k tokenizer."""
    num_workers: int = 1
    """Data-loader worker processes per rank (0 = load in the training process)."""


@dataclass
class Parallelism:
    data_parallel_shard_degree: int = -1
    """FSDP shard degree; -1 = all ranks not used by replication; 1 = plain replication (DDP), the faster form
    for models up to ~400M parameters (docs/training.md, Parallelism)."""
    data_parallel_replicate_degree: int = 1
    """Replica count (replicate x shard = world size): > 1 with shard > 1 is HSDP; -1 = all ranks not used by
    sharding."""
    ddp_bucket_cap_mb: int = 100
    """Plain replication (DDP): gradient bucket size in MB; all-reduces of full buckets overlap backward."""
    fsdp_reshard_after_forward: Literal["auto", "never", "default", "always"] = "auto"
    """Free gathered parameters after forward? "never": keep them for backward and accumulate micro-batches
    without communication (fastest, 6 bytes a parameter more memory); "always": free them (least memory);
    "default": free all but the last block and the head; "auto": "never" up to 3B parameters, else "default"."""


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "selective", "full"] = "none"
    """Recompute activations in backward: none, selective, or full (every block)."""
    selective_ac_option: str = "op"
    """Selective AC: "op" = save matmul/attention outputs only, or an integer N = checkpoint every Nth block."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile each transformer block (fullgraph)."""
    cudagraphs: bool = False
    """Replay each compiled block as CUDA graphs (torch.compile mode "reduce-overhead"): no per-kernel host
    launches, so ranks of a small model stop waiting for each other's host. Has no effect without compile.enable
    or on a CPU; not with FSDP sharding (its gathered parameters move every step) or diffusion.ssl_ratio > 0
    (every new length would record new graphs)."""


@dataclass
class Float8:
    enable: bool = False
    """Float8 linear layers through torchao (pays from about 1B parameters on H100)."""
    recipe: Literal["tensorwise", "rowwise"] = "tensorwise"
    """torchao float8 scaling recipe."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save and resume with torch.distributed.checkpoint."""
    folder: str = "checkpoint"
    """Checkpoint folder inside dump_folder; each save is step-N."""
    interval: int = 500
    """Save every this many steps (and at the end); 0 = only at the end."""
    keep_latest_k: int = 0
    """Keep only the newest k checkpoints; 0 keeps all."""
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = "disabled"
    """Save in the background: "async" stalls training for a copy to CPU memory; "async_with_pinned_mem" (CUDA)
    copies into pinned memory alongside the next step (stall well under a second)."""
    write_threads: int = 4
    """Threads (and files) per rank writing a checkpoint."""
    load_step: int = -1
    """Resume from this step; -1 = newest complete checkpoint."""
    initial_load_path: str = ""
    """Start a new run from these model weights only: a step-N folder, a dump folder, an export, or a Llama-family
    Hugging Face folder."""
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """dtype of the final safetensors export."""
    accept_data_change: bool = False
    """Resume although the training shards differ from those the checkpoint was saved with (files added, removed
    or resized): the stream then continues from its saved sample position over the new shards, with the epoch
    order recomputed for them, and a warning says so. Without it such a resume is refused."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log every this many steps."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files under dump_folder/tb."""
    save_tb_folder: str = "tb"
    """TensorBoard folder inside dump_folder."""
    enable_wandb: bool = False
    """Also log to Weights & Biases when it is installed."""


@dataclass
class Validation:
    enable: bool = False
    """Evaluate the ELBO on held-out data with fixed noise."""
    freq: int = 500
    """Validate every this many steps (and at the end)."""
    steps: int = 10
    """Validation micro-batches per rank; -1 = the whole validation set."""
    mc_samples: int = 4
    """Noise draws (t, masks) per validation sequence."""
    seed: int = 1234
    """Seed of the fixed validation noise."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch profiler traces."""
    profile_freq: int = 100
    """Trace a window every this many steps."""
    save_traces_folder: str = "profile_traces"
    """Trace folder inside dump_folder."""
    enable_memory_snapshot: bool = False
    """Dump CUDA memory snapshots."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Snapshot folder inside dump_folder."""


@dataclass
class JobConfig:
    """dlm_titan: pretrain masked diffusion language models."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    diffusion: Diffusion = field(default_factory=Diffusion)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Builds the run's config from defaults, the TOML file named by --job.config_file, then the CLI.

    Args:
        argv: command-line arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
        The resolved config.

    Raises:
        UserError: missing or malformed TOML, unknown key or section, value of the wrong type or choice.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    _check_cli_keys(argv)
    defaults = JobConfig()
    config_file = _peek_config_file(argv)
    if config_file is not None:
        defaults = _merge_toml(defaults, _read_toml(config_file))
        defaults.job.config_file = config_file
    config = tyro.cli(JobConfig, default=defaults, args=argv, use_underscores=True)
    check_config(config)
    return config


def _peek_config_file(argv: list[str]) -> str | None:
    """The TOML path of the last --job.config_file (tyro, which records it, also keeps the last of a repeated flag).

    An empty path is refused rather than read as "no file": ``--job.config_file "$CFG"`` with CFG unset would
    otherwise train the defaults (1000 steps of 256 x 2048) without a word.
    """
    path = None
    for i, arg in enumerate(argv):
        if arg == "--job.config_file":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError("--job.config_file needs a path, e.g. --job.config_file train_configs/debug.toml")
            path = argv[i + 1]
        elif arg.startswith("--job.config_file="):
            path = arg.split("=", 1)[1]
        else:
            continue
        if not path.strip():
            raise UserError("--job.config_file is empty (an unset shell variable?); give a TOML file, e.g. "
                            "--job.config_file train_configs/debug.toml, or leave the option out for the defaults")
    return path


def _read_toml(path: str) -> dict:
    file = Path(path)
    if file.is_dir():
        raise UserError(f"config file {path} is a folder; give a TOML file (see train_configs/ for examples)")
    if not file.is_file():
        raise UserError(f"config file not found: {path} (see train_configs/ for examples)")
    try:
        text = file.read_bytes().decode("utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not TOML
        return tomllib.loads(text)
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror}); check its permissions") from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8 "
                        "TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def _bool_flags() -> set[str]:
    """The on-switches of the boolean options (--section.key); each also has --section.no_key."""
    return {f"--{section}.{key}" for section, cls in typing.get_type_hints(JobConfig).items()
            for key, hint in typing.get_type_hints(cls).items() if hint is bool}


def _all_flags() -> set[str]:
    """Every flag tyro accepts (underscore spelling), with --section.no_flag for booleans."""
    flags = {"--help", "-h"}
    for section, cls in typing.get_type_hints(JobConfig).items():
        for key in typing.get_type_hints(cls):
            flags.add(f"--{section}.{key}")
    for flag in _bool_flags():
        section, key = flag.split(".", 1)
        flags.add(f"{section}.no_{key}")
    return flags


# Words a user may write after a boolean switch, expecting them to set it (tyro's switches take no value).
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0"}


def _check_cli_keys(argv: list[str]) -> None:
    known, switches = _all_flags(), _bool_flags()
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0]
        if flag not in known:
            close = difflib.get_close_matches(flag, sorted(known), n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help for the options"
            raise UserError(f"unknown option {flag}{hint}")
        # "--compile.enable false" would meet tyro's boxed "Unrecognized options: false": name the two switches.
        value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
        switch = flag.replace(".no_", ".", 1)  # the on-form of --section.no_key
        if switch in switches and value is not None and ("=" in arg or value.lower() in _BOOL_WORDS):
            section, key = switch.split(".", 1)
            raise UserError(f"{flag} takes no value: write {switch} to turn it on, {section}.no_{key} to turn it "
                            "off")


def _merge_toml(config: JobConfig, toml: dict) -> JobConfig:
    hints = typing.get_type_hints(JobConfig)
    sections = list(hints)
    for section_name, values in toml.items():
        if section_name not in sections:
            raise UserError(f"unknown config section [{section_name}]; valid sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise UserError(f"config key {section_name!r} must be a [section] table")
        section = getattr(config, section_name)
        cls = hints[section_name]
        key_types = typing.get_type_hints(cls)
        for key, value in values.items():
            if key not in key_types:
                close = difflib.get_close_matches(key, key_types, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(key_types)}"
                raise UserError(f"unknown config key [{section_name}].{key}{hint}")
            setattr(section, key, _coerce(value, key_types[key], f"[{section_name}].{key}"))
    return config


def _coerce(value: object, hint: object, where: str) -> object:
    """Checks a TOML value against the field's type, converting int->float and list->tuple where needed."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{where} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        item_hint = args[0]
        items = [_coerce(v, item_hint, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or type(None) not in args:
            return _coerce(value, next(a for a in args if a is not type(None)), where)
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise UserError(f"{where} must be of type {hint.__name__}, got {value!r}")
    return value


def to_toml(config: JobConfig) -> str:
    """Serialises a config as TOML that load_config reads back to the same values."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(config, section.name)).items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_char(char: str) -> str:
    """One character of a TOML basic string: quotes, backslashes and control characters escaped (a raw newline in
    job.description would make the saved config.toml unreadable)."""
    if char in _TOML_ESCAPES:
        return _TOML_ESCAPES[char]
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04X}"
    return char
