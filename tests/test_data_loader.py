"""Loader: exact reads of hand-made shards, layout invariance, rank disjointness, mixture, exact resume."""

from __future__ import annotations

import multiprocessing.process
import struct
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from dlm_titan.data import build_train_loader, build_val_loader
from dlm_titan.data.loader import TrainBatches, unpack
from dlm_titan.data.permutation import IndexPermutation
from dlm_titan.errors import UserError

SEQ = 7  # windows of 8 tokens
VOCAB = 32000


def hand_shard(path: Path, tokens: np.ndarray, code: int = 8, dtype: str = "<u2") -> None:
    """A shard assembled byte by byte from DESIGN.md, independent of dlm_titan's writer."""
    path.write_bytes(struct.pack("<7sQBQ", b"LITPKDS", 1, code, tokens.size) + tokens.astype(dtype).tobytes())


def make_source(folder: Path, prefix: str, windows_per_file: list[int], base: int, tail: int = 3) -> dict:
    """Shards whose window k starts with token ``base + k`` (its id) followed by pseudo-random tokens, plus a
    ``tail`` of junk tokens per file that no window may include. Returns {window id: expected row}."""
    rng = np.random.default_rng(base)
    expected = {}
    k = 0
    for f, n in enumerate(windows_per_file):
        rows = rng.integers(0, 5000, size=(n, SEQ + 1))
        for r in range(n):
            rows[r, 0] = base + k
            expected[base + k] = rows[r].copy()
            k += 1
        junk = np.full(tail, 31999)
        hand_shard(folder / f"{prefix}_{f:010d}.bin", np.concatenate([rows.reshape(-1), junk]))
    return expected


def cfg(**kw) -> SimpleNamespace:
    base = dict(path="", train_prefixes=["train_slim"], train_weights=[1.0], val_prefix="validation",
                tokenizer_path="", num_workers=0)
    base.update(kw)
    return SimpleNamespace(**base)


def loader(path: Path, c: SimpleNamespace, b: int, G: int, rank: int = 0, W: int = 1, seed: int = 5):
    return build_train_loader(c, data_path=str(path), seq_len=SEQ, local_batch_size=b, global_batch_size=G,
                              dp_rank=rank, dp_world_size=W, seed=seed, vocab_size=VOCAB)


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, dict]:
    expected = make_source(tmp_path, "train_slimpajama_0", [13, 7, 20], base=10000)  # 40 windows
    return tmp_path, expected


@pytest.fixture
def process_starts(monkeypatch) -> list:
    """Every process started during the test (loader workers included), in order."""
    started = []
    start = multiprocessing.process.BaseProcess.start

    def recorded(process):
        started.append(process)
        start(process)

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", recorded)
    return started


def stop_workers(it) -> None:
    """Ends an iteration's persistent workers now (left to garbage collection, each join waits out 5 s)."""
    if getattr(it, "it", None) is not None and hasattr(it.it, "_shutdown_workers"):
        it.it._shutdown_workers()


def test_hand_made_shards_read_back_exactly(data):
    path, expected = data
    batches = take(iter(loader(path, cfg(), b=4, G=8)), 10)  # 40 samples = exactly one epoch
    seen = []
    for batch in batches:
        assert batch["input"].dtype.is_floating_point is False and batch["input"].shape == (4, SEQ + 1)
        for row in batch["input"].numpy():
            np.testing.assert_array_equal(row, expected[int(row[0])])  # exact tokens, no junk tail
            seen.append(int(row[0]))
    assert sorted(seen) == sorted(expected)  # one epoch visits every window exactly once


def test_epochs_wrap_with_new_permutation(data):
    path, expected = data
    rows = [int(r[0]) for batch in take(iter(loader(path, cfg(), b=4, G=8)), 20) for r in batch["input"]]
    first, second = rows[:40], rows[40:]
    assert sorted(first) == sorted(second) == sorted(expected)
    assert first != second


def _steps(path: Path, W: int, b: int, G: int, steps: int, c=None) -> list[list[tuple[int, int]]]:
    """Per step: the sorted (position, window id) pairs of all ranks' micro-batches; also checks disjointness."""
    A = G // (b * W)
    per_step: list[list[tuple[int, int]]] = [[] for _ in range(steps)]
    for rank in range(W):
        it = iter(loader(path, c or cfg(), b=b, G=G, rank=rank, W=W))
        for s in range(steps):
            for _ in range(A):
                batch = next(it)
                per_step[s] += zip(batch["position"].tolist(), batch["input"][:, 0].tolist(), strict=True)
    for pairs in per_step:
        assert sorted(p for p, _ in pairs) == list(range(G))  # ranks disjoint, together the whole batch
    return [sorted(p) for p in per_step]


