"""Helpers shared by the tests that train with the real Trainer in torchrun launches (parallel, checkpoint):
random shards and a run that records every logged loss exactly (the console prints 4 decimals)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dlm_titan.config import load_config
from dlm_titan.data.shards import write_shard


def write_random_shards(folder: Path, vocab: int, files: int = 2, tokens: int = 4096) -> Path:
    """``train_slim_*`` shards of uniform random token ids below ``vocab`` (seeded)."""
    rng = np.random.default_rng(0)
    for i in range(files):
        write_shard(folder / f"train_slim_{i:010d}.bin", rng.integers(0, vocab, size=tokens).astype(np.uint16))
    return folder


def tiny_run_args(data: Path, dump: Path, vocab: int, steps: int, global_batch: int, local_batch: int,
                  workers: int, *extra: str) -> list[str]:
    """Flags of a seconds-long fp32 run of the 6M model over ``data`` (seq_len 32, a loss logged every step,
    no validation, no TensorBoard), checkpoints off unless ``extra`` turns them on."""
    return [
        "--model.flavor", "6M", "--model.vocab_size", str(vocab), "--data.path", str(data),
        "--data.num_workers", str(workers), "--training.seq_len", "32", "--training.global_batch_size", str(global_batch),
        "--training.local_batch_size", str(local_batch), "--training.steps", str(steps), "--training.dtype", "float32",
        "--optimizer.lr", "3e-3", "--lr_scheduler.warmup_steps", "2", "--metrics.log_freq", "1",
        "--metrics.no_enable_tensorboard", "--checkpoint.no_enable", "--validation.no_enable", "--job.no_print_config",
        "--job.dump_folder", str(dump), *extra,
    ]


def run_trainer(argv: list[str], stop_after: int | None = None) -> dict[int, float]:
    """Trains with the real Trainer (ending after ``stop_after`` steps as if that were the last, the schedule
    still spanning the configured steps), capturing every logged loss; rank 0 writes them to losses.json."""
    from dlm_titan import distributed as dist_utils
    from dlm_titan.train import Trainer

    cfg = load_config(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on two shared, busy cores run ~10x slower than one
    try:
        trainer = Trainer(cfg)
        if stop_after is not None:
            trainer.steps = stop_after
        losses: dict[int, float] = {}
        log = trainer.metrics.log

        def capture(step: int, metrics: dict) -> None:
            losses[step] = metrics["loss"]
            log(step, metrics)

        trainer.metrics.log = capture
        trainer.train()
        if trainer.rank == 0:
            Path(cfg.job.dump_folder, "losses.json").write_text(json.dumps(losses))
    finally:
        torch.set_num_threads(threads)
        dist_utils.shutdown()
    return losses


def read_losses(dump: Path) -> dict[int, float]:
    """The losses a (torchrun-launched) run_trainer wrote to ``dump``."""
    return {int(k): v for k, v in json.loads((dump / "losses.json").read_text()).items()}


def torchrun_failure(output: str, log_dir: Path) -> str:
    """An assertion message for a failed torchrun launched with ``--log-dir log_dir --tee 3``: the tail of its own
    output, then the tail of each rank's stderr (a rank that aborts first is otherwise lost behind the others)."""
    parts = [output[-1500:]]
    for err in sorted(log_dir.glob("*/attempt_*/*/stderr.log")):
        parts.append(f"--- {err.relative_to(log_dir)} ---\n{err.read_text(errors='replace')[-1500:]}")
    return "\n".join(parts)
