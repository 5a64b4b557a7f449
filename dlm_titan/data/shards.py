"""The LITPKDS packed-shard format of TinyLlama/SMDM: write, validate, memory-map.

A shard is a 24-byte header followed by ``chunk_size`` tokens in C order::

    bytes  0..6   b"LITPKDS"                  magic
    bytes  7..14  uint64 little-endian        version (1)
    byte   15     uint8                       dtype code (8 = uint16, 4 = int32, see DTYPE_CODES)
    bytes 16..23  uint64 little-endian        chunk_size (tokens in this file)

TinyLlama's builder always writes ``chunk_size`` = the configured chunk and pads the last chunk with its
separator token. Our writer instead writes the last, partial chunk with ``chunk_size`` = its true length, so the
header stays honest and no padding tokens enter training; TinyLlama's reader handles such files unchanged
(it takes ``chunk_size // block_size`` blocks).
"""

from __future__ import annotations

import glob
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write

MAGIC = b"LITPKDS"
VERSION = 1
HEADER_SIZE = 24
# TinyLlama's codes. Floating-point codes (6, 7) exist in the format but can not hold token ids.
DTYPE_CODES: dict[int, type[np.integer]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class ShardError(UserError):
    """A bad shard file (one line naming the file).

    DataLoader workers re-raise exceptions in the main process as ``type(msg)`` with ``msg`` the whole worker
    traceback; we keep only its last line so the user still sees one line.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 (code 8) for vocabularies of at most 65,535 tokens, int32 (code 4) above (TinyLlama's ``"auto"``
    switches a little earlier, at 65,500; its reader takes either from the header)."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def pack_header(dtype: np.dtype, chunk_size: int) -> bytes:
    """The 24 header bytes of a shard of ``chunk_size`` tokens of ``dtype``."""
    code = _CODE_OF_DTYPE[np.dtype(dtype)]
    return MAGIC + struct.pack("<QBQ", VERSION, code, chunk_size)


def write_shard(path: str | os.PathLike, tokens: np.ndarray) -> None:
    """Write ``tokens`` (1-D, dtype already chosen) as one shard, atomically (``{path}.tmp``, then rename)."""
    tokens = np.ascontiguousarray(tokens)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(pack_header(tokens.dtype, tokens.size))
            f.write(tokens.tobytes(order="C"))

    atomic_write(path, write)


@dataclass(frozen=True)
class ShardInfo:
    """Header facts of one validated shard."""

    path: str
    dtype: np.dtype
    chunk_size: int


def read_header(path: str | os.PathLike) -> ShardInfo:
    """Read and validate a shard's header and size; raise :class:`ShardError` naming the file if bad."""
    path = str(path)
    try:  # an unreadable file is bad input too: one line naming it, not an OSError traceback
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
            actual = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise ShardError(f"shard {path} can not be read: {e.strerror or e}; check the file and its permissions") \
            from None
    if len(header) < HEADER_SIZE:
        raise ShardError(f"shard {path} is truncated: {len(header)} bytes, shorter than the 24-byte header; "
                         "re-create it with scripts/prepare_slim_pajama")
    if header[:7] != MAGIC:
        raise ShardError(f"shard {path} has magic {header[:7]!r}, not b'LITPKDS': not a packed shard; "
                         "remove it from the data folder or re-create it")
    version, code, chunk_size = struct.unpack("<QBQ", header[7:])
    if version != VERSION:
        raise ShardError(f"shard {path} has format version {version}, only version 1 is supported")
    if code not in DTYPE_CODES:
        raise ShardError(f"shard {path} has dtype code {code}; token shards need an integer code "
                         f"{sorted(DTYPE_CODES)} (8 = uint16, 4 = int32)")
    dtype = np.dtype(DTYPE_CODES[code])
    expected = HEADER_SIZE + chunk_size * dtype.itemsize
    if actual != expected:
        raise ShardError(f"shard {path} is truncated or corrupt: {actual} bytes, but its header says "
                         f"{chunk_size} tokens of {dtype.name} = {expected} bytes; re-create it")
    return ShardInfo(path=path, dtype=dtype, chunk_size=int(chunk_size))


def open_shard(info: ShardInfo, vocab_size: int | None) -> np.ndarray:
    """Memory-map a shard's tokens; if ``vocab_size`` is given, check every id is in ``[0, vocab_size)``."""
    if info.chunk_size == 0:
        return np.zeros(0, dtype=info.dtype)
    tokens = np.memmap(info.path, dtype=info.dtype, mode="r", offset=HEADER_SIZE, shape=(info.chunk_size,))
    if vocab_size is not None:
        _check_ids(info, tokens, vocab_size)
    return tokens


def check_leading_ids(info: ShardInfo, vocab_size: int, count: int = 4096) -> None:
    """The first ``count`` token ids of a shard must fit the vocabulary. One small read per shard (a launch's
    pre-check affords it for thousands of shards, where the full check of every id waits for the first use of
    each shard): it catches a header whose dtype code is wrong, e.g. int32 over uint16 tokens (ids of millions)."""
    _check_ids(info, np.fromfile(info.path, dtype=info.dtype, count=min(count, info.chunk_size), offset=HEADER_SIZE),
               vocab_size)


def _check_ids(info: ShardInfo, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise ShardError(f"shard {info.path} holds token id {bad}, outside the model vocabulary [0, {vocab_size}) "
                         f"(read as {info.dtype.name}, the dtype its header names); prepare it with a tokenizer of at "
                         "most model.vocab_size tokens or raise model.vocab_size, or re-create it if its header is "
                         "wrong")


def list_shards(folder: str | os.PathLike, prefix: str) -> list[str]:
    """Sorted ``{folder}/{prefix}*.bin`` (SMDM's glob); UserError naming prefix and folder if none, ShardError
    for a symbolic link whose target is gone."""
    folder = Path(folder)
    if glob.has_magic(prefix):  # "train_*" would be the invalid pattern "train_**.bin" (a pathlib traceback)
        raise UserError(f"data prefix {prefix!r} holds a wildcard; a prefix is the literal beginning of the shard "
                        f"names (train_slim selects train_slim*.bin): drop the {''.join(c for c in '*?[' if c in prefix)}")
    if not folder.is_dir():
        raise UserError(f"data folder {folder} does not exist; set data.path to a folder of .bin shards "
                        "(or \"\" for the embedded corpus)")
    matches = sorted(folder.glob(f"{prefix}*.bin"))
    for path in matches:  # shards linked from another disk: a missing target must not silently drop the shard
        if path.is_symlink() and not path.exists():
            raise ShardError(f"shard {path} is a symbolic link to {os.readlink(path)}, which does not exist; mount "
                             "or restore its target, or remove the link")
    files = [str(p) for p in matches if p.is_file()]
    if not files:
        raise UserError(f"no shard matches prefix {prefix!r} ({prefix}*.bin) in {folder}; check data.path and "
                        "the data prefixes, or prepare shards with scripts/prepare_slim_pajama")
    return files
