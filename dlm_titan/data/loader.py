"""Train and validation loaders: torchdata ``StatefulDataLoader`` over a map of micro-batch index -> batch.

Sample assignment (DESIGN.md "Layout invariance"). With ``A = G // (b * W)`` micro-batches per rank per step,
rank ``r``'s micro-batch ``k`` belongs to step ``s = k // A`` and slot ``m = k % A``; it holds the global
batch entries ``j = r*A*b + m*b + [0, b)`` of step ``s``, i.e. stream positions ``g = s*G + j``. The union of
the ranks' micro-batches of a step is therefore the same ``G`` samples for any ``W``. ``"position"`` is ``j``,
the key of the sample's noise.

Stream position ``g`` -> sample: a :class:`SourceMixture` picks the source and the index ``q`` within it (single
source: ``q = g``); epoch ``e = q // N`` and window ``perm_e(q % N)`` with ``perm_e`` a permutation seeded by
``(seed, prefix, e)``. Every micro-batch is a pure function of ``k``, so the loader's whole state is the next
``k``: the sampler yields ``k, k+1, ...``, workers get them round-robin, and StatefulDataLoader's in-order
delivery plus its sampler snapshot restore the exact next micro-batch in O(1). (torchdata restores per-worker
snapshots, so a resume needs the same ``data.num_workers``; the saved layout is checked.) Reading, loading or
repositioning that state starts no worker process: the workers start at the first ``next`` of an iteration.
"""

from __future__ import annotations

import copy
import sys
import warnings
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchdata.stateful_dataloader import Stateful, StatefulDataLoader
from torchdata.stateful_dataloader.stateful_dataloader import _StatefulSingleProcessDataLoaderIter

from dlm_titan.errors import UserError

from .identity import check_preparation_complete
from .mixture import SourceMixture
from .permutation import IndexPermutation, hash_key
from .shards import list_shards
from .tokenizer import check_shard_manifests, check_tokenizer_fits
from .windows import WindowSet


class _CounterIterator(Stateful):
    """Yields ``next, next + 1, ...`` up to ``stop`` (None = forever); its state is ``next``."""

    def __init__(self, start: int, stop: int | None):
        self.next = start
        self.stop = stop

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if self.stop is not None and self.next >= self.stop:
            raise StopIteration
        k = self.next
        self.next += 1
        return k

    def state_dict(self) -> dict[str, int]:
        return {"next": self.next}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.next = int(state_dict["next"])


class CounterSampler(Sampler[int]):
    """Micro-batch indices ``0, 1, ...`` (``stop`` = None: infinite)."""

    def __init__(self, stop: int | None = None):
        self.stop = stop

    def __iter__(self) -> _CounterIterator:
        return _CounterIterator(0, self.stop)

    def __len__(self) -> int:
        if self.stop is None:
            raise TypeError("the training sampler is infinite")
        return self.stop


