"""Tokenize a text corpus into LITPKDS shards (the engine of scripts/prepare_slim_pajama and prepare_starcoder).

Each input file is its own output stream ``{split}_{corpus}_{stream:06d}_{n:010d}.bin`` (TinyLlama names the
stream after its worker process instead), where ``stream`` is the file's index in the sorted input list. So the
output bytes do not depend on how many worker processes run, and a re-run can skip inputs already done. Each
stream's last chunk is written with its true length in the header (TinyLlama drops it, or pads it with BOS).

Documents are ``tokens + EOS`` (lit-gpt's ``encode(bos=False, eos=True)``). Inputs: ``.jsonl`` and
``.jsonl.zst`` (one JSON record per line with a text field), ``.txt`` (the whole file is one document) and, for
code, ``.parquet`` (needs pyarrow). A manifest ``{split}_{corpus}_manifest.json`` beside the shards records per
input its documents, tokens, shards and per-set counts, plus the tokenizer's sha256 and the settings.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from tqdm import tqdm

from dlm_titan.errors import UserError

from .shards import ShardError, dtype_for_vocab, read_header, write_shard
from .tokenizer import Tokenizer, resolve_tokenizer_path, tokenizer_fingerprint

DEFAULT_CHUNK_SIZE = 2049 * 1024
GITHUB_SET = "RedPajamaGithub"
_BATCH_CHARS = 1 << 21  # text per SentencePiece call
_BATCH_DOCS = 1024


@dataclass(frozen=True)
class Corpus:
    """How to read one kind of corpus.

    Attributes:
        name: output name part (``train_slimpajama_...``).
        text_field: JSON/parquet field holding the document.
        set_field: dotted path of the field naming the document's subset, or "" for none.
        extensions: accepted input file endings.
    """

    name: str
    text_field: str
    set_field: str
    extensions: tuple[str, ...]


SLIMPAJAMA = Corpus("slimpajama", "text", "meta.redpajama_set_name", (".jsonl", ".jsonl.zst", ".txt"))
STARCODER = Corpus("starcoder", "content", "", (".parquet", ".jsonl", ".jsonl.zst"))


def find_inputs(source_path: str, split: str, corpus: Corpus) -> tuple[Path, list[str]]:
    """Input files, sorted, relative to the root they are found under.

    The root is ``{source_path}/{split}`` if it exists (SlimPajama's ``{split}/chunk*/*.jsonl.zst`` layout),
    else ``source_path`` itself; files are found recursively.
    """
    source = Path(source_path)
    if not source.is_dir():
        raise UserError(f"source folder {source} does not exist; pass --source_path with the corpus folder")
    root = source / split if (source / split).is_dir() else source
    files = sorted(
        str(p.relative_to(root)) for p in root.rglob("*")
        if p.is_file() and p.name.endswith(corpus.extensions)
    )
    if not files:
        raise UserError(f"source folder {root} holds no {'/'.join(corpus.extensions)} files; pass --source_path "
                        f"with SlimPajama's layout ({split}/chunk*/*.jsonl.zst) or a folder of such files")
    return root, files


def _open_text(path: Path) -> io.TextIOBase:
    raw = open(path, "rb")
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.TextIOWrapper(raw, encoding="utf-8")


def _field(record: dict, dotted: str) -> object:
    value: object = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def iter_documents(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    """(text, set name) of every document of one input file; UserError naming the file when it is not UTF-8
    text or not a readable zstd stream."""
    try:
        yield from _iter_documents(path, corpus)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 or remove "
                        "it") from None
    except zstandard.ZstdError as e:
        raise UserError(f"{path}: not a readable zstd file ({e}); download it again or remove it") from None


def _iter_documents(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    name = path.name
    if name.endswith(".txt"):
        yield path.read_text(encoding="utf-8"), ""
    elif name.endswith(".parquet"):
        yield from _iter_parquet(path, corpus)
    else:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from None
                text = record.get(corpus.text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: record has no string field {corpus.text_field!r}")
                subset = _field(record, corpus.set_field) if corpus.set_field else ""
                yield text, subset if isinstance(subset, str) else ""


def _iter_parquet(path: Path, corpus: Corpus) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the files to "
                        f".jsonl with a {corpus.text_field!r} field") from None
    pf = pq.ParquetFile(path)
    if corpus.text_field not in pf.schema_arrow.names:
        raise UserError(f"{path}: parquet file has no column {corpus.text_field!r}")
    for batch in pf.iter_batches(columns=[corpus.text_field]):
        for text in batch.column(0).to_pylist():
            yield text or "", ""


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


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(path: str) -> Tokenizer:
    if path not in _TOKENIZERS:
        _TOKENIZERS[path] = Tokenizer(path)
    return _TOKENIZERS[path]


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
    after each batch."""
    tok = _tokenizer(job.tokenizer_path)
    folder = Path(job.destination)
    stream_prefix = f"{job.prefix}_{job.stream:06d}"
    for stale in itertools.chain(folder.glob(f"{stream_prefix}_*.bin"), folder.glob(f"{stream_prefix}_*.tmp")):
        stale.unlink()  # left by an interrupted run: this input was not recorded as done
    writer = ShardWriter(folder, stream_prefix, job.chunk_size, dtype_for_vocab(tok.vocab_size))
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
    return {"stream": job.stream, "documents": docs, "tokens": tokens, "skipped_documents": skipped,
            "sets": sets, "shards": writer.close()}


# Worker-process side of the parallel run: progress goes through shared counters, and each worker encodes
# on one thread (in a single process, SentencePiece uses every core).
_COUNTERS: tuple | None = None
_THREADS = -1


def _init_worker(counters: tuple) -> None:
    global _COUNTERS, _THREADS
    _COUNTERS, _THREADS = counters, 1


def _add_progress(docs: int, tokens: int) -> None:
    assert _COUNTERS is not None
    with _COUNTERS[0].get_lock():
        _COUNTERS[0].value += docs
    with _COUNTERS[1].get_lock():
        _COUNTERS[1].value += tokens


def _run_job(job: InputJob) -> tuple[str, dict]:
    return job.relpath, process_input(job, _add_progress)


def _manifest_path(destination: Path, split: str, corpus: Corpus) -> Path:
    return destination / f"{split}_{corpus.name}_manifest.json"


def _load_manifest(path: Path, settings: dict) -> dict:
    if not path.exists():
        return {**settings, "inputs": {}}
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a valid manifest ({e}); delete it and the shards beside it, or choose a "
                        "new --destination_path") from None
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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
                  skip_github: bool = False, corpus: Corpus = SLIMPAJAMA, show_progress: bool | None = None) -> dict:
    """Tokenize ``split`` of a corpus into shards under ``destination_path``; return the manifest.

    Args:
        source_path: corpus folder (``{split}/chunk*/*.jsonl.zst`` or a folder of input files).
        tokenizer_path: SentencePiece model ("" = the embedded tokenizer).
        destination_path: output folder (created).
        split: "train" or "validation" (names the outputs).
        percentage: fraction of the sorted input files to use (TinyLlama's option), rounded up to >= 1 file.
        chunk_size: tokens per shard (the last shard of each input may be shorter).
        num_workers: processes; the output does not depend on it.
        skip_github: drop documents of the RedPajamaGithub set, as TinyLlama does (SlimPajama only).
        corpus: SLIMPAJAMA or STARCODER.
        show_progress: tqdm bar; None = only on a terminal.
    """
    if not 0.0 < percentage <= 1.0:
        raise UserError(f"--percentage {percentage} must be in (0, 1]")
    if chunk_size < 1:
        raise UserError(f"--chunk_size {chunk_size} must be positive")
    if num_workers < 1:
        raise UserError(f"--num_workers {num_workers} must be >= 1")
    tokenizer_path = resolve_tokenizer_path(tokenizer_path)
    root, files = find_inputs(source_path, split, corpus)
    destination = Path(destination_path)
    if destination.exists() and not destination.is_dir():
        raise UserError(f"--destination_path {destination} is a file; pass a folder for the shards")
    destination.mkdir(parents=True, exist_ok=True)
    fingerprint = tokenizer_fingerprint(tokenizer_path)
    dtype = dtype_for_vocab(fingerprint["vocab_size"])
    settings = {"format": "LITPKDS", "version": 1, "corpus": corpus.name, "split": split, "tokenizer": fingerprint,
                "chunk_size": chunk_size, "dtype": dtype.name, "skip_github": skip_github}
    manifest_path = _manifest_path(destination, split, corpus)
    manifest = _load_manifest(manifest_path, settings)
    prefix = f"{split}_{corpus.name}"
    stream_of = {rel: i for i, rel in enumerate(files)}
    for rel, entry in manifest["inputs"].items():
        if stream_of.get(rel, entry["stream"]) != entry["stream"]:
            raise UserError(f"the input files under {root} changed since the shards in {destination} were made "
                            f"({rel} was input {entry['stream']}, now {stream_of[rel]}); use a new "
                            "--destination_path")
    selected = files[: math.ceil(len(files) * percentage)]
    jobs = [
        InputJob(str(root / rel), rel, stream, str(destination), prefix, tokenizer_path, chunk_size, corpus,
                 skip_github)
        for stream, rel in enumerate(selected)
        if not _is_done(manifest["inputs"].get(rel), destination)
    ]
    bar = tqdm(unit="tok", unit_scale=True, desc=f"{prefix} ({len(jobs)}/{len(selected)} files to do)",
               disable=False if show_progress else None if show_progress is None else True)
    docs_seen = 0

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
            for job in jobs:
                def progress(d: int, t: int) -> None:
                    nonlocal docs_seen
                    docs_seen += d
                    bar.update(t)
                    bar.set_postfix(docs=docs_seen, refresh=False)

                on_done(job.relpath, process_input(job, progress))
        else:
            _run_parallel(jobs, num_workers, bar, on_done)
    finally:  # also on an error or Ctrl-C, so a re-run skips the inputs finished so far
        bar.close()
        _write_manifest(manifest_path, manifest)
    return json.loads(manifest_path.read_text())


def _run_parallel(jobs: list[InputJob], num_workers: int, bar: tqdm,
                  on_done: Callable[[str, dict], None]) -> None:
    ctx = mp.get_context()
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    with ctx.Pool(min(num_workers, len(jobs)), initializer=_init_worker, initargs=(counters,)) as pool:
        pending = [pool.apply_async(_run_job, (job,)) for job in jobs]
        reported = 0
        while pending:
            time.sleep(0.2)
            still, error = [], None
            for result in pending:
                if not result.ready():
                    still.append(result)
                    continue
                try:
                    on_done(*result.get())  # re-raises a worker's UserError here
                except UserError as e:  # record every other finished input before stopping
                    error = error or e
            if error is not None:
                raise error
            pending = still
            bar.update(counters[1].value - reported)
            reported = counters[1].value
            bar.set_postfix(docs=counters[0].value, refresh=False)
