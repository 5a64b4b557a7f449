"""Review tests of the data path against independent references: hand-written shard bytes, brute-force
enumeration of windows, permutations, mixture counts and layouts, and the embedded-corpus cache's lock."""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dlm_titan.data import embedded as embedded_mod
from dlm_titan.data.loader import TrainBatches, build_train_loader, build_val_loader
from dlm_titan.data.mixture import SourceMixture, block_counts
from dlm_titan.data.permutation import IndexPermutation
from dlm_titan.data.shards import ShardError, read_header
from dlm_titan.data.windows import WindowSet


def raw_shard(tokens: list[int], fmt: str, code: int, *, magic: bytes = b"LITPKDS", version: int = 1,
              chunk: int | None = None) -> bytes:
    """A shard written byte by byte from the format description (not with the package's writer)."""
    n = len(tokens) if chunk is None else chunk
    body = b"".join(struct.pack("<" + fmt, t) for t in tokens)
    return magic + struct.pack("<Q", version) + bytes([code]) + struct.pack("<Q", n) + body


GOOD = raw_shard([1, 2, 3, 4], "H", 8)


@pytest.mark.parametrize("data", [
    b"", b"LITPKDS", GOOD[:23],  # shorter than the header
    GOOD[:-1], GOOD + b"\0",  # body one byte short / long
    raw_shard([1, 2], "H", 8, chunk=3),  # header says more tokens than there are
    raw_shard([1, 2, 3, 4], "H", 8, magic=b"LITPKDX"),
    raw_shard([1, 2, 3, 4], "H", 8, version=2),
    raw_shard([1, 2], "f", 6), raw_shard([1, 2], "d", 7), raw_shard([1, 2], "H", 0), raw_shard([1, 2], "H", 9),
    raw_shard([1, 2], "H", 4),  # int32 code over 2 uint16 tokens: 4 bytes, the header claims 8
])
def test_corrupt_shard_headers_are_one_line_errors(tmp_path: Path, data: bytes):
    path = tmp_path / "train_x_0000000000.bin"
    path.write_bytes(data)
    with pytest.raises(ShardError) as info:
        read_header(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(ShardError):
        WindowSet(str(tmp_path), "train_x", 2, None)


@pytest.mark.parametrize(("fmt", "code"), [("H", 8), ("i", 4), ("B", 1), ("q", 5)])
def test_windows_brute_force_over_shards_with_tails(tmp_path: Path, fmt: str, code: int):
    """Windows of w tokens never cross shard files; each shard's tail (< w tokens) is skipped; an empty shard is
    fine. The reference cuts every hand-written shard into windows by plain list slicing."""
    w = 3
    big = 70_000 if fmt in "iq" else 200  # int32/int64 ids above uint16
    sizes = [7, 0, 3, 2, 9, 5]
    shards, ref, nxt = [], [], 0
    for n in sizes:
        toks = list(range(nxt + big, nxt + big + n))
        nxt += n
        shards.append(toks)
        ref += [toks[i * w:(i + 1) * w] for i in range(n // w)]
    for i, toks in enumerate(shards):
        (tmp_path / f"train_x_{i:010d}.bin").write_bytes(raw_shard(toks, fmt, code))
    ws = WindowSet(str(tmp_path), "train_x", w, None)
    assert ws.num_windows == len(ref) == 2 + 0 + 1 + 0 + 3 + 1
    ids = np.arange(len(ref))[::-1].copy()
    out = np.empty((len(ref), w), dtype=np.int64)
    ws.read(ids, out)
    assert out.tolist() == [ref[i] for i in ids]


@pytest.mark.parametrize("n", [*range(1, 70), 127, 128, 129, 1000, 4097])
def test_permutation_is_a_bijection(n: int):
    for key in (0, 12345):
        p = IndexPermutation(n, key)(np.arange(n))
        assert sorted(p.tolist()) == list(range(n))


def test_block_counts_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 6))
        w = rng.random(k) * (rng.random(k) < 0.7)
        if w.sum() == 0:
            w[0] = 0.5
        block = int(rng.integers(1, 50))
        c = block_counts(list(w), block)
        assert c.sum() == block and (c >= 0).all()
        assert (c[w == 0] == 0).all()  # a zero weight never gets a sample
        exact = w / w.sum() * block
        assert np.all(np.abs(c - exact) < 1)  # largest remainder: within one of the exact share
    assert block_counts([5.0], 7).tolist() == [7]


def test_block_counts_huge_finite_weights():
    """Each weight is finite (the config checks that), but their float sum may overflow to inf: the counts must
    still be [block/2, block/2], not [1, 1] (which made the mixture raise an IndexError at the first batch)."""
    assert block_counts([1e308, 1e308], 10).tolist() == [5, 5]
    src, _ = SourceMixture([1e308, 1e308], 0, block=10)(np.arange(10))
    assert np.bincount(src).tolist() == [5, 5]


def test_mixture_stream_per_source_brute_force():
    """Over whole blocks, source s appears count[s] times per block and its indices are 0, 1, 2, ... in stream
    order (each source is read as its own stream, so every window once per epoch)."""
    mix = SourceMixture([0.5, 0.0, 0.3, 0.2], seed=3, block=20)
    src, idx = mix(np.arange(200))
    for s, c in enumerate(mix.counts):
        assert (src == s).sum() == 10 * c
        assert idx[src == s].tolist() == list(range(10 * c))
    # position by position gives the same as the batch call (no dependence on what else is asked)
    for g in (0, 19, 20, 137):
        assert (mix(np.array([g]))[0][0], mix(np.array([g]))[1][0]) == (src[g], idx[g])


def _shards(folder: Path, prefix: str, sizes: list[int], start: int) -> None:
    nxt = start
    for i, n in enumerate(sizes):
        (folder / f"{prefix}_{i:010d}.bin").write_bytes(raw_shard(list(range(nxt, nxt + n)), "H", 8))
        nxt += n


def test_every_window_once_per_epoch_and_layout_invariant(tmp_path: Path):
    """Single source of 11 windows (w = 4), global batch 6: the first 11 stream positions are a permutation of the
    windows, so are the next 11 (epoch 1, crossing a step); any (world size, micro-batch) layout gives each step
    the same multiset of (position j, window)."""
    _shards(tmp_path, "train_a", [13, 4, 30], 0)  # 3 + 1 + 7 windows
    src = [WindowSet(str(tmp_path), "train_a", 4, None)]
    G, steps = 6, 4

    def step_samples(b: int, W: int) -> list[list[tuple]]:
        per_step: list[list[tuple]] = [[] for _ in range(steps)]
        for r in range(W):
            ds = TrainBatches(src, [1.0], 7, G, b, r, W)
            for k in range(steps * ds.A):
                out = ds[k]
                per_step[k // ds.A] += [tuple(row) for row in out.tolist()]
        return [sorted(s) for s in per_step]

    ref = step_samples(6, 1)
    for b, W in [(1, 1), (2, 1), (3, 2), (1, 3), (1, 6), (2, 3)]:
        assert step_samples(b, W) == ref
    firsts = [row[0] for s in ref for row in sorted(s, key=lambda r: r[-1])]  # stream order: j within step
    all_windows = sorted(list(range(0, 12, 4)) + [13] + list(range(17, 45, 4)))
    assert sorted(firsts[:11]) == all_windows and sorted(firsts[11:22]) == all_windows


def _cfg(**kw) -> SimpleNamespace:
    base = dict(train_prefixes=["train_a"], train_weights=[1.0], tokenizer_path="", num_workers=0,
                val_prefix="val", path="")
    base.update(kw)
    return SimpleNamespace(**base)


def test_more_workers_than_micro_batches(tmp_path: Path):
    """Three workers, a validation pass of two micro-batches and a training run shorter than one prefetch round:
    the batches are those of the single-process loader, in order."""
    _shards(tmp_path, "train_a", [40], 0)
    _shards(tmp_path, "val", [9], 100)
    kw = dict(data_path=str(tmp_path), seq_len=3, local_batch_size=1, dp_rank=0, dp_world_size=1)
    val_loader = build_val_loader(_cfg(num_workers=3), **kw)
    for _ in range(2):  # persistent workers: a second pass gives the same batches again
        val = [b["input"].tolist() for b in val_loader]
        assert val == [[[100, 101, 102, 103]], [[104, 105, 106, 107]]]
    ref = build_train_loader(_cfg(), **kw, global_batch_size=1, seed=0, vocab_size=32000)
    par = build_train_loader(_cfg(num_workers=3), **kw, global_batch_size=1, seed=0, vocab_size=32000)
    it_ref, it_par = iter(ref), iter(par)
    assert [next(it_ref)["input"].tolist() for _ in range(2)] == [next(it_par)["input"].tolist() for _ in range(2)]


def test_embedded_cache_builds_where_file_locks_fail(tmp_path: Path, monkeypatch):
    """On file systems without flock (Lustre/NFS mounts answer ENOSYS/ENOLCK/EOPNOTSUPP) the cache is still built
    (the rename of a complete temporary folder keeps concurrent builders safe), not a traceback."""
    corpus = tmp_path / "corpus"
    (corpus / "train").mkdir(parents=True)
    (corpus / "train" / "a.txt").write_text("hello")
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tok")
    monkeypatch.setenv("DLM_TITAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(embedded_mod, "embedded_corpus_dir", lambda: corpus)
    monkeypatch.setattr(embedded_mod, "resolve_tokenizer_path", lambda p: str(tok))

    def fake_prepare(src, tokenizer, dest, split, **kw):
        (Path(dest) / f"{split}_0000000000.bin").write_bytes(GOOD)

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(embedded_mod, "prepare_split", fake_prepare)
    monkeypatch.setattr(embedded_mod.fcntl, "flock", no_flock)
    final = embedded_mod.prepare_embedded("")
    assert (final / "train_0000000000.bin").read_bytes() == GOOD
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == [final.name]


def test_unreadable_shard_is_a_one_line_error(tmp_path: Path):
    """A path that can not be read as a file (a folder here; a file without read permission likewise) is a
    ShardError naming it, not an OSError traceback."""
    path = tmp_path / "train_x_0000000000.bin"
    path.mkdir()
    with pytest.raises(ShardError, match="can not be read") as info:
        read_header(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_positive_weight_too_small_to_be_sampled_is_refused():
    """A source whose weight rounds to no sample per block would silently never be read: one line naming it."""
    from dlm_titan.data.mixture import BLOCK, SourceMixture
    from dlm_titan.errors import UserError

    with pytest.raises(UserError, match="never be sampled"):
        SourceMixture([1.0, 1.0 / (4 * BLOCK)], seed=0)
    assert list(SourceMixture([1.0, 1.0 / BLOCK], seed=0).counts) == [BLOCK - 1, 1]  # one sample a block: read
