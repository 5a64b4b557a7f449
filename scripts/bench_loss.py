"""Benchmark the LM-head loss paths of a masked diffusion LM on one GPU: fwd+bwd time and peak extra memory.

Paths, all from the full hidden states ``[N, d]`` to ``loss.backward()`` (bf16 inputs, fp32 loss):

- ``full_logits``: logits for every token + ``F.cross_entropy`` weighted by ``token_weights``;
- ``gather_ce``: gather the masked rows, then the same;
- ``compiled_chunked``: gather, then ``torch.compile`` of the 4096-row chunked reference;
- ``torch_chunked``: the same reference in eager mode (``impl="torch"``);
- ``fused``: ours (``impl="fused"``).

Also measures the card's bf16 matmul rate (8192^3) in the same run and reports useful TFLOP/s
``6 * N_masked * d * V / time``. ``--sweep`` adds fused-path chunk-size variants, ``--sweep-rows`` a row-kernel bandwidth sweep.

    python scripts/bench_loss.py --dims 768 2048 [--sweep] [--json results.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F
from dlm_kernels import masked_ce_triton as row_kernels
from dlm_kernels import masked_linear_cross_entropy
from dlm_kernels.masked_ce_fused import fused_masked_linear_cross_entropy
from dlm_kernels.reference import chunked_weighted_cross_entropy, gather_masked_rows

from scripts.cli import HelpFormatter

GIB = 2**30


def time_ms(fn, iters: int, warmup: int, sync_each: bool = False) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs.

    By default the runs are queued back to back (a 256 MB L2 flush between them, as ``triton.testing.do_bench``
    does), so the host launches ahead of the GPU as it does inside a training step and the time is the GPU's.
    ``sync_each`` waits for each run before launching the next: the time then includes the host's launch
    latency at the start of every run (a latency, not a throughput, measure).
    """
    for _ in range(warmup):
        fn()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
        if sync_each:
            end.synchronize()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def matmul_tflops(iters: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters, 10)
    return 2 * 8192**3 / ms / 1e9


def make_inputs(n: int, d: int, vocab: int, mask_ratio: float, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, d, device="cuda", generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, d, device="cuda", generator=g) * (2.0 / d**0.5)).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    mask = torch.rand(n, device="cuda", generator=g) < mask_ratio
    token_weights = torch.where(mask, 1.0 / (mask_ratio * n), 0.0).float()
    return hidden, weight, targets, token_weights


def full_logits(hidden, weight, targets, token_weights, masked_index=None):
    ce = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")
    return (ce * token_weights).sum()


def gather_ce(hidden, weight, targets, token_weights, masked_index=None):
    x, y, w = gather_masked_rows(hidden, targets, token_weights, masked_index)
    return (F.cross_entropy((x @ weight.t()).float(), y, reduction="none") * w).sum()


_compiled_chunked = torch.compile(chunked_weighted_cross_entropy, dynamic=False)


def compiled_chunked(hidden, weight, targets, token_weights, masked_index=None):
    x, y, w = gather_masked_rows(hidden, targets, token_weights, masked_index)
    return _compiled_chunked(x, weight, y, w, 4096)


def measure(loss_fn, inputs, iters: int, warmup: int, sync_each: bool = False) -> tuple[float, float]:
    """(median fwd+bwd ms, peak memory above the resident inputs in GiB) of ``loss_fn`` on ``inputs``."""
    hidden, weight = inputs[0], inputs[1]

    def step():
        hidden.grad = None
        weight.grad = None
        loss_fn(*inputs).backward()

    ms = time_ms(step, iters, warmup, sync_each)
    hidden.grad = None
    weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - base) / GIB


def sweep_row_kernel(vocab: int, rows: int, iters: int) -> list[str]:
    """Bandwidth of the row kernel alone (read + write of a bf16 logits block) per (BLOCK_V, num_warps)."""
    logits = torch.randn(rows, vocab, device="cuda").bfloat16()
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    weights = torch.full((rows,), 1e-4, device="cuda")
    loss = torch.empty(rows, device="cuda")
    lines = []
    configs = [(32768, 32), (32768, 16), (16384, 16), (8192, 16), (8192, 8), (4096, 8), (4096, 4), (2048, 4)]
    for block, warps in configs:
        ms = time_ms(
            lambda b=block, w=warps: row_kernels.ce_rows(logits, targets, weights, loss, True, b, w), iters, 5
        )
        gbs = 2 * logits.numel() * logits.element_size() / ms / 1e6
        lines.append(
            f"row kernel V={vocab} rows={rows} BLOCK_V={block} warps={warps}: {ms:.3f} ms, {gbs:.0f} GB/s"
        )
    return lines


