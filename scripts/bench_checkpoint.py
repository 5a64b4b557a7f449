"""Checkpoint cost on one GPU: save time and the training stall of each ``checkpoint.async_mode``.

    python -m scripts.bench_checkpoint                        # 1028M, seq 2048, 4 x 4 sequences per step
    python -m scripts.bench_checkpoint --flavor 170M --interval 10 --modes async_with_pinned_mem

For each mode it trains the real Trainer (random-token shards written to a temporary folder, no tokenizer, no
validation) for ``2 * interval + 2`` steps, saving every ``interval`` steps with keep_latest_k = 1. Each step is
timed from one step start to the next, after a CUDA sync, so an iteration includes the checkpoint work done at its
end and any wait for staging in the next optimizer step. The stall of a save at step s is
``t(s) + t(s+1) - 2 * median`` (median over iterations untouched by saves); "save" is the time from the start
of the save until its completion marker is written. The first save of async_with_pinned_mem also allocates the
pinned buffers, so both saves are reported. Prints one summary line at the end (and per-mode lines before it).

``--checksum`` times what the checkpoint checksums cost instead: blocking saves without and with the CRC-32 of
every file recorded in the marker, and the verification a resume does (all files, threads, page cache warm as
right after a save; a resume after a reboot reads from the disk).

    python -m scripts.bench_checkpoint --checksum             # 1028M: save with/without CRC-32, verify time
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scripts.cli import HelpFormatter

MODES = ("disabled", "async", "async_with_pinned_mem")


def write_random_shards(folder: Path, tokens: int, vocab: int) -> None:
    from dlm_titan.data.shards import write_shard

    rng = np.random.default_rng(0)
    chunk = 2049 * 512
    for n in range(max(1, -(-tokens // chunk))):
        write_shard(folder / f"train_slim_{n:010d}.bin", rng.integers(0, vocab, chunk, dtype=np.uint16))


def bench_mode(mode: str, args: argparse.Namespace, data: Path, dump: Path, checksums: bool = True) -> dict:
    """Trains ``2 * interval + 2`` steps saving every ``interval`` (recording file ``checksums`` in the markers or
    not); returns iteration times, save stats and the verification time of the last checkpoint (or None)."""
    from dlm_titan.config import load_config
    from dlm_titan.train import Trainer

    steps = 2 * args.interval + 2
    cfg = load_config([
        "--model.flavor", args.flavor, "--data.path", str(data), "--data.num_workers", "2",
        "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.local_batch_size),
        "--training.global_batch_size", str(args.local_batch_size * args.micro_batches),
        "--training.steps", str(steps), "--metrics.log_freq", str(args.interval), "--metrics.no_enable_tensorboard",
        "--validation.no_enable", "--job.no_print_config", "--job.dump_folder", str(dump),
        "--checkpoint.enable", "--checkpoint.interval", str(args.interval), "--checkpoint.keep_latest_k", "1",
        "--checkpoint.async_mode", mode, "--checkpoint.write_threads", str(args.write_threads),
    ])
    trainer = Trainer(cfg)
    trainer.checkpointer.record_checksums = checksums
    starts: list[float] = []
    step_fn = trainer.train_step

    def timed(step: int):
        _sync()
        starts.append(time.perf_counter())
        return step_fn(step)

    trainer.train_step = timed
    trainer.train()
    _sync()
    iters = {s: starts[s] - starts[s - 1] for s in range(1, len(starts))}  # iteration s: start of s to s+1
    state_bytes = sum(p.numel() * p.element_size() * 3 for p in trainer.model.parameters())  # params + Adam
    stats = [s for s in trainer.checkpointer.save_stats if s["step"] < steps]
    iterator = getattr(trainer.data_loader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"iters": iters, "stats": stats, "state_gb": state_bytes / 1e9, "verify_s": _verify_time(dump)}


def _verify_time(dump: Path) -> float | None:
    """Seconds to verify the newest checkpoint's files against its marker's CRC-32s (None: none recorded)."""
    from dlm_titan.checkpoint_layout import newest_complete, read_marker, verify_checksums

    step_dir = newest_complete(dump / "checkpoint", warn=False)
    marker = read_marker(step_dir)
    if not marker.get("checksums"):
        return None
    start = time.perf_counter()
    verify_checksums(step_dir, marker)
    return time.perf_counter() - start


def bench_checksums(args: argparse.Namespace, data: Path, root: Path) -> str:
    """Blocking saves without and with checksums, and the verification time; returns the summary line."""
    saves = {}
    for checksums in (False, True):
        result = bench_mode("disabled", args, data, root / f"crc_{checksums}", checksums)
        shutil.rmtree(root / f"crc_{checksums}", ignore_errors=True)
        saves[checksums] = statistics.median(s["total_s"] for s in result["stats"])
    added = saves[True] - saves[False]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"bench_checkpoint checksum: {name} | {args.flavor}, {result['state_gb']:.1f} GB of params + Adam state, "
            f"{args.write_threads} write threads | blocking save {saves[False]:.2f} s without, {saves[True]:.2f} s "
            f"with CRC-32 ({added:+.2f} s, {added / saves[False]:+.1%}) | verify on resume {result['verify_s']:.2f} s "
            "(page cache warm)")


def _fmt(values: list[float], digits: int) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def summarize(mode: str, result: dict) -> tuple[str, list[float]]:
    iters, stats = result["iters"], result["stats"]
    touched = {s["step"] for s in stats} | {s["step"] + 1 for s in stats}
    quiet = [t for s, t in iters.items() if s not in touched and s > 2]  # skip warm-up iterations
    median = statistics.median(quiet)
    stalls = [iters.get(s["step"], 0) + iters.get(s["step"] + 1, 0) - 2 * median for s in stats]
    saves = [s["total_s"] for s in stats]
    blocking = [s["blocking_s"] for s in stats]
    line = (f"{mode}: save {_fmt(saves, 1)} s, stall {_fmt(stalls, 2)} s (blocking {_fmt(blocking, 2)} s; "
            f"step {median:.3f} s)")
    return line, stalls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--flavor", default="1028M", help="model flavor")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--local_batch_size", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--micro_batches", type=int, default=4, help="gradient accumulation steps")
    parser.add_argument("--interval", type=int, default=20, help="steps between saves (longer than a save's write)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated checkpoint modes to time")
    parser.add_argument("--write_threads", type=int, default=4, help="checkpoint.write_threads")
    parser.add_argument("--dir", default=None, help="folder for shards and checkpoints (default: a temp folder)")
    parser.add_argument("--checksum", action="store_true", help="time the checkpoint checksums instead: save "
                        "without/with CRC-32, verification on resume")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_checkpoint: no CUDA GPU; running on the CPU (async_with_pinned_mem acts as async)")
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    try:
        data = root / "shards"
        data.mkdir()
        tokens = (2 * args.interval + 4) * args.local_batch_size * args.micro_batches * (args.seq_len + 1)
        write_random_shards(data, tokens, 32000)
        if args.checksum:
            print(bench_checksums(args, data, root), flush=True)
            return 0
        lines, worst = [], {}
        for mode in args.modes.split(","):
            result = bench_mode(mode, args, data, root / mode)
            shutil.rmtree(root / mode, ignore_errors=True)
            line, stalls = summarize(mode, result)
            print(f"bench_checkpoint {line}", flush=True)
            lines.append(line)
            worst[mode] = stalls[-1] if stalls else float("nan")
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"bench_checkpoint summary: {name} | {args.flavor}, {result['state_gb']:.1f} GB of params + Adam state, "
              f"torch {torch.__version__}, {args.write_threads} write threads, interval {args.interval} | " + " | ".join(lines)
              + f" | steady-state stall of the last mode {worst[mode]:.2f} s (target < 1 s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
