"""Data throughput: the training loader (tokens/s per worker and end to end) and shard preparation (tokens/s).

Usage::

    python -m scripts.bench_data [--seq_len 2048] [--local_batch_size 8] [--workers 0,1,2] [--seconds 5]

The loader runs over synthetic shards (random ids, default 2049*1024-token chunks) written to a temporary
folder, so they sit in the page cache: this measures the loader, not the disk. "per worker" is the micro-batch
function alone in this process (what one worker process can produce); the loader rows include worker IPC.
Tokens count ``local_batch_size * seq_len`` per micro-batch. Preparation tokenizes the embedded corpus's train
split (or --source_path) with the embedded tokenizer (or --tokenizer_path).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dlm_titan.data import build_train_loader, prepare_split, write_shard
from dlm_titan.data.embedded import embedded_corpus_dir
from dlm_titan.data.prepare import DEFAULT_CHUNK_SIZE
from scripts.cli import HelpFormatter


def make_shards(folder: Path, n: int, chunk_size: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_shard(folder / f"train_slimpajama_{i:06d}_0000000000.bin",
                    rng.integers(0, 32000, size=chunk_size, dtype=np.uint16))


def rate(fn, seconds: float) -> tuple[float, float]:
    """Calls of ``fn`` per wall-clock second and per CPU second of this process (after one warm-up call).

    The CPU-time rate is what one worker process sustains on a core of its own, even on a busy machine.
    """
    fn()
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - start), n / max(time.process_time() - cpu, 1e-9)


def bench_one(args: argparse.Namespace, folder: Path, workers: int) -> list[tuple[str, float, float | None]]:
    """tokens/s of the micro-batch function in this process (workers == 0) and of the loader."""
    cfg = SimpleNamespace(train_prefixes=["train_slim"], train_weights=[1.0], tokenizer_path="",
                          num_workers=workers)
    loader = build_train_loader(cfg, data_path=str(folder), seq_len=args.seq_len,
                                local_batch_size=args.local_batch_size,
                                global_batch_size=args.local_batch_size * 4, dp_rank=0, dp_world_size=1, seed=0,
                                vocab_size=32000)
    tokens = args.local_batch_size * args.seq_len
    rows = []
    if workers == 0:
        counter = iter(range(1 << 62))
        wall, cpu = rate(lambda: loader.dataset[next(counter)], args.seconds)
        rows.append(("micro-batch function in one process (= one worker)", wall * tokens, cpu * tokens))
    it = iter(loader)
    for _ in range(8 * max(workers, 1)):  # start workers, fill the prefetch queue, map every shard once
        next(it)
    wall, cpu = rate(lambda: next(it), args.seconds)
    rows.append((f"StatefulDataLoader, num_workers={workers}", wall * tokens, cpu * tokens if workers == 0 else None))
    return rows


def bench_loader(args: argparse.Namespace, folder: Path) -> list[tuple[str, float, float | None]]:
    return [row for w in args.workers.split(",") for row in bench_one(args, folder, int(w))]


def bench_prepare(args: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    source = args.source_path or str(embedded_corpus_dir())
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            manifest = prepare_split(source, args.tokenizer_path, out, "train", num_workers=workers,
                                     show_progress=False)
            elapsed = time.perf_counter() - start
        rows.append((f"prepare_slim_pajama, num_workers={workers}", manifest["totals"]["tokens"] / elapsed, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--local_batch_size", type=int, default=8, help="sequences per batch")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    parser.add_argument("--shards", type=int, default=16, help="random shards to write and read")
    parser.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per shard")
    parser.add_argument("--seconds", type=float, default=5.0, help="time each case runs")
    parser.add_argument("--source_path", default="", help="corpus for the prepare benchmark (default: embedded)")
    parser.add_argument("--tokenizer_path", default="", help='tokenizer of the prepare benchmark ("" = the embedded one)')
    parser.add_argument("--skip_prepare", action="store_true", help="time only the loader")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_shards(Path(tmp), args.shards, args.chunk_size)
        rows = bench_loader(args, Path(tmp))
    if not args.skip_prepare:
        rows += bench_prepare(args)
    print(f"| what (seq_len {args.seq_len}, micro-batch {args.local_batch_size}) | tokens/s (wall) | "
          "tokens per CPU-second |")
    print("|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall / 1e6:,.1f}M | {'-' if cpu is None else f'{cpu / 1e6:,.1f}M'} |")


if __name__ == "__main__":
    main()
