"""The dump-folder lock: a second holder is refused with one line, a dead holder's lock is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from dlm_titan.errors import UserError
from dlm_titan.run_lock import LOCK_FILE, RunLock

HOLD = textwrap.dedent("""
    import sys, time
    from dlm_titan.run_lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock on tmp_path/run (POSIX locks are per process)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_second_holder_is_refused_naming_the_first(tmp_path, holder):
    with pytest.raises(UserError) as err:
        RunLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert "in use by another trainer" in message and f"pid {holder.pid}" in message
    assert "--job.dump_folder" in message and "\n" not in message


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, holder, capsys):
    os.kill(holder.pid, signal.SIGKILL)  # no release: the kernel drops the lock, the file keeps the record
    holder.wait()
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert f'"pid": {os.getpid()}' in (tmp_path / "run" / LOCK_FILE).read_text()
    lock.release()


def test_release_lets_the_next_run_in_without_a_warning(tmp_path, capsys):
    with RunLock(tmp_path / "run"):
        pass
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path / "run"):
        pass
    assert capsys.readouterr().err == ""


def test_dump_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(UserError, match="is not a directory"):
        RunLock(tmp_path / "run").acquire()
    with pytest.raises(UserError, match="is not a directory"):
        RunLock(tmp_path / "run" / "sub").acquire()
