"""Tokenize a text corpus into LITPKDS shards: the one engine of scripts/prepare_corpus, prepare_slim_pajama,
prepare_starcoder and the embedded corpus.

Each input file is its own output stream ``{prefix}_{stream:06d}_{n:010d}.bin`` (TinyLlama names the stream
after its worker process instead), where ``stream`` is the file's index in the sorted input list. So the output
bytes do not depend on how many worker processes run, and a re-run can skip inputs already done. Each stream's
last chunk is written with its true length in the header (TinyLlama drops it, or pads it with BOS). ``prefix``
is ``{split}_{corpus}`` for SlimPajama and StarCoder (``train_slimpajama``), the caller's for general corpora.

Documents are ``tokens + EOS`` (lit-gpt's ``encode(bos=False, eos=True)``); which files are read and how is
:mod:`.readers`'s business. A manifest ``{prefix}_manifest.json`` beside the shards records per input its
documents, tokens, shards and per-set counts, plus the tokenizer's sha256 and the settings; an input is
recorded only once all its shards are written, and an input that fails leaves no shard behind.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write_text

from .readers import SLIMPAJAMA, STARCODER, Corpus, find_inputs, general_corpus, iter_documents
from .shards import ShardError, dtype_for_vocab, read_header, write_shard
from .tokenizer import Tokenizer, resolve_tokenizer_path, tokenizer_fingerprint

__all__ = ["SLIMPAJAMA", "STARCODER", "Corpus", "general_corpus", "prepare_split"]

DEFAULT_CHUNK_SIZE = 2049 * 1024
GITHUB_SET = "RedPajamaGithub"
_BATCH_CHARS = 1 << 21  # text per tokenizer call
_BATCH_DOCS = 1024


class ShardWriter:
    """Packs token arrays into ``{prefix}_{n:010d}.bin`` chunks; the last chunk keeps its true length."""

    def __init__(self, folder: Path, prefix: str, chunk_size: int, dtype: np.dtype):
        self.folder, self.prefix, self.dtype = folder, prefix, dtype
        self.buffer = np.empty(chunk_size, dtype=dtype)
        self.fill = 0
        self.files: list[str] = []

    def _flush(self) -> None:
        name = f"{self.prefix}_{len(self.files):010d}.bin"
        write_shard(self.folder / name, self.buffer[: self.fill])
        self.files.append(name)
        self.fill = 0

    def add(self, tokens: np.ndarray) -> None:
        while tokens.size:
            n = min(tokens.size, self.buffer.size - self.fill)
            self.buffer[self.fill : self.fill + n] = tokens[:n]
            self.fill += n
            tokens = tokens[n:]
            if self.fill == self.buffer.size:
                self._flush()

    def close(self) -> list[str]:
        if self.fill:
            self._flush()
        return self.files

    def discard(self) -> None:
        """Removes every file of this stream, finished shards and temporary files alike."""
        remove_stream(self.folder, self.prefix)


def remove_stream(folder: Path, stream_prefix: str) -> None:
    """Deletes a stream's shards and temporary files (the loader would read a stray shard as data)."""
    for path in itertools.chain(folder.glob(f"{stream_prefix}_*.bin"), folder.glob(f"{stream_prefix}_*.tmp")):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class InputJob:
    """One input file to tokenize into its own stream of shards."""

    path: str
    relpath: str
    stream: int
    destination: str
    prefix: str
    tokenizer_path: str
    chunk_size: int
    corpus: Corpus
    skip_github: bool


