"""Hostile-user cases of the data path: shard folders and preparations in states a user can leave them in, each
refused with one line naming the problem and the fix instead of training on the wrong data."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlm_titan.data import build_train_loader
from dlm_titan.data.shards import ShardError, list_shards, write_shard
from dlm_titan.errors import UserError

SEQ_LEN = 15


def shard(folder: Path, name: str, n: int = 64) -> None:
    """A valid uint16 shard of ``n`` small token ids."""
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / name, (np.arange(n) % 50).astype(np.uint16))


def data_cfg(**overrides) -> SimpleNamespace:
    base = dict(path="", train_prefixes=["train_slim"], train_weights=[1.0], val_prefix="validation",
                tokenizer_path="", num_workers=0)
    return SimpleNamespace(**{**base, **overrides})


def train_loader(folder: Path, **overrides):
    return build_train_loader(data_cfg(**overrides), data_path=str(folder), seq_len=SEQ_LEN, local_batch_size=2,
                              global_batch_size=2, dp_rank=0, dp_world_size=1, seed=0, vocab_size=32000)


def test_a_shard_linked_to_a_missing_target_is_refused(tmp_path):
    """A shard symlinked from another disk whose target is gone (an unmounted volume) was skipped without a word,
    so training read the remaining shards only."""
    shard(tmp_path, "train_slim_0.bin")
    os.symlink(tmp_path / "elsewhere" / "train_slim_1.bin", tmp_path / "train_slim_1.bin")
    with pytest.raises(ShardError, match=r"train_slim_1\.bin is a symbolic link to .*elsewhere.*does not exist"):
        list_shards(tmp_path, "train_slim")
    with pytest.raises(ShardError, match="symbolic link"):
        train_loader(tmp_path)
    # a link to a shard that exists is read as that shard
    shard(tmp_path / "elsewhere", "train_slim_1.bin")
    assert [Path(p).name for p in list_shards(tmp_path, "train_slim")] == ["train_slim_0.bin", "train_slim_1.bin"]


@pytest.mark.parametrize("prefixes", [["train_slim", "train_slim"], ["train", "train_star"],
                                      ["train_slim", "train_slim_1"]])
def test_training_sources_that_share_a_shard_are_refused(tmp_path, prefixes):
    """A prefix that begins another (``train`` also selects ``train_star*.bin``), or one listed twice, read the
    shared shards under both weights: the mixture was not the one the weights say."""
    for name in ("train_slim_0.bin", "train_slim_1.bin", "train_star_0.bin"):
        shard(tmp_path, name)
    with pytest.raises(UserError, match=f"data.train_prefixes {prefixes[0]!r} and {prefixes[1]!r} both select"):
        train_loader(tmp_path, train_prefixes=prefixes, train_weights=[0.5, 0.5])
    # disjoint prefixes, and a shared one whose weight is 0 (never read), are fine
    train_loader(tmp_path, train_prefixes=["train_slim", "train_star"], train_weights=[0.5, 0.5])
    train_loader(tmp_path, train_prefixes=prefixes, train_weights=[1.0, 0.0])
