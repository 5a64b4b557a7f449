"""Helpers shared by the tests that train with the real Trainer, in this process or in torchrun launches
(parallel, checkpoint, safety): random shards, runs that record every loss exactly (the console prints 4
decimals), and one intra-op thread for a block of code."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from dlm_titan.config import load_config
from dlm_titan.data.shards import write_shard

if TYPE_CHECKING:
    from dlm_titan.train import Trainer


@contextlib.contextmanager
def single_torch_thread() -> Iterator[None]:
    """One torch intra-op thread inside the block, the previous count restored after (also on an error). On a
    shared 2-core machine two OpenMP threads spin against each other: tiny matmuls and 6M-model steps run 5-100x
    slower than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def record_losses(trainer: Trainer, on_step: Callable[[Trainer, int], None] | None = None) -> dict[int, float]:
    """Wraps ``trainer.train_step`` so that every step that returns records its exact loss (the local loss sum,
    which is the logged loss for one process); returns {step: loss}, filled as the trainer trains. A step that
    raises records nothing. ``on_step(trainer, step)`` runs after each recorded step."""
    losses: dict[int, float] = {}
    step_fn = trainer.train_step

    def recorded(step: int) -> dict:
        out = step_fn(step)
        losses[step] = out["loss_sum"].item()
        if on_step is not None:
            on_step(trainer, step)
        return out

    trainer.train_step = recorded
    return losses


def user_error_line(capsys, main: Callable[[list[str]], int], argv: list[str]) -> str:
    """The one stderr line of ``main(argv)`` refusing bad input with exit 2 (asserted), output before it dropped."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


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
    try:
        with single_torch_thread():
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


def word_level_tokenizer(folder: Path) -> str:
    """A 6-token WordLevel tokenizer.json (``<unk> <s> </s> a b c``) written into ``folder``: small enough for a
    model of any test vocabulary. Returns its path."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "a", "b", "c"])}
    tok = HF(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


def train_tiny_sentencepiece(folder: Path) -> str:
    """A 300-piece SentencePiece BPE model trained on random words (with BOS/EOS, as lit-gpt's Llama one), not
    the embedded tokenizer: the same kind of file with other ids. Returns its path."""
    import sentencepiece as spm

    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9))) for _ in range(400)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(800)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "tiny"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    return str(folder / "tiny.model")
