"""Training throughput of real steps (the Trainer, the loader, the optimizer) for several setups in one process.

Each run builds a fresh Trainer from flags, trains ``--steps`` steps with one micro-batch per rank per step
(global batch = local batch x ranks, as torchtitan's benchmarks), and takes the median of the trainer's own
tokens/s over the windows between logged steps after ``--warmup`` (on a GPU each window is timed on the device's
clock, from the end of one logged step's work to the end of the next). tokens/s and MFU use the trainer's formula
(DESIGN.md), peak memory is the allocator's peak of active and of reserved memory over a window (with CUDA graphs
only the reserved one counts the graphs' memory pool).

A run is ``FLAVOR:feature,feature,...`` with features:
  eager (default) | compile; ac (selective, per op) | acfull | ac2 (every 2nd block); float8; fsdp (full shard,
  reshard after forward) | noreshard (full shard, keep gathered params) | default (FSDP "default" policy) |
  replicate (DDP, shard degree 1); b=N (local batch); profile (also record a trace of the last step and print
  where the device time goes, by kernel, and how long it sat idle); a=N (N micro-batches per rank per step,
  gradient accumulation); bf16reduce (bf16 gradient reduction); nocheck (skip the per-step non-finite check, to
  measure its host sync); bf16emb (cast the embedding output to bf16 under autocast, so the residual stream is
  bf16 on one GPU as it is under FSDP: a probe for a model change); losstorch (the chunked PyTorch loss reference
  instead of the fused Triton kernel); cudagraphs (compiled blocks replayed as CUDA graphs; with compile);
  adamfused (PyTorch's fused AdamW after clip_grad_norm_ instead of the Triton AdamW with clipping folded in);
  ar (the autoregressive baseline, training.objective = "ar": causal attention, next-token loss; the same work as
  torchtitan's Llama of that shape, so its tokens/s compares with torchtitan's directly).

Launch with torchrun for several GPUs: every rank runs the same list, rank 0 prints and writes results.

    python -m scripts.bench_train --runs 170M:eager 170M:compile 1028M:compile,float8 --data_path DIR
    python -m scripts.bench_train --runs 170M:compile,ar 1028M:compile,ar   # against torchtitan's Llama
    torchrun --nproc_per_node 4 -m scripts.bench_train --runs 170M:compile,replicate 1028M:compile,noreshard
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from dlm_titan.config import load_config
from dlm_titan.flops import flops_per_token, peak_flops
from scripts.cli import HelpFormatter

FEATURES = {"eager", "compile", "ac", "acfull", "ac2", "float8", "fsdp", "noreshard", "default", "replicate", "profile",
            "nocheck", "bf16reduce", "bf16emb", "losstorch", "cudagraphs", "adamfused", "ar"}


def parse_run(spec: str) -> tuple[str, list[str], int | None, int]:
    """``"1028M:compile,ac,b=4,a=2"`` -> ("1028M", ["compile", "ac"], 4, 2)."""
    flavor, _, rest = spec.partition(":")
    features, batch, accum = [], None, 1
    for item in filter(None, rest.split(",")):
        if item.startswith("b="):
            batch = int(item[2:])
        elif item.startswith("a="):
            accum = int(item[2:])
        elif item in FEATURES:
            features.append(item)
        else:
            raise SystemExit(f"error: unknown feature {item!r} in run {spec!r}; known: {', '.join(sorted(FEATURES))}, b=N, a=N")
    return flavor, features, batch, accum


def trainer_argv(flavor: str, features: list[str], args, world_size: int, dump: Path, batch: int, accum: int) -> list[str]:
    """CLI flags of one run: the features mapped onto the trainer's config sections."""
    steps = args.steps
    argv = [
        "--model.flavor", flavor, "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(batch),
        "--training.global_batch_size", str(batch * world_size * accum), "--training.steps", str(steps),
        "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", str(args.log_freq), "--metrics.no_enable_tensorboard",
        "--checkpoint.no_enable", "--validation.no_enable", "--job.no_print_config", "--job.dump_folder", str(dump),
        "--data.path", args.data_path, "--data.num_workers", str(args.num_workers),
        "--compile.enable" if "compile" in features else "--compile.no_enable",
    ]
    if "ac" in features:
        argv += ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"]
    if "ac2" in features:
        argv += ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"]
    if "acfull" in features:
        argv += ["--activation_checkpoint.mode", "full"]
    if "float8" in features:
        argv += ["--float8.enable"]
    reshard = {"fsdp": "always", "noreshard": "never", "default": "default"}
    for feature, policy in reshard.items():
        if feature in features:
            argv += ["--parallelism.fsdp_reshard_after_forward", policy]
    if "replicate" in features:
        argv += ["--parallelism.data_parallel_replicate_degree", "-1", "--parallelism.data_parallel_shard_degree", "1"]
    if "cudagraphs" in features:
        argv += ["--compile.cudagraphs"]
    if "adamfused" in features:
        argv += ["--optimizer.implementation", "fused"]
    if "losstorch" in features:
        argv += ["--diffusion.loss_impl", "torch"]
    if "bf16reduce" in features:
        argv += ["--training.mixed_precision_reduce", "bfloat16"]
    if "ar" in features:
        argv += ["--training.objective", "ar"]
    if "profile" in features:
        argv += ["--profiling.enable_profiling", "--profiling.profile_freq", str(steps)]
    return argv + list(args.trainer_args)


