"""Storage failures of a checkpoint save (full disk, quota, read-only or vanished filesystem) as one line.

DCP reports a failed write as a ``CheckpointException`` holding every rank's and thread's traceback (some 150
lines for one full disk). What the user needs is the cause and that nothing saved was lost: the failed save
never gets its marker, so the previous checkpoint stays the newest complete one.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from pathlib import Path

from dlm_titan.checkpoint_layout import newest_complete
from dlm_titan.errors import UserError

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOENT,
                  errno.ESTALE)
"""Errors of the filesystem, not of our code: a save failing with one of them is reported as one line."""

STORAGE_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)
"""The part of ``STORAGE_ERRNOS`` that the trainer reports as one line outside a checkpoint save (a full, read-only
or failing disk under the dump folder or an export). ENOENT, EACCES and EPERM are left out there: outside a save
they name a path the user gave (a missing or unreadable config, data or init folder), whose traceback says which
one; inside a save they mean the checkpoint folder vanished or lost its permissions mid-write. ESTALE (an NFS
handle gone stale under a writer) is likewise counted as storage only within a save."""


def storage_error(error: BaseException) -> OSError | None:
    """The first OSError with a storage errno in ``error``, its causes and contexts, and (for DCP's
    ``CheckpointException``) the exceptions of every failed rank."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def save_failure(error: BaseException, path: Path, checkpoint_folder: Path) -> UserError | None:
    """The one-line UserError for a save of ``path`` that failed on storage, or None for any other failure (a
    bug: it keeps its traceback)."""
    cause = storage_error(error)
    if cause is None:
        return None
    newest = newest_complete(checkpoint_folder, warn=False)
    kept = (f"{newest.name} stays the newest complete checkpoint" if newest is not None and newest != path
            else "no earlier complete checkpoint exists")
    where = f" ({cause.filename})" if cause.filename else ""
    return UserError(f"saving checkpoint {path} failed: {cause.strerror or cause}{where}; {kept}; free space (or "
                     "fix the folder's filesystem) and rerun the same command to resume")


@contextlib.contextmanager
def writer_thread_errors() -> Iterator[list[BaseException]]:
    """Collects the exceptions that end DCP's helper writer threads, for the caller to raise.

    ``FileSystemWriter`` writes with ``write_threads - 1`` helper threads besides the calling one; an error in a
    helper (a full disk) is only printed by Python's thread hook as a traceback, and DCP then completes the save
    without that thread's files in its metadata. Inside this context such errors are kept in the yielded list
    instead (other threads' errors still go to the previous hook).
    """
    caught: list[BaseException] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and _DCP_WRITER in args.thread.name and args.exc_value is not None:
            caught.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = hook
    try:
        yield caught
    finally:
        # When the calling thread's share fails, DCP raises without joining its helpers: wait for them here, so
        # their errors come to this hook (and no helper writes on after the save is reported failed).
        for thread in threading.enumerate():
            if _DCP_WRITER in thread.name and thread is not threading.current_thread():
                thread.join()
        if threading.excepthook is hook:  # else someone replaced it meanwhile: leave theirs
            threading.excepthook = previous


_DCP_WRITER = "_write_files_from_queue"
"""The target of DCP's helper writer threads, which Python puts in their default names ("Thread-N (target)")."""
