"""Atomic writes: the file and its folder reach the disk before the helper returns, a failed write leaves the old
file, and a new file gets the umask's mode whatever the writer created."""

import os

import pytest

from dlm_titan import fileio
from dlm_titan.fileio import atomic_write, atomic_write_text


def test_file_and_folder_are_fsynced_before_the_rename_returns(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", recording_fsync)
    atomic_write_text(tmp_path / "a.json", "{}\n")
    assert synced == [str(tmp_path / "a.json.tmp"), str(tmp_path)]  # the content, then the rename in the folder
    assert (tmp_path / "a.json").read_text() == "{}\n" and not (tmp_path / "a.json.tmp").exists()


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a.txt").write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "a.txt", failing)
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no half-written temporary left


def test_a_private_temporary_gets_the_mode_of_a_new_file(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "w.bin", lambda tmp: (tmp.write_bytes(b"x"), os.chmod(tmp, 0o600)))
    finally:
        os.umask(old)
    assert (tmp_path / "w.bin").stat().st_mode & 0o777 == 0o640
