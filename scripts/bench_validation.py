"""Time one validation run (the fixed-noise MDM loss) of a model on one GPU, as the trainer runs it.

Builds the model from a training config exactly as the trainer does (flavor, attention backend, compile,
bf16 autocast), with freshly initialised weights (the cost does not depend on them), and evaluates the
config's validation set ``--repeats`` times. The first run includes torch.compile's no-grad graphs.

    python -m scripts.bench_validation                                   # train_configs/170m.toml
    python -m scripts.bench_validation --job.config_file train_configs/170m.toml \\
        --validation.steps 10 --validation.mc_samples 4 --repeats 3

Prints the device name, the work (sequences x noise draws, tokens through the model), the seconds of each
run and forward throughput. Other trainer flags (e.g. --data.path, --training.local_batch_size) apply too.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch

from dlm_titan.config import load_config
from dlm_titan.data import resolve_data_path
from dlm_titan.errors import UserError, report
from dlm_titan.flops import peak_flops
from dlm_titan.metrics import model_flops_per_token
from dlm_titan.models import build_model
from dlm_titan.parallelize import parallelize_model
from dlm_titan.validation import build_validator
from scripts.cli import HelpFormatter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="validation runs to time (first includes compile)")
    own, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if not any(a.startswith("--job.config_file") for a in rest):
        rest = ["--job.config_file", "train_configs/170m.toml", *rest]
    try:
        cfg = load_config([*rest, "--validation.enable"])
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_model(cfg.model, cfg.training.seq_len, device)
        parallelize_model(model, cfg, None, device)
        model.to_empty(device=device)
        model.init_weights(seed=cfg.training.seed)
        use_bf16 = device.type == "cuda" and cfg.training.dtype != "float32"
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
        validator = build_validator(cfg, model, resolve_data_path(cfg.data), 0, 1, device, autocast)
    except UserError as e:
        return report(e)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; model {cfg.model.flavor} ({model.attn_backend} attention, "
          f"compile {cfg.compile.enable}, {'bf16 autocast' if use_bf16 else 'fp32'})")
    times, result = [], None
    for i in range(own.repeats):
        result = validator.run()
        times.append(result.seconds)
        print(f"run {i + 1}: {result.seconds:.3f} s  loss {result.loss:.4f} +- {result.stderr:.4f}")
    steady = times[1:] or times
    tokens = result.tokens  # tokens through the model: sequences x noise draws x seq_len
    tps = tokens / statistics.median(steady)
    fwd_flops = model_flops_per_token(model.args, cfg.training.seq_len) / 3  # forward = 1/3 of fwd+bwd
    peak = peak_flops(name) if device.type == "cuda" else None
    mfu = f", forward MFU {tps * fwd_flops / peak:.1%}" if peak else ""
    print(f"validation of {result.sequences} sequences x {result.mc_samples} noise draws x {cfg.training.seq_len} "
          f"tokens (validation.steps={cfg.validation.steps}, local_batch_size={cfg.training.local_batch_size}): "
          f"first run {times[0]:.2f} s, then median {statistics.median(steady):.3f} s "
          f"({tps:,.0f} tokens/s{mfu}); peak memory "
          f"{torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else 0:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
