"""Fast file checksums (CRC-32) for checkpoint files, computed by a pool of threads.

CRC-32 catches what a size check cannot: bytes overwritten in place (a bad disk block, a stray ``dd``, a bit
flip in transit). It is not a cryptographic hash and is not meant to resist forgery. ``zlib.crc32`` runs at
2-3 GB/s a core and releases the GIL on large buffers, so threads scale with the cores that the page cache or
the disk can feed; files just written are usually still in the page cache.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK_BYTES = 16 << 20
THREADED_BYTES = 256 << 20


def file_crc32(path: str | os.PathLike) -> str:
    """CRC-32 of a file's bytes as 8 hex digits, read in 16 MiB chunks into one reused buffer."""
    crc = 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def checksum_files(paths: Iterable[Path], threads: int | None = None) -> dict[str, str]:
    """``{file name: CRC-32}`` of ``paths``, computed ``threads`` files at a time (default: up to 8 cores, and one
    below 256 MiB in all, where threads gain nothing: a trainer forks its data-loader workers soon after a resume
    verifies its checkpoint, and a process that has just run threads is a riskier one to fork)."""
    paths = list(paths)
    if not paths:
        return {}
    if threads is None and sum(os.path.getsize(p) for p in paths) < THREADED_BYTES:
        threads = 1
    threads = threads or min(8, os.cpu_count() or 1, len(paths))
    if threads == 1:
        return {p.name: file_crc32(p) for p in paths}
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return dict(zip((p.name for p in paths), pool.map(file_crc32, paths), strict=True))


def mismatched_files(folder: Path, expected: dict[str, str], threads: int | None = None) -> list[str]:
    """Names in ``expected`` whose file in ``folder`` now has another checksum (sorted; [] if all match)."""
    actual = checksum_files((folder / name for name in expected), threads)
    return sorted(name for name, crc in expected.items() if actual[name] != crc)
