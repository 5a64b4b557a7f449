"""One trainer per dump folder: an exclusive lock held for the whole run.

Two trainers writing one dump folder overwrite each other's checkpoints (each logs its saves as done, and
neither can resume). Rank 0 takes a POSIX record lock (``fcntl.lockf``) on ``{dump_folder}/run.lock`` before
anything is written there. The kernel drops the lock when the holding process ends, however it ends (SIGKILL
included), so a lock file left by a dead run is not "held": the next run takes it over and says whose it was.

Where it works: local filesystems and NFS with working lock support (NFSv4, or NFSv3 with lockd), where POSIX
locks are granted by the server and so exclude processes on other nodes too. Where the filesystem refuses locks
(some FUSE mounts, NFS mounted with ``nolock``, Lustre without ``flock``), the run goes on with a warning: there
a second trainer on the same folder is not refused. On NFS mounted ``local_lock=all`` locks are node-local.

A start refused after the lock was taken (bad input found while the Trainer is built) leaves no trace of itself:
the lock file and the folders the lock created are removed again if they are otherwise empty. Because a lock
file may thus disappear, a lock taken on a file that is no longer at its path is dropped and taken again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlm_titan.errors import UserError

LOCK_FILE = "run.lock"


class RunLock:
    """An exclusive, non-blocking lock on a dump folder, held from :meth:`acquire` until :meth:`release`.

    POSIX record locks belong to the process: a forked data-loader worker does not hold it, and closing the
    file (the only descriptor of it we open) releases it.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self._fd: int | None = None
        self._created_file = False  # whether acquire created the lock file it holds, and which folders (deepest first)
        self._created_folders: list[Path] = []

    def acquire(self) -> None:
        """Takes the lock or raises :class:`UserError` naming the run that holds it.

        Creates the folder (and the lock file) if needed; writes nothing else. A lock file whose holder has
        ended is taken over with a warning.
        """
        for _ in range(_ATTEMPTS):
            self._created_folders += [f for f in _make_folder(self.path.parent) if f not in self._created_folders]
            opened = _open_lock_file(self.path)
            if opened is None:  # the folder was removed under us by a refused start tidying up: make it again
                continue
            fd, self._created_file = opened  # this attempt's file: an earlier attempt's is gone
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _describe(_read_holder(fd))
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise UserError(f"{self.path.parent} is in use by another trainer ({holder}): stop that run or "
                                    f"choose another --job.dump_folder") from None
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    print(f"warning: the filesystem of {self.path.parent} does not support file locks "
                          f"({e.strerror}): a second trainer on this dump folder would not be refused", file=sys.stderr)
                    return
                raise
            if not _is_at(fd, self.path):  # unlinked by a refused start between our open and lock: a stale file
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                print(f"warning: {self.path} was left by a run that has ended ({_describe(previous)}); taking it over",
                      file=sys.stderr)
            _write_holder(fd)
            self._fd = fd
            return
        raise UserError(f"{self.path} kept disappearing while this run tried to lock it ({_ATTEMPTS} tries): is "
                        "another process removing the dump folder? Rerun, or choose another --job.dump_folder")

    def release(self, tidy: bool = False) -> None:
        """Empties the lock file and drops the lock (idempotent). A crash skips this: the kernel drops it then.

        Args:
            tidy: also remove what :meth:`acquire` created, for a start that was refused: the lock file (unlinked
                while still locked, see acquire's check, and only while it is the file at its path), then each
                folder it made, deepest first, while empty.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # our file only, not one put in its place (by a run on another node where locks are node-local)
            if tidy and self._created_file and _is_at(fd, self.path):
                with contextlib.suppress(OSError):
                    self.path.unlink()
            else:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor drops the POSIX lock
        if tidy:
            for folder in self._created_folders:
                try:
                    folder.rmdir()  # only an empty folder: whatever else is there stays, and so do its parents
                except OSError:
                    break

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


_ATTEMPTS = 10  # tries to lock a file that is still at its path (see acquire)


def _make_folder(folder: Path) -> list[Path]:
    """Creates ``folder`` and its missing parents; returns those it found missing, deepest first."""
    missing = []
    with contextlib.suppress(OSError):  # a stat that fails: mkdir below names the problem
        for path in (folder, *folder.parents):
            if path.exists():
                break
            missing.append(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"job.dump_folder {folder} is not a directory (a file is in the way): choose another "
                        "--job.dump_folder") from None
    except PermissionError:
        raise UserError(f"job.dump_folder {folder} cannot be created (permission denied): choose a writable "
                        "--job.dump_folder") from None
    except OSError as e:  # a read-only filesystem, a symlink loop, a folder of /proc, ...
        raise UserError(f"job.dump_folder {folder} cannot be created ({e.strerror}): choose another "
                        "--job.dump_folder") from None
    return missing


def _open_lock_file(path: Path) -> tuple[int, bool] | None:
    """(descriptor, whether this call created the file) of the lock file; None if its folder is gone."""
    try:
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:  # O_EXCL does not follow a symlink: O_CREAT makes a dangling one's target
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644), False
    except FileNotFoundError:  # the folder was removed after _make_folder
        return None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory: remove it so the run can lock its dump folder") from None
    except PermissionError:
        raise UserError(f"job.dump_folder {path.parent} is not writable (permission denied on {path.name}): "
                        "choose a writable --job.dump_folder") from None
    except OSError as e:  # e.g. an existing dump folder on a read-only filesystem (EROFS)
        raise UserError(f"job.dump_folder {path.parent} is not writable ({e.strerror} on {path.name}): choose "
                        "a writable --job.dump_folder") from None


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the file at ``path`` (not unlinked or replaced since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder record written by :func:`_write_holder`, or {} if the file is empty or unreadable."""
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int) -> None:
    """Records who holds the lock (for the message a second trainer prints), fsynced."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    data = (json.dumps(record) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')}"


@contextlib.contextmanager
def hold_dump_folder(folder: str | Path, rank: int, group: Any = None, *, leave_no_trace: bool = False
                     ) -> Iterator[None]:
    """Holds the dump folder's lock for the body: rank 0 takes it, every rank learns the outcome.

    Collective when ``group`` (a gloo group of all ranks) is given: if rank 0 is refused, every rank raises the
    same :class:`UserError`, so under torchrun all ranks exit 2 together instead of waiting on rank 0. The lock
    is released however the body ends; a body that raises :class:`UserError` (bad input: a refused start, or a
    run stopped by it) also removes the lock file and the folders the lock created, if otherwise empty
    (:meth:`RunLock.release`), as does any body with ``leave_no_trace`` (a check that only tests the folder).
    """
    lock = RunLock(folder)
    error = None
    if rank == 0:
        try:
            lock.acquire()
        except UserError as e:
            error = str(e)
    if group is not None:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        error = box[0]
    if error is not None:
        raise UserError(error)
    refused = False
    try:
        yield
    except UserError:  # bad input: a refused start leaves no trace (what else a run wrote stays)
        refused = True
        raise
    finally:
        lock.release(tidy=refused or leave_no_trace)
