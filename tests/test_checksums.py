"""File checksums against zlib's one-shot CRC-32 of the whole file, and in-place damage detection."""

from __future__ import annotations

import os
import zlib

from dlm_titan.checksums import CHUNK_BYTES, checksum_files, file_crc32, mismatched_files


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_file_crc32_equals_one_shot_crc_across_chunk_boundaries(tmp_path):
    for size in (0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 7):
        data = os.urandom(size)
        path = _write(tmp_path / f"f{size}", data)
        assert file_crc32(path) == f"{zlib.crc32(data):08x}"


def test_damage_that_keeps_the_size_is_found(tmp_path):
    files = [_write(tmp_path / f"__{i}_0.distcp", os.urandom(100_000)) for i in range(3)]
    expected = checksum_files(files, threads=2)
    assert expected == checksum_files(files, threads=1)
    assert mismatched_files(tmp_path, expected) == []
    with open(files[1], "r+b") as f:  # 4 KB of 0xFF over the middle: the size does not change
        f.seek(50_000)
        f.write(b"\xff" * 4096)
    assert os.path.getsize(files[1]) == 100_000
    assert mismatched_files(tmp_path, expected) == ["__1_0.distcp"]