def test_union_of_rank_batches_is_layout_invariant(data):
    path, expected = data
    ref = _steps(path, W=1, b=2, G=8, steps=7)
    assert _steps(path, W=2, b=2, G=8, steps=7) == ref
    assert _steps(path, W=4, b=2, G=8, steps=7) == ref
    assert _steps(path, W=2, b=4, G=8, steps=7) == ref  # also invariant to the micro-batch size
    # ranks are disjoint and the first 40 samples (5 steps) cover the epoch exactly once
    first_epoch = [w for step in ref[:5] for _, w in step]
    assert sorted(first_epoch) == sorted(expected)


def test_mixture_frequencies_and_per_source_epochs(tmp_path: Path):
    slim = make_source(tmp_path, "train_slimpajama_0", [50, 50], base=10000)
    star = make_source(tmp_path, "train_starcoder_0", [30], base=20000)
    c = cfg(train_prefixes=["train_slim", "train_star"], train_weights=[0.7, 0.3])
    ds = loader(tmp_path, c, b=100, G=100).dataset
    ids = np.concatenate([unpack(ds[k])["input"][:, 0].numpy() for k in range(100)])  # 10,000 samples
    frac_star = np.mean(ids >= 20000)
    assert abs(frac_star - 0.3) < 0.01 and abs((1 - frac_star) - 0.7) < 0.01
    # each source is read as its own epoch-wise stream: the first 30 star samples are all 30 star windows
    star_ids = ids[ids >= 20000]
    assert sorted(star_ids[:30].tolist()) == sorted(star) and sorted(star_ids[30:60].tolist()) == sorted(star)
    slim_ids = ids[ids < 20000]
    assert sorted(slim_ids[:100].tolist()) == sorted(slim)
    # the mixture is position-keyed: another layout of the same stream gives the same samples
    ds2 = loader(tmp_path, c, b=25, G=100, rank=1, W=2).dataset
    np.testing.assert_array_equal(unpack(ds2[0])["input"].numpy(), unpack(ds[0])["input"][50:75].numpy())