def run_one(spec: str, args, world_size: int, rank: int) -> dict:
    """Trains one setup and returns its timing record (rank 0's view)."""
    from dlm_titan.train import Trainer

    flavor, features, batch, accum = parse_run(spec)
    batch = batch or args.local_batch_size
    dump = Path(args.dump_root) / spec.replace(":", "_").replace(",", "_").replace("=", "")
    argv = trainer_argv(flavor, features, args, world_size, dump, batch, accum)
    trainer = Trainer(load_config(argv))
    marks: list[tuple[int, dict]] = []
    log = trainer.metrics.log

    def capture(step: int, metrics: dict) -> None:
        marks.append((step, dict(metrics)))
        log(step, metrics)

    trainer.metrics.log = capture
    if "nocheck" in features:
        trainer.nonfinite.check = lambda *a, **k: True
    if "bf16emb" in features:
        embed = trainer.model.tok_embeddings.forward
        trainer.model.tok_embeddings.forward = lambda tokens: embed(tokens).to(torch.bfloat16)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    # The trainer's window of each logged step covers the steps since the previous one.
    windows = [m["tokens_per_s"] for (s0, _), (_, m) in zip(marks, marks[1:]) if s0 >= args.warmup]
    after = [m for s, m in marks if s > args.warmup]
    a = trainer.model_args
    fpt = flops_per_token(a.total_params() - (a.vocab_size + 1) * a.dim, a.n_layers, a.dim, args.seq_len)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_flops(name) if torch.cuda.is_available() else None
    tps = statistics.median(windows) if windows else float("nan")
    record = {
        "run": spec, "flavor": flavor, "features": features, "world_size": world_size, "device": name,
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "local_batch": batch, "accum": accum,
        "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "tokens_per_s": tps,
        "tokens_per_s_per_gpu": tps / world_size, "mfu": tps / world_size * fpt / peak if peak else None,
        "windows_tokens_per_s": windows, "wall_s": total,
        "peak_active_gib": max((m.get("memory_gib") or 0.0) for m in after) if after else None,
        "peak_reserved_gib": max((m.get("memory_reserved_gib") or 0.0) for m in after) if after else None,
        "loss_last": marks[-1][1].get("loss") if marks else None,
        "objective": trainer.cfg.training.objective, "attn_backend": trainer.model.attn_backend, "form": trainer.dims.form,
        "float8_linears": sum(type(m).__name__ == "Float8Linear" for m in trainer.model.modules()),
    }
    if "profile" in features and rank == 0:
        record["profile"] = summarize_trace(dump / "profile_traces" / f"iteration_{args.steps}" / "rank0_trace.json")
    del trainer
    return record