_TOKENIZERS: dict[tuple[str, int], Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    """The tokenizer of ``path``, loaded once per process (and per version of the file)."""
    key = (path, os.stat(path).st_mtime_ns)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = Tokenizer(path)
    return _TOKENIZERS[key]


def _batches(docs: Iterator[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    batch: list[tuple[str, str]] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[0])
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def process_input(job: InputJob, progress: Callable[[int, int], None]) -> dict:
    """Tokenize one input file into shards; return its manifest entry. ``progress(docs, tokens)`` is called
    after each batch. On any error the stream's shards written so far are removed before it propagates."""
    tok = _tokenizer(job.tokenizer_path)
    folder = Path(job.destination)
    stream_prefix = f"{job.prefix}_{job.stream:06d}"
    remove_stream(folder, stream_prefix)  # left by an interrupted run: this input was not recorded as done
    writer = ShardWriter(folder, stream_prefix, job.chunk_size, dtype_for_vocab(tok.vocab_size))
    try:
        entry = _tokenize_input(job, tok, writer, progress)
    except BaseException:  # also Ctrl-C: a stream cut short must not be read as data
        writer.discard()
        raise
    return {"stream": job.stream, **entry}


def _tokenize_input(job: InputJob, tok: Tokenizer, writer: ShardWriter,
                    progress: Callable[[int, int], None]) -> dict:
    sets: dict[str, dict[str, int]] = {}
    docs = tokens = skipped = 0
    for batch in _batches(iter_documents(Path(job.path), job.corpus)):
        if job.skip_github:
            kept = [d for d in batch if d[1] != GITHUB_SET]
            skipped += len(batch) - len(kept)
            batch = kept
        if not batch:
            continue
        ids = tok.encode_batch([text for text, _ in batch], bos=False, eos=True, num_threads=_THREADS)
        lengths = [len(x) for x in ids]
        n = sum(lengths)
        writer.add(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=n).astype(writer.dtype))
        for (_, subset), length in zip(batch, lengths, strict=True):
            entry = sets.setdefault(subset or "unlabelled", {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += length
        docs += len(batch)
        tokens += n
        progress(len(batch), n)
    return {"documents": docs, "tokens": tokens, "skipped_documents": skipped, "sets": sets,
            "shards": writer.close()}


# Worker-process side of the parallel run: progress goes through shared counters, and each worker encodes
# on one thread (in a single process, SentencePiece uses every core).
_COUNTERS: tuple | None = None
_THREADS = -1
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(counters: tuple, parent: int) -> None:
    global _COUNTERS, _THREADS
    _COUNTERS, _THREADS = counters, 1
    _die_with_parent(parent)


def _die_with_parent(parent: int) -> None:
    """Ends this worker when the preparing process ``parent`` dies (SIGKILL, the OOM killer). An orphaned worker
    would go on writing shards that nothing records, then wait forever for work; Linux only (elsewhere a no-op)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


def _add_progress(docs: int, tokens: int) -> None:
    assert _COUNTERS is not None
    with _COUNTERS[0].get_lock():
        _COUNTERS[0].value += docs
    with _COUNTERS[1].get_lock():
        _COUNTERS[1].value += tokens


def _run_job(job: InputJob) -> tuple[str, dict]:
    return job.relpath, process_input(job, _add_progress)


def _load_manifest(path: Path, settings: dict) -> dict:
    if not path.exists():
        return {**settings, "inputs": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("inputs"), dict):
            raise ValueError("not a JSON object with an object of inputs")
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{path} is not a valid manifest ({e}); delete it and the shards beside it, or choose a "
                        "new --destination_path") from None
    if not manifest.get("inputs"):  # nothing was made with the recorded settings (a first run that failed)
        return {**settings, "inputs": {}}
    for key, value in settings.items():
        if manifest.get(key) != value:
            raise UserError(f"{path.parent} already holds shards made with another {key} ({manifest.get(key)} "
                            f"vs {value}); choose a new --destination_path or delete {path.name} and its shards")
    return manifest


def _write_manifest(path: Path, manifest: dict) -> None:
    inputs = manifest["inputs"]
    totals = {"inputs": len(inputs), "documents": 0, "tokens": 0, "skipped_documents": 0, "shards": 0}
    sets: dict[str, dict[str, int]] = {}
    for entry in inputs.values():
        for key in ("documents", "tokens", "skipped_documents"):
            totals[key] += entry[key]
        totals["shards"] += len(entry["shards"])
        for name, counts in entry["sets"].items():
            agg = sets.setdefault(name, {"documents": 0, "tokens": 0})
            agg["documents"] += counts["documents"]
            agg["tokens"] += counts["tokens"]
    manifest = {**manifest, "totals": totals, "sets": sets}
    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _is_done(entry: dict | None, destination: Path) -> bool:
    """An input recorded in the manifest whose shards are all still there and intact."""
    if entry is None:
        return False
    try:
        for name in entry["shards"]:
            read_header(destination / name)
    except (OSError, ShardError):
        return False
    return True


def prepare_split(source_path: str, tokenizer_path: str, destination_path: str, split: str,
                  percentage: float = 1.0, chunk_size: int = DEFAULT_CHUNK_SIZE, num_workers: int = 1,
                  skip_github: bool = False, corpus: Corpus = SLIMPAJAMA, show_progress: bool | None = None,
                  prefix: str = "") -> dict:
    """Tokenize ``split`` of a corpus into shards under ``destination_path``; return the manifest.

    Args:
        source_path: corpus folder (``{split}/chunk*/*.jsonl.zst``, a folder of input files or a ``datasets``
            folder), a glob of input files, or one file (see :func:`.readers.find_inputs`).
        tokenizer_path: SentencePiece ``.model``, HF ``tokenizer.json`` or a folder of either ("" = embedded).
        destination_path: output folder (created).
        split: the source's split ("train", "validation", ...); names the outputs when ``prefix`` is "".
        percentage: fraction of the sorted input files to use (TinyLlama's option), rounded up to >= 1 file.
        chunk_size: tokens per shard (the last shard of each input may be shorter).
        num_workers: processes; the output does not depend on it.
        skip_github: drop documents of the RedPajamaGithub set, as TinyLlama does (SlimPajama only).
        corpus: SLIMPAJAMA, STARCODER or a :func:`.readers.general_corpus`.
        show_progress: tqdm bar; None = only on a terminal.
        prefix: output name prefix (shards ``{prefix}_*.bin``, ``{prefix}_manifest.json``); "" =
            ``{split}_{corpus.name}``.
    """
    _check_options(percentage, chunk_size, num_workers, prefix)
    tokenizer_path = resolve_tokenizer_path(tokenizer_path)
    _tokenizer(tokenizer_path).require_eos()  # before anything is written
    root, files = find_inputs(source_path, split, corpus)
    destination = Path(destination_path)
    if destination.exists() and not destination.is_dir():
        raise UserError(f"--destination_path {destination} is a file; pass a folder for the shards")
    destination.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer_path)
    settings = {"format": "LITPKDS", "version": 1, **corpus.settings(), "split": split, "tokenizer": fingerprint,
                "chunk_size": chunk_size, "dtype": dtype_for_vocab(fingerprint["vocab_size"]).name,
                "skip_github": skip_github}
    prefix = prefix or f"{split}_{corpus.name}"
    manifest_path = destination / f"{prefix}_manifest.json"
    manifest = _load_manifest(manifest_path, settings)
    _check_streams(manifest["inputs"], files, root, destination)
    selected = files[: math.ceil(len(files) * percentage)]
    jobs = [
        InputJob(str(root / rel), rel, stream, str(destination), prefix, tokenizer_path, chunk_size, corpus,
                 skip_github)
        for stream, rel in enumerate(selected)
        if not _is_done(manifest["inputs"].get(rel), destination)
    ]
    # On disk before any shard: training refuses the shards of a stream it does not record, so shards left by a
    # run killed before its first periodic manifest write (SIGKILL, the OOM killer, a lost node) are not read as data.
    _write_manifest(manifest_path, manifest)
    bar = tqdm(unit="tok", unit_scale=True, desc=f"{prefix} ({len(jobs)}/{len(selected)} files to do)",
               disable=False if show_progress else None if show_progress is None else True)
    _run_jobs(jobs, num_workers, bar, manifest, manifest_path)
    return json.loads(manifest_path.read_text())


def _check_options(percentage: float, chunk_size: int, num_workers: int, prefix: str) -> None:
    if not 0.0 < percentage <= 1.0:
        raise UserError(f"--percentage {percentage} must be in (0, 1]")
    if chunk_size < 1:
        raise UserError(f"--chunk_size {chunk_size} must be positive")
    if num_workers < 1:
        raise UserError(f"--num_workers {num_workers} must be >= 1")
    if prefix and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", prefix):
        raise UserError(f"--prefix {prefix!r} must be a file-name part of letters, digits, '_', '.', '-' (e.g. "
                        "train_slim), matched by data.train_prefixes")


def _check_streams(done: dict, files: list[str], root: Path, destination: Path) -> None:
    """UserError if an input recorded in the manifest now sorts at another position (its stream index), or if
    another file now sorts at the position of a recorded input that is gone (it would overwrite that input's
    shards, which the manifest would still count as the gone input's)."""
    stream_of = {rel: i for i, rel in enumerate(files)}
    for rel, entry in done.items():
        now = stream_of.get(rel, entry["stream"])
        if now != entry["stream"] or (rel not in stream_of and now < len(files)):
            was = f"now {now}" if rel in stream_of else f"now {files[now]} is input {now}, {rel} is gone"
            raise UserError(f"the input files under {root} changed since the shards in {destination} were made "
                            f"({rel} was input {entry['stream']}, {was}); use a new --destination_path")


def _run_jobs(jobs: list[InputJob], num_workers: int, bar: tqdm, manifest: dict, manifest_path: Path) -> None:
    """Runs the jobs, recording each finished input in the manifest (written every 30 s and at the end)."""
    last_write = time.monotonic()

    def on_done(relpath: str, entry: dict) -> None:
        nonlocal last_write
        manifest["inputs"][relpath] = entry
        # SlimPajama has ~60k inputs: rewrite the manifest every 30 s, not after each one
        if time.monotonic() - last_write > 30:
            _write_manifest(manifest_path, manifest)
            last_write = time.monotonic()

    try:
        if num_workers == 1 or len(jobs) <= 1:
            _run_serial(jobs, bar, on_done)
        else:
            _run_parallel(jobs, num_workers, bar, on_done)
    finally:  # also on an error or Ctrl-C, so a re-run skips the inputs finished so far
        bar.close()
        _write_manifest(manifest_path, manifest)
        for job in jobs:  # the pool's workers are gone: remove what the unfinished ones (killed or not) wrote
            if job.relpath not in manifest["inputs"]:
                remove_stream(Path(job.destination), f"{job.prefix}_{job.stream:06d}")


def _run_serial(jobs: list[InputJob], bar: tqdm, on_done: Callable[[str, dict], None]) -> None:
    docs_seen = 0

    def progress(d: int, t: int) -> None:
        nonlocal docs_seen
        docs_seen += d
        bar.update(t)
        bar.set_postfix(docs=docs_seen, refresh=False)

    for job in jobs:
        on_done(job.relpath, process_input(job, progress))


def _run_parallel(jobs: list[InputJob], num_workers: int, bar: tqdm,
                  on_done: Callable[[str, dict], None]) -> None:
    # spawn, not fork: forking a process that runs threads (tokenizers' pools, pytest's, tqdm's monitor) can copy a
    # lock held by another thread into the child, which then hangs on it. An executor, not mp.Pool: a worker that
    # dies (SIGKILL by the OOM killer) fails its futures with BrokenProcessPool, where Pool would wait forever.
    ctx = mp.get_context("spawn")
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    others = set(mp.active_children())  # children this process had before the pool's: not the pool's to stop
    pool = ProcessPoolExecutor(min(num_workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                               initargs=(counters, os.getpid()))
    recorded = 0

    def record(relpath: str, entry: dict) -> None:
        nonlocal recorded
        on_done(relpath, entry)
        recorded += 1

    finished = False
    try:
        with _ctrl_c_ignored():  # the workers start here (on submit) and inherit it
            futures = [pool.submit(_run_job, job) for job in jobs]
        _collect(futures, bar, counters, record)
        finished = True
    except BrokenProcessPool:
        raise UserError(f"a worker process died (killed from outside, most likely by the out-of-memory killer) with "
                        f"{len(jobs) - recorded} of {len(jobs)} inputs to do unfinished; run again with fewer "
                        "--num_workers or more memory: the re-run skips the inputs finished so far") from None
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:  # an error or Ctrl-C: stop the workers before the caller removes the streams they were writing
            _stop_workers(pool, others)


@contextmanager
def _ctrl_c_ignored() -> Iterator[None]:
    """SIGINT ignored while worker processes start, so that they run with it ignored, their start-up imports
    included: Ctrl-C reaches the whole process group, and it is the parent's to handle (it stops the workers and
    removes what they wrote); a worker's own KeyboardInterrupt would only add its traceback. Ctrl-C pressed during
    the few milliseconds of starting them is lost. Outside the main thread, signals can not be changed: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _collect(pending: list[Future], bar: tqdm, counters: tuple, on_done: Callable[[str, dict], None]) -> None:
    """Hands each finished job's entry to ``on_done`` (in job order within a poll) and updates the bar."""
    reported = 0
    while pending:
        wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        still, error = [], None
        for future in pending:
            if not future.done():
                still.append(future)
                continue
            try:
                on_done(*future.result())  # re-raises a worker's UserError here
            except (UserError, BrokenProcessPool) as e:  # record every other finished input before stopping
                error = error or e
        if error is not None:
            raise error
        pending = still
        bar.update(counters[1].value - reported)
        reported = counters[1].value
        bar.set_postfix(docs=counters[0].value, refresh=False)


def _stop_workers(pool: ProcessPoolExecutor, others: set[mp.process.BaseProcess]) -> None:
    """Cancels the queued jobs and terminates and joins the worker processes (Pool.terminate's job; the
    executor's own shutdown would wait for the running jobs to finish, and it names its processes only in private
    attributes). The workers are this process's live children that ``others`` (taken before the pool started)
    does not hold: the executor starts them with ``mp_context.Process``, which ``active_children`` lists."""
    processes = [p for p in mp.active_children() if p not in others]
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join()
