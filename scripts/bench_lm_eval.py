"""Throughput of lm-eval's MC loglikelihood scoring: requests/s batched against one request at a time.

Scores the same synthetic requests (random token ids: a context and a continuation per request, totals drawn
from a few lengths as in a large task, where many requests share each length) with a randomly initialised model
of ``--flavor`` (the cost does not depend on the weights), ``--mc_samples`` ELBO draws per request, by the code
behind ``python -m dlm_titan.lm_eval`` (:func:`dlm_titan.likelihood.elbo_batch`):

- ``one request at a time``: each request alone, its draws in forwards of at most ``--single_batch_size``
  sequences (default 32), eager, one host sync per request: what the earlier adapter
  (``scripts/lm_eval_adapter.py``, replaced by ``python -m dlm_titan.lm_eval``) did;
- ``batched``: all requests in one call, the draws of equal-length requests packed into forwards of
  ``--batch_size`` sequences (lm-eval's ``--batch_size``), eager;
- ``batched, compiled`` (with ``--compile``): the same after compiling the model's blocks with dynamic shapes,
  as ``python -m dlm_titan.lm_eval`` does on CUDA (``compile=auto``); also prints the largest relative
  difference of its estimates from the eager ones.

    python -m scripts.bench_lm_eval --compile                             # 170M, 128 draws, on the GPU
    python -m scripts.bench_lm_eval --flavor 6M --device cpu --requests 8 --mc_samples 16 --batch_size 64

Prints the device and the workload, one line per mode (requests/s, sequences/s, seconds of the fastest of
``--repeats`` runs) and each batched mode's ratio to one request at a time. Every mode first scores the
``--warmup`` extra requests and the timed ones once, untimed (kernel selection, allocator growth, compilation).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from dlm_titan.errors import UserError, report
from dlm_titan.likelihood import elbo_batch
from dlm_titan.models import build_transencoder, get_model_args
from dlm_titan.parallelize import compile_blocks
from scripts.cli import HelpFormatter


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--flavor", default="170M", help="model flavor (random init)")
    parser.add_argument("--device", default="auto", help='"auto" (CUDA when available), "cpu", "cuda", ...')
    parser.add_argument("--dtype", default="auto", help='"auto" (bfloat16 on CUDA, float32 on CPU), float32, bfloat16')
    parser.add_argument("--requests", type=int, default=64, help="requests scored by each mode")
    parser.add_argument("--mc_samples", type=int, default=128, help="ELBO draws per request")
    parser.add_argument("--batch_size", type=int, default=512, help="sequences per forward pass")
    parser.add_argument("--single_batch_size", type=int, default=32,
                        help="sequences per forward one request at a time (32: the earlier adapter's default)")
    parser.add_argument("--lengths", default="96,104,112,128", help="request lengths (context + continuation), tokens")
    parser.add_argument("--continuation", type=int, default=24, help="longest continuation (tokens); 1..this")
    parser.add_argument("--warmup", type=int, default=4, help="extra requests in each mode's untimed first pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode (the fastest is reported)")
    parser.add_argument("--compile", action="store_true",
                        help="also time batched scoring with the model's blocks compiled (dynamic shapes)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def make_requests(count: int, lengths: list[int], max_continuation: int, vocab: int,
                  seed: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token ids: total length drawn from ``lengths``, continuation 1..max."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        total = int(rng.choice(lengths))
        cont = int(rng.integers(1, min(max_continuation, total - 1) + 1))
        ids = rng.integers(0, vocab, size=total).tolist()
        out.append((ids[: total - cont], ids[total - cont :]))
    return out


def build(args: argparse.Namespace, max_len: int) -> torch.nn.Module:
    """A randomly initialised model of ``--flavor`` on the device, in eval mode."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtypes = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
              "float32": torch.float32, "bfloat16": torch.bfloat16}
    if args.dtype not in dtypes:
        raise UserError(f"--dtype {args.dtype} is not one of {', '.join(dtypes)}")
    try:
        model_args = get_model_args(args.flavor)
    except (KeyError, ValueError) as e:
        raise UserError(f"--flavor {args.flavor}: {e}") from None
    model = build_transencoder(model_args, max_len, "auto", device)
    model.to_empty(device=device)
    model.init_weights(args.seed)
    return model.to(dtypes[args.dtype]).eval()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[str]:
    """Times both modes on the same requests; returns the printed lines."""
    lengths = [int(n) for n in args.lengths.split(",") if n.strip()]
    if min(args.requests, args.mc_samples, args.batch_size, args.continuation) < 1 or not lengths or min(lengths) < 2:
        raise UserError("--requests, --mc_samples, --batch_size, --continuation must be >= 1 and --lengths >= 2")
    model = build(args, max(lengths))
    device = next(model.parameters()).device
    reqs = make_requests(args.requests + args.warmup, lengths, args.continuation, model.args.vocab_size, args.seed)
    warm, reqs = reqs[: args.warmup], reqs[args.warmup :]
    def score(texts: list, batch_size: int) -> list:
        return elbo_batch(model, texts, mask_id=model.args.mask_id, mc_samples=args.mc_samples, batch_size=batch_size)

    modes = {"one request at a time": lambda texts: [e for t in texts for e in score([t], args.single_batch_size)],
             "batched": lambda texts: score(texts, args.batch_size)}
    if args.compile:
        modes["batched, compiled"] = modes["batched"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"device: {name}, flavor {args.flavor}, {args.requests} requests of {args.lengths} tokens, "
             f"{args.mc_samples} draws each, batch_size {args.batch_size} (one at a time: {args.single_batch_size}), "
             f"{next(model.parameters()).dtype}"]
    rates, estimates = {}, {}
    for label, fn in modes.items():
        if label == "batched, compiled":
            compile_blocks(model, dynamic=True)
        estimates[label] = torch.tensor([e.nll for e in fn(warm + reqs)], dtype=torch.float64)  # warms up too
        seconds = min(timed(lambda fn=fn: fn(reqs), device) for _ in range(max(1, args.repeats)))
        rates[label] = args.requests / seconds
        lines.append(f"{label}: {rates[label]:.2f} requests/s, {rates[label] * args.mc_samples:.0f} sequences/s "
                     f"({seconds:.2f} s)")
    for label in [k for k in modes if k.startswith("batched")]:
        lines.append(f"{label} / one at a time: {rates[label] / rates['one request at a time']:.2f}x")
    if args.compile:
        diff = ((estimates["batched, compiled"] - estimates["batched"]).abs() / estimates["batched"].abs()).max()
        lines.append(f"compiled vs eager estimates: largest relative difference {diff.item():.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with torch.no_grad():
            lines = run(args)
    except UserError as e:
        return report(e)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
