"""Atomic file writes: a file is either its old content or the complete new one, even across a crash.

The one helper every writer of a file that others read back uses (checkpoint markers, exports, shards, data
manifests, the run's config.toml). Ground level: imports nothing from the package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Writes ``path`` through ``write(tmp)`` into ``{path}.tmp``, then fsyncs it, renames it over ``path`` and
    fsyncs the folder, so ``path`` is either absent, the old file or the whole new one, also after a power loss.

    The new file gets the mode any new file gets (0666 less the umask): some writers (e.g. safetensors) create
    their output as a private temporary file (0600), which would make an export unreadable to other users.

    Args:
        path: the file to (re)place; its folder must exist.
        write: writes the whole content to the path it is given (it may create or replace that file).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb"):  # created as open() creates any file: its mode is what the umask allows
        pass
    mode = os.stat(tmp).st_mode & 0o7777
    try:
        write(tmp)
        if os.stat(tmp).st_mode & 0o7777 != mode:
            os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file stays as it was; no half-written temporary is left beside it
        raise
    os.replace(tmp, path)
    fsync_folder(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) written to ``path`` atomically; see :func:`atomic_write`."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes a rename or creation in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and platforms) refuse fsync on a folder: nothing more can be done there
        pass
    finally:
        os.close(fd)
