"""Write a split as SlimPajama-style ``{stem}_{i}.jsonl.zst`` files, byte-reproducibly."""

from __future__ import annotations

import json
from pathlib import Path

import zstandard

from scripts.embedded_corpus.doc import Doc

ZSTD_LEVEL = 19  # fixed, with single-threaded compression, so the same records give the same bytes
TRAIN_FILE_BYTES = 4_000_000  # raw JSONL bytes per train file before starting the next one


def _jsonl_line(doc: Doc) -> bytes:
    """One SlimPajama record, exactly ``{"text", "meta": {"redpajama_set_name"}}``, as a UTF-8 JSON line."""
    record = {"text": doc.text, "meta": {"redpajama_set_name": doc.set_name}}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


def write_split(docs: list[Doc], folder: Path, stem: str, file_bytes: int) -> list[Path]:
    """Write docs as `folder/{stem}_{i}.jsonl.zst`, starting a new file after file_bytes raw bytes.

    Args:
        docs: Documents in the order they are written.
        folder: Output folder, created if missing.
        stem: File name stem, e.g. ``example_train``.
        file_bytes: Raw JSONL bytes after which the next document starts a new file (a file may exceed it
            by its last document).

    Returns:
        The paths written, in order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[bytes]] = [[]]
    size = 0
    for doc in docs:
        if size >= file_bytes:
            groups.append([])
            size = 0
        line = _jsonl_line(doc)
        groups[-1].append(line)
        size += len(line)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0)
    paths = []
    for i, lines in enumerate(groups):
        path = folder / f"{stem}_{i}.jsonl.zst"
        path.write_bytes(compressor.compress(b"".join(lines)))
        paths.append(path)
    return paths