def test_three_way_mixture_within_one_percent(tmp_path: Path):
    for s, base in enumerate((10000, 20000, 30000)):
        make_source(tmp_path, f"src{s}_x", [40], base=base)
    c = cfg(train_prefixes=["src0", "src1", "src2"], train_weights=[5.0, 3.0, 2.0])
    ds = loader(tmp_path, c, b=250, G=250, seed=11).dataset
    ids = np.concatenate([unpack(ds[k])["input"][:, 0].numpy() for k in range(40)])
    counts = Counter((ids // 10000).tolist())
    for src, w in ((1, 0.5), (2, 0.3), (3, 0.2)):
        assert abs(counts[src] / ids.size - w) < 0.01


def test_zero_weight_prefix_needs_no_files(data):
    path, _ = data
    c = cfg(train_prefixes=["train_slim", "train_star"], train_weights=[1.0, 0.0])
    batch = next(iter(loader(path, c, b=2, G=2)))
    assert batch["input"][:, 0].max() < 20000


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_exact(data, workers, process_starts):
    path, _ = data
    c = cfg(num_workers=workers)
    ref = take(iter(loader(path, c, b=2, G=8, rank=1, W=2)), 30)  # 60 samples: crosses the epoch boundary
    first = loader(path, c, b=2, G=8, rank=1, W=2)
    it = iter(first)
    head = take(it, 11)
    state = first.state_dict()
    take(it, 3)  # the interrupted run went on after the checkpoint
    stop_workers(it)
    resumed = loader(path, c, b=2, G=8, rank=1, W=2)
    started = len(process_starts)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # before the first batch the state is the loaded one
    resumed_it = iter(resumed)
    assert len(process_starts) == started  # loading, reading the state and iter() start no worker
    tail = take(resumed_it, 19)
    assert len(process_starts) == started + workers  # the workers start with the first batch
    stop_workers(resumed_it)
    for got, want in zip(head + tail, ref, strict=True):
        assert got["input"].equal(want["input"]) and got["position"].equal(want["position"])


def test_reposition_starts_no_worker_and_continues_the_stream(data, process_starts):
    """A state saved by 2 ranks without workers, repositioned for 1 rank with 2 workers: no process starts until
    the first batch, and the batches are those of an uninterrupted 1-rank loader (independent reference)."""
    path, _ = data
    old = loader(path, cfg(), b=2, G=8, rank=0, W=2)
    take(iter(old), 3 * 2)  # 3 steps x 2 micro-batches per rank
    saved = old.state_dict()
    straight = iter(loader(path, cfg(), b=2, G=8))
    take(straight, 3 * 4)  # 1 rank: 4 micro-batches per step
    want = take(straight, 9)  # steps 4 to 6 and one more: crosses the epoch boundary (5 steps = 40 windows)
    assert not process_starts
    new = loader(path, cfg(num_workers=2), b=2, G=8)
    state = new.reposition(saved, step=3)
    assert not process_starts and new._iterator is None
    new.load_state_dict(state)
    assert new.state_dict() == state
    it = iter(new)
    assert not process_starts
    got = take(it, 9)
    assert len(process_starts) == 2
    stop_workers(it)
    for g, w in zip(got, want, strict=True):
        assert g["input"].equal(w["input"]) and g["position"].equal(w["position"])


@pytest.mark.parametrize("workers", [1, 2])
def test_fresh_state_is_torchdatas_own_without_a_fork(data, workers, process_starts):
    """The state of a loader not yet iterated equals the one torchdata reports after starting the workers
    (independent reference: StatefulDataLoader.state_dict), bar the random base seed; the first iteration then
    runs with the reported state."""
    path, _ = data
    ours = loader(path, cfg(num_workers=workers), b=2, G=8)
    state = ours.state_dict()
    assert not process_starts
    theirs = loader(path, cfg(num_workers=workers), b=2, G=8)
    reference = StatefulDataLoader.state_dict(theirs)  # makes the iterator: starts the workers
    assert len(process_starts) == workers
    theirs._iterator._shutdown_workers()
    seeds = [s["_snapshot"]["_main_snapshot"].pop("_base_seed") for s in (state["loader"], reference)]
    assert all(isinstance(seed, int) for seed in seeds)
    assert state["loader"] == reference
    it = iter(ours)
    next(it)
    assert ours.state_dict()["loader"]["_snapshot"]["_main_snapshot"]["_base_seed"] == seeds[0]
    stop_workers(it)


def test_workers_do_not_change_the_sequence(data):
    path, _ = data
    a = take(iter(loader(path, cfg(num_workers=0), b=2, G=4)), 9)
    b = take(iter(loader(path, cfg(num_workers=2), b=2, G=4)), 9)
    assert all(x["input"].equal(y["input"]) for x, y in zip(a, b, strict=True))


def test_resume_under_another_layout_is_refused(data):
    path, _ = data
    state = loader(path, cfg(), b=2, G=8).state_dict()
    with pytest.raises(UserError, match="global_batch_size=8"):
        loader(path, cfg(), b=2, G=16).load_state_dict(state)


def test_global_batch_must_divide(data):
    path, _ = data
    with pytest.raises(UserError, match="training.global_batch_size=10 .* set training.global_batch_size to 8"):
        loader(path, cfg(), b=2, G=10, W=2)


def test_validation_ids_are_checked_when_the_loader_is_built(tmp_path: Path):
    """A bad token id in a later validation shard is refused at build time (training start), not at the first
    validation."""
    make_source(tmp_path, "validation_slimpajama_0", [3, 3], base=100)
    tokens = np.frombuffer((tmp_path / "validation_slimpajama_0_0000000001.bin").read_bytes()[24:], dtype="<u2").copy()
    tokens[5] = 40000
    hand_shard(tmp_path / "validation_slimpajama_0_0000000001.bin", tokens)
    with pytest.raises(UserError, match="validation_slimpajama_0_0000000001.bin holds token id 40000"):
        build_val_loader(cfg(), data_path=str(tmp_path), seq_len=SEQ, local_batch_size=1, dp_rank=0,
                         dp_world_size=1, vocab_size=VOCAB)


def test_validation_split_across_ranks(tmp_path: Path):
    expected = make_source(tmp_path, "validation_slimpajama_0", [9, 14], base=10000)  # 23 windows
    ordered = [expected[10000 + k] for k in range(23)]
    seen = {}
    for rank in range(2):
        val = build_val_loader(cfg(), data_path=str(tmp_path), seq_len=SEQ, local_batch_size=5, dp_rank=rank,
                               dp_world_size=2)
        for _ in range(2):  # a second pass repeats the first
            batches = list(val)
            assert len(batches) == 2  # 23 // (5*2) batches per rank; 3 windows dropped
            for batch in batches:
                for pos, row in zip(batch["position"].tolist(), batch["input"].numpy(), strict=True):
                    np.testing.assert_array_equal(row, ordered[pos])
                    seen.setdefault(pos, rank)
                    assert seen[pos] == rank
    assert sorted(seen) == list(range(20))


def test_feistel_is_a_permutation():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        values = IndexPermutation(n, key=123)(np.arange(n))
        assert sorted(values.tolist()) == list(range(n))
    a, b = IndexPermutation(1000, 1)(np.arange(1000)), IndexPermutation(1000, 2)(np.arange(1000))
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9


def test_microbatch_positions_follow_design():
    ds = TrainBatches.__new__(TrainBatches)
    ds.G, ds.b, ds.A, ds.rank = 16, 2, 2, 1  # W = 4
    j, g = ds.positions(5)  # step 2, slot 1: j = r*A*b + m*b + [0, b)
    assert j.tolist() == [1 * 2 * 2 + 1 * 2, 1 * 2 * 2 + 1 * 2 + 1] and g.tolist() == [32 + 6, 32 + 7]
