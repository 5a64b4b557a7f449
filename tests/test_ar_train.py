"""The AR objective in the real Trainer: its first loss is the initial model's mean next-token CE (float64 here),
1 rank x 4 micro-batches equals 2 ranks x 2, and a resumed run repeats the uninterrupted losses bit for bit.

Runs are fp32, the 6M flavor over a 512-token vocabulary of random shards, seq_len 32 (see harness.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import read_losses, run_trainer, tiny_run_args, write_random_shards

from dlm_titan.config import load_config

VOCAB, STEPS = 512, 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def ar_args(data: Path, dump: Path, *extra: str) -> list[str]:
    return tiny_run_args(data, dump, VOCAB, STEPS, 4, 1, 0, "--training.objective", "ar", *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), VOCAB)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[int, float]:
    """One process, 4 micro-batches of 1 sequence per step, no checkpoints."""
    losses = run_trainer(ar_args(data, tmp_path_factory.mktemp("ref")))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert len({round(v, 4) for v in losses.values()}) == STEPS  # training moves, so equality says something
    return losses


@pytest.mark.slow
def test_first_loss_is_the_initial_models_mean_next_token_ce(data, reference, tmp_path):
    from dlm_titan.models import build_model
    from dlm_titan.train import train_loader

    cfg = load_config(ar_args(data, tmp_path))
    it = iter(train_loader(cfg, str(data), 0, 1))
    windows = torch.cat([next(it)["input"] for _ in range(4)])  # step 1's global batch
    expected = {}
    for causal in (True, False):
        model = build_model(cfg.model, 32, torch.device("cpu"), causal=causal)
        model.to_empty(device="cpu")
        model.init_weights(seed=cfg.training.seed)
        with torch.no_grad():
            logits = model.double()(windows[:, :32])
        expected[causal] = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:33].flatten()).item()
    # the same weights without the causal mask (a bidirectional model sees its targets) give another loss
    assert abs(expected[False] - expected[True]) > 1e-3
    assert reference[1] == pytest.approx(expected[True], rel=1e-5)


@pytest.mark.multiprocess
def test_two_ranks_of_two_micro_batches_equal_one_rank_of_four(data, reference, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           "localhost:0", "--rdzv_id", "dlm_titan_ar", __file__, *ar_args(data, tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    losses = read_losses(tmp_path)
    assert sorted(losses) == sorted(reference)
    for step, ref in reference.items():
        assert abs(losses[step] - ref) <= 1e-6 * abs(ref), f"step {step}: {losses[step]!r} vs {ref!r}"


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_losses_bit_for_bit(data, reference, tmp_path):
    args = ar_args(data, tmp_path / "out", "--checkpoint.enable", "--checkpoint.interval", "2")
    first = run_trainer(args, stop_after=4)
    second = run_trainer(args)
    assert sorted(first) == [1, 2, 3, 4] and sorted(second) == [5, 6]
    assert {**first, **second} == reference  # exact float equality


@pytest.mark.slow
def test_resuming_with_the_other_objective_is_refused(data, tmp_path):
    from dlm_titan.errors import UserError

    mdm = tiny_run_args(data, tmp_path, VOCAB, 2, 4, 2, 0, "--checkpoint.enable", "--checkpoint.interval", "1")
    run_trainer(mdm)
    with pytest.raises(UserError, match="training.objective = 'mdm' but this run trains 'ar'"):
        run_trainer([*mdm, "--training.steps", "3", "--training.objective", "ar"])


@pytest.mark.slow
def test_validation_of_an_ar_run_is_the_exact_nll(data, tmp_path):
    from dlm_titan.ar_validation import NextTokenValidator
    from dlm_titan.data.shards import write_shard
    from dlm_titan.train import Trainer

    write_shard(data / "validation_0000000000.bin", np.random.default_rng(1).integers(0, VOCAB, 33 * 8).astype(np.uint16))
    trainer = Trainer(load_config(ar_args(data, tmp_path, "--validation.enable", "--validation.steps", "2")))
    assert isinstance(trainer.validator, NextTokenValidator)
    result = trainer.validator.run()
    windows = torch.cat([b["input"] for b, _ in zip(trainer.validator.loader, range(2))])
    with torch.no_grad():
        logits = trainer.model(windows[:, :32]).double()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:33].flatten()).item()
    assert result.scalars()["validation/loss"] == pytest.approx(expected, rel=1e-6)
    assert result.tokens == windows.shape[0] * 32


if __name__ == "__main__":  # a torchrun worker: train with the given CLI arguments
    run_trainer(sys.argv[1:])
