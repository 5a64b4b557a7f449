"""Deterministic mode on a GPU: two runs of the same config give bitwise-equal losses (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from test_parallel import data, run_trainer, train_args  # noqa: F401  (data is a fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_deterministic_runs_repeat_bitwise(data, tmp_path):  # noqa: F811
    argv = ["--training.deterministic", "--training.dtype", "bfloat16", "--training.seq_len", "256",
            "--training.local_batch_size", "2", "--training.global_batch_size", "4"]
    first = run_trainer(train_args(data, tmp_path / "a", *argv))
    second = run_trainer(train_args(data, tmp_path / "b", *argv))
    assert first == second
    assert len(set(first.values())) == len(first) > 1
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # leave the process as other tests expect it
