"""The data-set identity recorded in checkpoints: sizes by name, insensitive to the folder's location."""

from __future__ import annotations

import json
import shutil

import numpy as np

from dlm_titan.data.identity import dataset_identity, describe_change
from dlm_titan.data.shards import write_shard


def _shards(folder, prefix="train_slim", n=2, tokens=64):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_shard(folder / f"{prefix}_{i:010d}.bin", np.arange(tokens, dtype=np.uint16))
    return folder


def test_identity_is_names_and_sizes_and_follows_the_shards_not_the_path(tmp_path):
    a = _shards(tmp_path / "a")
    _shards(tmp_path / "a", prefix="validation", n=1)  # not selected by the run's prefixes
    ident = dataset_identity(a, ["train_slim"])
    assert ident["shards"] == {f"train_slim_{i:010d}.bin": 24 + 2 * 64 for i in range(2)}  # header + uint16 tokens
    shutil.copytree(a, tmp_path / "b")
    assert describe_change(ident, dataset_identity(tmp_path / "b", ["train_slim"])) is None


def test_appended_tokens_and_added_shards_are_named(tmp_path):
    a = _shards(tmp_path / "a")
    saved = dataset_identity(a, ["train_slim"])
    write_shard(a / "train_slim_0000000001.bin", np.arange(80, dtype=np.uint16))
    change = describe_change(saved, dataset_identity(a, ["train_slim"]))
    assert "1 shard(s) changed size (train_slim_0000000001.bin: 152 -> 184 bytes)" == change
    _shards(tmp_path / "c", n=3)
    change = describe_change(saved, dataset_identity(tmp_path / "c", ["train_slim"]))
    assert change == "1 shard(s) added (train_slim_0000000002.bin)"


def test_a_manifest_of_another_tokenizer_is_a_change(tmp_path):
    a = _shards(tmp_path / "a")
    manifest = a / "train_slim_manifest.json"
    manifest.write_text(json.dumps({"tokenizer": {"sha256": "aa"}, "totals": {"tokens": 128}}))
    saved = dataset_identity(a, ["train_slim"])
    manifest.write_text(json.dumps({"tokenizer": {"sha256": "bb"}, "totals": {"tokens": 128}}))
    assert "manifest" in describe_change(saved, dataset_identity(a, ["train_slim"]))