def kernel_category(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if any(k in low for k in ("sdpa", "fmha", "flash", "attention", "attn")):
        return "attention"
    if any(k in low for k in ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "matmul", "_mm_", "scaled_mm")):
        return "matmul"
    if "triton" in low:
        return "triton"
    if any(k in low for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    return "other"


def summarize_trace(path: Path, top: int = 12) -> dict:
    """Device time of one profiled step by kernel and by category, from a chrome trace, and how long the device
    sat idle between its first and last kernel (time no kernel, copy or memset ran on any stream: the host was
    behind, or waiting on a sync)."""
    if not path.exists():
        return {"error": f"no trace at {path}"}
    events = json.loads(path.read_text())["traceEvents"]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_name: dict[str, float] = {}
    for e in device:
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + e.get("dur", 0.0) / 1000.0
    by_cat: dict[str, float] = {}
    for kernel, ms in by_name.items():
        by_cat[kernel_category(kernel)] = by_cat.get(kernel_category(kernel), 0.0) + ms
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])
    span, busy = busy_time([(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in device])
    return {
        "device_ms": sum(by_name.values()),
        "span_ms": span / 1000.0,
        "idle_ms": (span - busy) / 1000.0,
        "by_category_ms": dict(sorted(by_cat.items(), key=lambda kv: -kv[1])),
        "top_kernels_ms": [(k[:160], round(v, 3)) for k, v in ranked[:top]],
        "attention_kernels": sorted({k[:160] for k in by_name if kernel_category(k) == "attention"}),
    }


def busy_time(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(span, covered time) of ``(start, end)`` intervals: from the first start to the last end, and the length
    of their union (kernels of several streams may overlap)."""
    if not intervals:
        return 0.0, 0.0
    intervals = sorted(intervals)
    covered, (lo, hi) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > hi:
            covered += hi - lo
            lo, hi = start, end
        else:
            hi = max(hi, end)
    covered += hi - lo
    return max(end for _, end in intervals) - intervals[0][0], covered


def cleanup() -> None:
    """Frees one run's model, optimizer and compiled graphs before the next (the on-disk cache is kept)."""
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def print_table(records: list[dict]) -> None:
    print("\n| run | GPUs | device | local batch x accum | tokens/s | per GPU | MFU | peak GiB active / reserved "
          "| form |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in records:
        if "error" in r:
            print(f"| {r['run']} | {r.get('world_size')} | | | failed: {r['error'][:80]} | | | | |")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        mem = "-" if r["peak_active_gib"] is None else f"{r['peak_active_gib']:.1f} / {r['peak_reserved_gib']:.1f}"
        print(f"| {r['run']} | {r['world_size']} | {r['device']} | {r['local_batch']} x {r['accum']} | {r['tokens_per_s']:,.0f} | "
              f"{r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {mem} | {r['form']} |")
    for r in records:
        if "profile" in r:
            print(f"\nprofile of {r['run']}: {json.dumps(r['profile'], indent=1)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="FLAVOR:feature,... (see above)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="steps excluded from timing (compile, allocator)")
    parser.add_argument("--log_freq", type=int, default=5, help="timing window in steps")
    parser.add_argument("--local_batch_size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--data_path", default="", help='shard folder; "" = the embedded corpus')
    parser.add_argument("--num_workers", type=int, default=2, help="data loader workers")
    parser.add_argument("--dump_root", default="/tmp/dlm_titan_bench", help="folder of the runs' dump folders")
    parser.add_argument("--out", default="", help="append one JSON line per run to this file (rank 0)")
    parser.add_argument("trainer_args", nargs="*", help="extra trainer flags after --")
    args = parser.parse_args()
    for spec in args.runs:
        parse_run(spec)
    from dlm_titan import distributed as dist_utils

    rank, world_size, _ = dist_utils.init_distributed()
    records = []
    for spec in args.runs:
        try:
            record = run_one(spec, args, world_size, rank)
        except Exception as e:  # keep benchmarking the other setups; the error goes into the table
            if rank == 0:
                traceback.print_exc()
            record = {"run": spec, "world_size": world_size, "error": f"{type(e).__name__}: {e}"}
        cleanup()
        records.append(record)
        if rank == 0:
            print(f"RESULT {json.dumps(record)}", flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
    if rank == 0:
        print_table(records)
    dist_utils.shutdown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