def profile_kernels(loss_fn, inputs, iters: int = 5, top: int = 12) -> list[str]:
    """Device time per kernel of ``loss_fn`` fwd+bwd (ms per iteration, profiler), most expensive first."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight = inputs[0], inputs[1]
    for _ in range(3):
        loss_fn(*inputs).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            hidden.grad = None
            weight.grad = None
            loss_fn(*inputs).backward()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / iters / 1e3
    lines = [f"  kernels total {total:.3f} ms/iter"]
    for e in events[:top]:
        lines.append(f"  {e.device_time_total / iters / 1e3:7.3f} ms x{e.count // iters:<3d} {e.key[:110]}")
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[768, 2048], help="hidden sizes d")
    parser.add_argument("--tokens", type=int, default=16384, help="rows N (tokens of a micro-batch)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V")
    parser.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of rows masked")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations per path")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    parser.add_argument(
        "--sweep", action="store_true", help="also time the fused path with other chunk byte budgets"
    )
    parser.add_argument("--sweep-rows", action="store_true", help="also time the row kernel per tile shape")
    parser.add_argument("--skip", nargs="*", default=[], help="paths to leave out, e.g. full_logits")
    parser.add_argument("--sync-each", action="store_true",
                        help="wait for each run before the next (adds the host's launch latency to every time)")
    parser.add_argument("--given-index", action="store_true",
                        help="pass every path the masked rows' index, as the trainer does (no nonzero host sync)")
    parser.add_argument("--profile", nargs="*", default=[], help="paths to profile by kernel, e.g. fused")
    parser.add_argument("--json", default="", help="write all numbers to this file")
    return parser.parse_args()


def loss_paths(sweep: bool) -> dict:
    """The paths to time, by name; each takes (hidden, weight, targets, token_weights[, masked_index])."""
    paths = {
        "full_logits": full_logits,
        "gather_ce": gather_ce,
        "compiled_chunked": compiled_chunked,
        "torch_chunked": lambda h, w, y, tw, i=None: masked_linear_cross_entropy(h, w, y, tw, "torch", masked_index=i),
        "fused": lambda h, w, y, tw, i=None: masked_linear_cross_entropy(h, w, y, tw, "fused", masked_index=i),
    }
    if sweep:
        for mib in (128, 512):
            paths[f"fused_c{mib}"] = lambda *a, c=mib * 2**20: fused_masked_linear_cross_entropy(
                *a, chunk_bytes=c
            )
    return paths


def bench_dim(d: int, paths: dict, args: argparse.Namespace, mm: float) -> list[dict]:
    """Times every path not skipped at hidden size ``d``; one record per path."""
    inputs = make_inputs(args.tokens, d, args.vocab, args.mask_ratio)
    if args.given_index:  # as in training: the masked rows' index comes with the batch (no nonzero sync)
        inputs = (*inputs, torch.nonzero(inputs[3]).squeeze(1))
    masked = int((inputs[3] != 0).sum())
    useful = 6 * masked * d * args.vocab
    rows = []
    for path, fn in paths.items():
        if path in args.skip:
            continue
        ms, gib = measure(fn, inputs, args.iters, args.warmup, args.sync_each)
        tflops = useful / ms / 1e9
        rows.append(dict(d=d, path=path, ms=ms, peak_gib=gib, tflops=tflops, pct_matmul=100 * tflops / mm,
                         masked=masked))
        print(f"d={d} {path}: {ms:.3f} ms {gib:.2f} GiB {tflops:.0f} TFLOP/s", flush=True)
        if path in args.profile:
            print("\n".join(profile_kernels(fn, inputs)), flush=True)
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The table of docs/performance.md: one line per record, with the speed-up over the compiled chunked path of its ``d``."""
    base = {r["d"]: r["ms"] for r in rows if r["path"] == "compiled_chunked"}
    lines = [
        "| d | path | fwd+bwd ms | peak extra GiB | useful TFLOP/s (% of matmul) | vs compiled chunked |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = f"{base[r['d']] / r['ms']:.2f}x" if r["d"] in base else "-"
        lines.append(f"| {r['d']} | {r['path']} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {r['tflops']:.0f} "
                     f"({r['pct_matmul']:.0f}%) | {speedup} |")
    return lines


def main() -> None:
    args = parse_args()
    name = torch.cuda.get_device_name()
    mm = matmul_tflops(args.iters)
    header = (
        f"{name}, torch {torch.__version__}, triton {getattr(row_kernels.triton, '__version__', None)}, "
        f"{datetime.date.today()}, N={args.tokens}, V={args.vocab}, mask ratio {args.mask_ratio}, "
        f"bf16 matmul 8192^3 {mm:.0f} TFLOP/s, masked index {'given' if args.given_index else 'found by nonzero'}, "
        f"{'each run synced' if args.sync_each else 'runs queued back to back'}"
    )
    print(header, flush=True)
    paths = loss_paths(args.sweep)
    if args.sweep_rows:
        for line in sweep_row_kernel(args.vocab, 4096, args.iters):
            print(line, flush=True)
    rows = [row for d in args.dims for row in bench_dim(d, paths, args, mm)]
    print(f"\n{header}; N_masked per d: {sorted({(r['d'], r['masked']) for r in rows})}")
    print("\n".join(table_lines(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "matmul_tflops": mm, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