class TrainBatches(Dataset):
    """Micro-batch ``k`` of one data-parallel rank, as a pure function of ``k``."""

    def __init__(self, sources: list[WindowSet], weights: list[float], seed: int, global_batch_size: int,
                 local_batch_size: int, dp_rank: int, dp_world_size: int):
        self.sources = sources
        self.mixture = SourceMixture(weights, seed) if len(sources) > 1 else None
        self.seed = seed
        self.G, self.b = global_batch_size, local_batch_size
        self.A = micro_batches_per_step(global_batch_size, local_batch_size, dp_world_size)
        self.rank = dp_rank
        self._perm: dict[tuple[int, int], IndexPermutation] = {}

    def _permutation(self, source: int, epoch: int) -> IndexPermutation:
        key = (source, epoch)
        if key not in self._perm:
            if len(self._perm) >= 8:
                self._perm.pop(next(iter(self._perm)))
            src = self.sources[source]
            # keyed by the prefix name, so a source's order does not depend on the other sources
            self._perm[key] = IndexPermutation(src.num_windows, hash_key(self.seed, zlib.crc32(src.prefix.encode()),
                                                                         epoch))
        return self._perm[key]

    def positions(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(entries j within the step's global batch, stream positions g) of micro-batch ``k``."""
        step, m = divmod(k, self.A)
        j = self.rank * self.A * self.b + m * self.b + np.arange(self.b, dtype=np.int64)
        return j, step * self.G + j

    def __getitem__(self, k: int) -> np.ndarray:
        """Micro-batch ``k`` packed as one int64 array ``[b, seq_len + 2]``: the windows, then ``position``.

        One numpy array, not tensors: a worker's tensor travels through a shared-memory file (~1 ms each on a
        small CPU), an array is pickled through the worker's pipe (~0.1 ms for a micro-batch). :func:`unpack`
        turns it into tensors in the training process without a copy.
        """
        j, g = self.positions(k)
        if self.mixture is None:
            source, q = np.zeros_like(g), g
        else:
            source, q = self.mixture(g)
        window = self.sources[0].window
        out = np.empty((self.b, window + 1), dtype=np.int64)
        for s in np.unique(source).tolist():
            sel_s = source == s
            n = self.sources[s].num_windows
            epoch = q[sel_s] // n
            for e in np.unique(epoch).tolist():
                rows = np.flatnonzero(sel_s)[epoch == e]
                ids = self._permutation(s, e)(q[rows] - e * n)
                block = np.empty((rows.size, window), dtype=np.int64)
                self.sources[s].read(ids, block)
                out[rows, :window] = block
        out[:, window] = j
        return out


class ValBatches(Dataset):
    """Validation micro-batch ``v`` of one rank: windows ``v*b*W + r*b + [0, b)`` in file order (no shuffle)."""

    def __init__(self, source: WindowSet, local_batch_size: int, dp_rank: int, dp_world_size: int):
        self.source = source
        self.b, self.rank, self.W = local_batch_size, dp_rank, dp_world_size
        self.num_batches = source.num_windows // (local_batch_size * dp_world_size)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, v: int) -> np.ndarray:
        """Validation micro-batch ``v``, packed like :meth:`TrainBatches.__getitem__`."""
        g = v * self.b * self.W + self.rank * self.b + np.arange(self.b, dtype=np.int64)
        out = np.empty((self.b, self.source.window + 1), dtype=np.int64)
        self.source.read(g, out[:, :-1])
        out[:, -1] = g
        return out


def unpack(packed: np.ndarray) -> dict[str, torch.Tensor]:
    """``{"input": int64[b, seq_len + 1], "position": int64[b]}`` from a packed micro-batch."""
    packed = torch.from_numpy(packed)
    return {"input": packed[:, :-1].contiguous(), "position": packed[:, -1].contiguous()}


def keep_numpy(batch: np.ndarray) -> np.ndarray:
    """collate_fn that leaves the worker's array as it is (the default would make it a shared-memory tensor)."""
    return batch


class _Unpacked:
    """Iterator over a loader's packed micro-batches, yielding them unpacked.

    The loader's own iterator, whose creation starts the worker processes, is made at the first ``next``, not by
    ``iter(loader)``: workers start when training takes its first batch, not while a checkpoint resume computes
    or restores the loader's position (forking a process that has just run threads, e.g. the checksum
    verification, risks a deadlock in the child). ``it`` is that iterator once made (None before).
    """

    def __init__(self, make_iterator: Callable[[], Any]):
        self._make_iterator = make_iterator
        self.it: Any = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.it is None:
            self.it = self._make_iterator()
        return unpack(next(self.it))


@contextmanager
def _quiet_torchdata():
    """torchdata 0.11 calls torch.set_vital, deprecated in recent torch: a warning users can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        yield


class PackedLoader(StatefulDataLoader):
    """StatefulDataLoader over packed micro-batches that yields them as dicts (see :func:`unpack`)."""

    def __iter__(self) -> _Unpacked:  # type: ignore[override]
        return _Unpacked(super().__iter__)  # called at the first next (see _Unpacked)


class TrainLoader(PackedLoader):
    """The training loader. Its state also records the sample layout, so a resume under a different layout
    (seed, batch sizes, world size, sources, workers) fails with a clear message instead of silently
    reading other samples."""

    def __init__(self, dataset: TrainBatches, num_workers: int, layout: dict[str, Any]):
        with _quiet_torchdata():
            super().__init__(
                dataset,
                batch_size=None,  # the dataset returns whole micro-batches
                collate_fn=keep_numpy,
                sampler=CounterSampler(),
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers > 0 else None,
                snapshot_every_n_steps=1,
            )
        self.layout = layout

    def state_dict(self) -> dict[str, Any]:
        """``{"loader": StatefulDataLoader state, "layout": ...}``, without starting worker processes.

        StatefulDataLoader answers a state asked for before its first iterator exists by making that iterator,
        which forks the workers. Here, before the first iteration the state is the one the first iterator will
        restore: the loaded state, or else the fresh state built in this process (:func:`fresh_worker_state`).
        """
        if self._iterator is not None or self.num_workers == 0:  # an iterator exists, or one needs no process
            loader_state = super().state_dict()
        else:
            if self.next_iter_state is None:  # the first iterator restores this state, so it is the one it will have
                self.next_iter_state = self._fresh_state()
            loader_state = copy.deepcopy(self.next_iter_state)
        return {"loader": loader_state, "layout": dict(self.layout)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_same_layout(state_dict["layout"], self.layout, self.layout)
        super().load_state_dict(state_dict["loader"])

    def reposition(self, saved: dict[str, Any], step: int) -> dict[str, Any]:
        """A state of this loader that starts at ``step``, from a state saved under another data-parallel layout.

        The loader's position is global: micro-batch ``k`` of every rank belongs to step ``k // A`` (``A`` =
        micro-batches per rank per step), and a checkpoint is taken at a step boundary, so the state to resume
        from is this loader's fresh state with its sampler at ``k = step * A``. Sample-defining settings
        (:data:`SAMPLE_KEYS`) must match the saved ones; rank, world size, workers and micro-batch size may differ.
        """
        check_same_layout(saved["layout"], self.layout, SAMPLE_KEYS)
        per_rank = micro_batches_per_step(self.layout["global_batch_size"], self.layout["local_batch_size"],
                                          self.layout["dp_world_size"])
        state = {"loader": self._fresh_state(), "layout": dict(self.layout)}  # starts no worker process
        _set_position(state["loader"], step * per_rank)
        return state

    def _fresh_state(self) -> dict[str, Any]:
        """The StatefulDataLoader state of a new iterator at micro-batch 0, made in this process."""
        if self.num_workers == 0:  # torchdata's single-process iterator starts no process: take its own state
            return _StatefulSingleProcessDataLoaderIter(self).state_dict()
        # drawn as torchdata draws a new iterator's base seed (the loader's generator, else torch's global one)
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
        return fresh_worker_state(self.num_workers, base_seed)


SAMPLE_KEYS = ("seq_len", "global_batch_size", "seed", "train_prefixes", "train_weights")
"""Loader layout settings that define which samples each step trains on (the rest only say who reads them)."""


def check_same_layout(saved: dict[str, Any], layout: dict[str, Any], keys) -> None:
    """Refuses a loader state saved under another layout: UserError naming the first of ``keys`` that differs.

    Lists and tuples compare equal (a checkpoint round trip turns one into the other)."""
    for key in keys:
        old, new = saved.get(key), layout.get(key)
        if (list(old) if isinstance(old, (list, tuple)) else old) != (list(new) if isinstance(new, (list, tuple)) else new):
            raise UserError(f"the data-loader state was saved with {key}={old!r}, this run has {new!r}; resume "
                            "with the same value (or start a new dump_folder)")


def fresh_worker_state(num_workers: int, base_seed: int) -> dict[str, Any]:
    """The state torchdata 0.11's StatefulDataLoader reports for a new iterator over ``num_workers`` > 0 worker
    processes, built without starting them.

    torchdata gathers it from the workers (each sends its initial state once started); for this loader every
    part is known up front: the dataset (:class:`TrainBatches`) and the sampler are not Stateful, so the
    dataset, fetcher and index-sampler states are None; the sampler iterator is at 0; the last yielded worker
    is the last one, so worker 0 gets the next micro-batch. This is the format checkpoints store (DESIGN.md);
    a test compares it with the state torchdata itself reports.
    """
    return {
        "_snapshot": {
            "_snapshot_step": 0,
            "_last_yielded_worker_id": num_workers - 1,
            "_main_snapshot": {
                "_num_workers": num_workers,
                "_sampler_iter_state": {"next": 0},
                "_index_sampler_state": None,
                "_sampler_iter_yielded": 0,
                "_IterableDataset_len_called": None,
                "_shared_seed": None,
                "_base_seed": base_seed,
            },
            "_worker_snapshots": {f"worker_{i}": {"worker_id": i, "fetcher_state": None, "dataset_state": None}
                                  for i in range(num_workers)},
        },
        "_steps_since_snapshot": 0,
        "_iterator_finished": False,
    }


def _set_position(state: dict[str, Any], k: int) -> None:
    """Sets a StatefulDataLoader state (any worker count) to 'k micro-batches yielded, sampler at k'."""
    for key, value in state.items():
        if key == "_sampler_iter_state":
            state[key] = {"next": k}
        elif key in ("_sampler_iter_yielded", "_num_yielded", "_snapshot_step"):
            state[key] = k
        elif isinstance(value, dict):
            _set_position(value, k)


def micro_batches_per_step(global_batch_size: int, local_batch_size: int, dp_world_size: int) -> int:
    """Micro-batches each rank runs per optimizer step, ``G / (b * W)``; UserError unless that is a whole number
    (at least one)."""
    per_step = local_batch_size * dp_world_size
    if global_batch_size < per_step or global_batch_size % per_step:
        fix = max(per_step, global_batch_size // per_step * per_step)
        raise UserError(f"training.global_batch_size={global_batch_size} must be a multiple of local_batch_size x "
                        f"data-parallel ranks = {local_batch_size} x {dp_world_size} = {per_step}; set "
                        f"training.global_batch_size to {fix} (or change local_batch_size)"
                        + _rank_counts_that_fit(global_batch_size, local_batch_size))
    return global_batch_size // per_step


def _rank_counts_that_fit(global_batch_size: int, local_batch_size: int) -> str:
    """The end of the batch-layout error naming the rank counts this global and local batch fit (a resume must
    keep the checkpoint's global_batch_size, so setting it as the error's first fix suggests was refused there,
    while another rank count resumes); empty when none fits."""
    if local_batch_size < 1 or global_batch_size % local_batch_size:
        return ""
    per_rank = global_batch_size // local_batch_size
    counts = [str(n) for n in range(1, per_rank + 1) if per_rank % n == 0][-6:]  # the largest few
    listed = counts[0] if len(counts) == 1 else f"{', '.join(counts[:-1])} or {counts[-1]}"
    return f", or run {listed} data-parallel ranks (a resume must keep the checkpoint's global_batch_size)"


def _check_layout(seq_len: int, local_batch_size: int, global_batch_size: int, dp_rank: int,
                  dp_world_size: int) -> None:
    if seq_len < 1 or local_batch_size < 1 or dp_world_size < 1 or not 0 <= dp_rank < dp_world_size:
        raise UserError(f"bad data layout: seq_len={seq_len}, local_batch_size={local_batch_size}, "
                        f"dp_rank={dp_rank}, dp_world_size={dp_world_size}")
    micro_batches_per_step(global_batch_size, local_batch_size, dp_world_size)


def used_sources(data_cfg) -> list[tuple[str, float]]:
    """(prefix, weight) of the training sources with a positive weight: zero-weight sources are never read, so
    their files need not exist (SMDM required them)."""
    return [(p, float(w)) for p, w in zip(data_cfg.train_prefixes, data_cfg.train_weights, strict=True) if w > 0]


def check_disjoint_sources(sources: list[WindowSet]) -> None:
    """UserError if two training sources select the same shard file (a prefix listed twice, or one prefix that
    begins another: ``train`` also selects ``train_star*.bin``), which would read it under both weights."""
    owner: dict[str, int] = {}
    for s, src in enumerate(sources):
        for info in src.infos:
            other = owner.setdefault(info.path, s)
            if other != s:
                raise UserError(f"data.train_prefixes {sources[other].prefix!r} and {src.prefix!r} both select "
                                f"{info.path} (a prefix selects every {{prefix}}*.bin), so its samples would be drawn "
                                "under both weights; use prefixes that select disjoint shards, e.g. train_slim and "
                                "train_star, each listed once")


def build_train_loader(data_cfg: Any, *, data_path: str, seq_len: int, local_batch_size: int,
                       global_batch_size: int, dp_rank: int, dp_world_size: int, seed: int,
                       vocab_size: int) -> TrainLoader:
    """The infinite, exactly resumable training loader of one data-parallel rank.

    Args:
        data_cfg: the ``data`` config section (uses train_prefixes, train_weights, tokenizer_path, num_workers).
        data_path: folder of shards (see :func:`resolve_data_path`).
        seq_len: model sequence length; samples are ``seq_len + 1`` tokens.
        local_batch_size: sequences per micro-batch ``b``.
        global_batch_size: sequences per optimizer step ``G`` (multiple of ``b * dp_world_size``).
        dp_rank: this rank's data-parallel index; dp_world_size: data-parallel degree ``W``.
        seed: run seed (sample order and source mixture).
        vocab_size: model vocabulary; shard token ids and the tokenizer must fit in it.

    Yields (when iterated) dicts ``{"input": int64[b, seq_len + 1], "position": int64[b]}``.
    """
    # One weight per prefix, finite, >= 0 with a positive sum, num_workers >= 0: checked when the config loads.
    prefixes, weights = list(data_cfg.train_prefixes), [float(w) for w in data_cfg.train_weights]
    _check_layout(seq_len, local_batch_size, global_batch_size, dp_rank, dp_world_size)
    check_tokenizer_fits(data_cfg, vocab_size)
    used = used_sources(data_cfg)
    check_shard_manifests(data_cfg, data_path, vocab_size, [p for p, _ in used])
    check_preparation_complete(data_path, [p for p, _ in used])
    sources = [WindowSet(data_path, p, seq_len + 1, vocab_size) for p, _ in used]
    check_disjoint_sources(sources)
    dataset = TrainBatches(sources, [w for _, w in used], seed, global_batch_size, local_batch_size,
                           dp_rank, dp_world_size)
    layout = {
        "seq_len": seq_len, "local_batch_size": local_batch_size, "global_batch_size": global_batch_size,
        "dp_rank": dp_rank, "dp_world_size": dp_world_size, "seed": seed, "train_prefixes": prefixes,
        "train_weights": weights, "num_workers": int(data_cfg.num_workers),
    }
    return TrainLoader(dataset, int(data_cfg.num_workers), layout)


def _warn_if_trained_on(source: WindowSet, data_cfg: Any, data_path: str) -> None:
    """A warning when validation shards are also training shards (``val_prefix = "train_slim"``, or an empty
    training prefix, which selects every shard): the validation loss then measures text the model trains on. Not
    an error: a smoke test may validate on its training data on purpose."""
    trained = set()
    for prefix, _ in used_sources(data_cfg):
        try:
            trained.update(str(p) for p in list_shards(data_path, prefix))
        except UserError:  # no training shards here (a validation-only folder): nothing shared
            continue
    shared = sorted(str(info.path) for info in source.infos if str(info.path) in trained)
    if shared:
        print(f"warning: {len(shared)} of the {len(source.infos)} validation shards (data.val_prefix "
              f"{data_cfg.val_prefix!r}) are also training shards, e.g. {shared[0]}: the validation loss measures "
              "training data; prepare a separate validation split", file=sys.stderr, flush=True)


def build_val_loader(data_cfg: Any, *, data_path: str, seq_len: int, local_batch_size: int, dp_rank: int,
                     dp_world_size: int, vocab_size: int | None = None) -> PackedLoader:
    """One finite pass over the validation windows (``data.val_prefix``), in file order, split across ranks.

    Every rank gets ``N // (b * W)`` micro-batches (same count on every rank, so collectives stay in step);
    the last ``N % (b * W)`` windows are dropped. ``"position"`` is each window's global index in the
    validation set, so evaluation noise can be keyed by it. Iterating again starts a new pass.
    """
    _check_layout(seq_len, local_batch_size, local_batch_size * dp_world_size, dp_rank, dp_world_size)
    if vocab_size is not None:  # the validation set's tokenizer must be the training sources' (and the configured one)
        prefixes = [data_cfg.val_prefix, *(p for p, _ in used_sources(data_cfg))]
        check_shard_manifests(data_cfg, data_path, vocab_size, prefixes)
    check_preparation_complete(data_path, [data_cfg.val_prefix])
    source = WindowSet(data_path, data_cfg.val_prefix, seq_len + 1, vocab_size)
    if dp_rank == 0:  # one rank reads the set (a bad id stops it; torchrun then ends the others)
        source.check_all_ids()
        _warn_if_trained_on(source, data_cfg, data_path)
    dataset = ValBatches(source, local_batch_size, dp_rank, dp_world_size)
    if len(dataset) == 0:
        raise UserError(f"validation set {data_cfg.val_prefix}*.bin in {data_path} has {source.num_windows} "
                        f"windows of {seq_len + 1} tokens, fewer than local_batch_size x data-parallel ranks = "
                        f"{local_batch_size * dp_world_size}; lower them or prepare more validation data")
    workers = int(data_cfg.num_workers)
    with _quiet_torchdata():
        return PackedLoader(dataset, batch_size=None, collate_fn=keep_numpy, sampler=CounterSampler(len(dataset)),
                            num_workers=workers, persistent_workers=workers > 0)
