"""LITPKDS format: header bytes exactly as DESIGN.md; bad shards and bad data config give one-line UserErrors."""

from __future__ import annotations

import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlm_titan.config import load_config
from dlm_titan.data import build_train_loader, build_val_loader, read_header, write_shard
from dlm_titan.data.shards import ShardError, dtype_for_vocab
from dlm_titan.errors import UserError


def design_header(code: int, chunk_size: int) -> bytes:
    """DESIGN.md: b"LITPKDS" (7 B) + version uint64 LE (1) + dtype code uint8 + chunk_size uint64 LE."""
    return b"LITPKDS" + (1).to_bytes(8, "little") + bytes([code]) + chunk_size.to_bytes(8, "little")


def test_written_header_matches_design_byte_for_byte(tmp_path: Path):
    tokens = np.arange(5000, dtype=np.uint16) * 7
    write_shard(tmp_path / "a.bin", tokens)
    raw = (tmp_path / "a.bin").read_bytes()
    assert len(design_header(8, 5000)) == 24
    assert raw[:24] == design_header(8, 5000)
    assert raw[24:] == b"".join(int(t).to_bytes(2, "little") for t in tokens)

    big = np.array([0, 65535, 70000, 99999], dtype=np.int32)  # a vocabulary >= 65500 needs int32
    assert dtype_for_vocab(100000) == np.int32 and dtype_for_vocab(32000) == np.uint16
    write_shard(tmp_path / "b.bin", big)
    raw = (tmp_path / "b.bin").read_bytes()
    assert raw[:24] == design_header(4, 4)
    assert raw[24:] == b"".join(int(t).to_bytes(4, "little", signed=True) for t in big)
    info = read_header(tmp_path / "b.bin")
    assert (info.dtype, info.chunk_size) == (np.dtype(np.int32), 4)


def data_cfg(**kw) -> SimpleNamespace:
    base = dict(path="", train_prefixes=["train_slim"], train_weights=[1.0], val_prefix="validation",
                tokenizer_path="", num_workers=0)
    base.update(kw)
    return SimpleNamespace(**base)


def first_batch(folder: Path, vocab_size: int = 32000, **kw):
    loader = build_train_loader(data_cfg(**kw), data_path=str(folder), seq_len=3, local_batch_size=1,
                                global_batch_size=1, dp_rank=0, dp_world_size=1, seed=0, vocab_size=vocab_size)
    return next(iter(loader))


def test_tinyllama_style_shard_reads_unchanged(tmp_path: Path):
    # TinyLlama's builder: fixed chunk_size, tail pre-filled with the separator (BOS = 1)
    body = np.ones(16, dtype=np.uint16)
    body[:13] = [5, 6, 7, 2, 8, 9, 2, 10, 11, 12, 13, 14, 2]
    (tmp_path / "train_slimpajama_0_0000000000.bin").write_bytes(
        struct.pack("<7sQBQ", b"LITPKDS", 1, 8, 16) + body.astype("<u2").tobytes())
    loader = build_train_loader(data_cfg(), data_path=str(tmp_path), seq_len=3, local_batch_size=4,
                                global_batch_size=4, dp_rank=0, dp_world_size=1, seed=0, vocab_size=32000)
    rows = sorted(next(iter(loader))["input"].tolist())
    assert rows == sorted(body.reshape(4, 4).astype(int).tolist())


def write_raw(path: Path, header: bytes, body: bytes) -> Path:
    path.write_bytes(header + body)
    return path


@pytest.mark.parametrize(
    "header, body, message",
    [
        (b"LITPKDX" + struct.pack("<QBQ", 1, 8, 8), bytes(16), "magic b'LITPKDX'"),
        (struct.pack("<7sQBQ", b"LITPKDS", 1, 8, 8), bytes(15), "truncated or corrupt: 39 bytes"),
        (b"LITPKDS" + bytes(5), b"", "truncated: 12 bytes"),
        (struct.pack("<7sQBQ", b"LITPKDS", 1, 6, 8), bytes(32), "dtype code 6"),
        (struct.pack("<7sQBQ", b"LITPKDS", 2, 8, 8), bytes(16), "version 2"),
    ],
)
def test_bad_shard_header_names_the_file(tmp_path: Path, header, body, message):
    bad = write_raw(tmp_path / "train_slimpajama_0_0000000001.bin", header, body)
    write_shard(tmp_path / "train_slimpajama_0_0000000000.bin", np.arange(8, dtype=np.uint16))
    with pytest.raises(ShardError, match=message) as err:
        first_batch(tmp_path)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("workers", [0, 1])
def test_token_id_outside_model_vocab(tmp_path: Path, workers):
    tokens = np.arange(8, dtype=np.uint16)
    tokens[5] = 32000  # the mask id is not a data token
    write_shard(tmp_path / "train_slimpajama_0_0000000000.bin", tokens)
    with pytest.raises(UserError, match="token id 32000, outside the model vocabulary") as err:
        first_batch(tmp_path, num_workers=workers)
    msg = str(err.value)  # also from a worker process: one line naming the file
    assert "train_slimpajama_0_0000000000.bin" in msg and "\n" not in msg
    # the same shard is fine for a model with a larger vocabulary
    assert first_batch(tmp_path, vocab_size=32001, num_workers=workers)["input"].shape == (1, 4)


def test_user_shards_without_tokenizer_fit_a_small_model(tmp_path: Path):
    write_shard(tmp_path / "train_slimpajama_0_0000000000.bin", np.arange(8, dtype=np.uint16) * 12)
    batch = first_batch(tmp_path, vocab_size=85, path=str(tmp_path))  # ids <= 84: no 32k tokenizer check
    assert int(batch["input"].max()) <= 84
    with pytest.raises(UserError, match="more than model.vocab_size=85"):
        first_batch(tmp_path, vocab_size=85)  # the embedded corpus comes with the 32k embedded tokenizer


def test_prefix_matching_no_file(tmp_path: Path):
    write_shard(tmp_path / "train_slimpajama_0_0000000000.bin", np.arange(8, dtype=np.uint16))
    with pytest.raises(UserError, match=f"no shard matches prefix 'train_star' .* in {tmp_path}"):
        first_batch(tmp_path, train_prefixes=["train_slim", "train_star"], train_weights=[0.5, 0.5])
    with pytest.raises(UserError, match=f"prefix 'validation'.* in {tmp_path}"):
        build_val_loader(data_cfg(), data_path=str(tmp_path), seq_len=3, local_batch_size=1, dp_rank=0,
                         dp_world_size=1)


def test_shards_shorter_than_a_window(tmp_path: Path):
    write_shard(tmp_path / "train_slimpajama_0_0000000000.bin", np.arange(3, dtype=np.uint16))
    with pytest.raises(UserError, match="no window of seq_len \\+ 1 = 4 tokens"):
        first_batch(tmp_path)


def test_bad_weights():
    """Checked when the config loads (the loader's one home for them is dlm_titan.config_checks' range table)."""
    with pytest.raises(UserError, match="one weight per prefix"):
        load_config(["--data.train_weights", "0.5", "0.5"])
    with pytest.raises(UserError, match="positive sum"):
        load_config(["--data.train_weights", "0.0"])


def test_int32_shard_written_by_hand_reads_through_the_loader(tmp_path: Path):
    """A code-4 shard (as TinyLlama writes for large vocabularies), bytes written here: the loader returns its ids,
    above uint16's range, and checks them against the model vocabulary like any shard."""
    ids = [70_000, 65_536, 65_535, 3, 69_999, 0, 123_456, 7]
    write_raw(tmp_path / "train_slimpajama_0_0000000000.bin", design_header(4, 8),
              b"".join(i.to_bytes(4, "little", signed=True) for i in ids))
    loader = build_train_loader(data_cfg(path=str(tmp_path)), data_path=str(tmp_path), seq_len=3, local_batch_size=2,
                                global_batch_size=2, dp_rank=0, dp_world_size=1, seed=0, vocab_size=123_457)
    assert sorted(next(iter(loader))["input"].tolist()) == sorted([ids[:4], ids[4:]])
    with pytest.raises(UserError, match="token id 123456, outside the model vocabulary \\[0, 100000\\)"):
        first_batch(tmp_path, vocab_size=100_000, path=str(tmp_path))
    # the switch: uint16 holds every id of a vocabulary of up to 65,535 tokens
    assert dtype_for_vocab(65_535) == np.uint16 and dtype_for_vocab(65_536) == np.int32
