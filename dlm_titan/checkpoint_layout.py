"""On-disk layout of checkpoints, shared by the checkpoint package (manager, resume, export) and the readers
below it: dlm_titan.interop.init_shape takes a run's shape from a checkpoint's marker, and interop is what the
checkpoint package imports, so the layout sits under both (it imports only the ground utilities: checksums,
errors, fileio).

``{dump_folder}/{checkpoint.folder}/step-N`` is one DCP checkpoint. It is complete only once its marker
``complete.json`` exists: the checkpoint manager writes it (rank 0) after every rank's data and DCP's
``.metadata`` are on disk, so a crash or SIGKILL mid-save leaves a folder without a marker, which is skipped.
The marker holds the step, the saving world size, the model's shape (so weights can be read without the run's
config), the size of every file of the folder, so a truncated or missing file is named before DCP reads it, and
each file's CRC-32 (checksums.py), so bytes changed in place are named too (:func:`verify_checksums`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dlm_titan.checksums import mismatched_files
from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write_text, fsync_folder
from dlm_titan.saved_config import saved_config

MARKER = "complete.json"
"""Written last into a step folder: its presence makes the checkpoint complete (JSON: step, model shape, ...)."""
_STEP_DIR = re.compile(r"^step-(\d+)$")


def print_warning(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def step_folders(folder: Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``step-N`` folder in ``folder``, oldest first (complete or not)."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def is_complete(step_dir: Path) -> bool:
    return (step_dir / MARKER).is_file() and (step_dir / ".metadata").is_file()


def is_dcp_folder(path: Path) -> bool:
    """A DCP checkpoint folder (complete or not): DCP metadata, a marker, or a ``step-N`` name."""
    return (path / ".metadata").is_file() or (path / MARKER).is_file() or bool(_STEP_DIR.match(path.name))


def read_marker(step_dir: Path) -> dict[str, Any]:
    """The marker JSON of a complete checkpoint; UserError naming the folder when it is incomplete."""
    if not (step_dir / MARKER).is_file() or not (step_dir / ".metadata").is_file():
        raise UserError(f"checkpoint {step_dir} is incomplete (no {MARKER} or .metadata: its save was interrupted); "
                        f"load another step (checkpoint.load_step) or delete it")
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None
    if not _well_formed(marker):
        raise UserError(damaged(step_dir, f"its {MARKER} is not the marker a save writes"))
    for name, size in marker.get("files", {}).items():  # markers written before file sizes were recorded: none
        path = step_dir / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            what = "is missing" if found is None else f"has {found:,} bytes, but its save wrote {size:,}"
            raise UserError(damaged(step_dir, f"{name} {what}"))
    return marker


def _well_formed(marker: Any) -> bool:
    """The marker's fields that loads rely on have the types a save writes (a hand-edited or damaged one may not)."""
    if not isinstance(marker, dict) or not isinstance(marker.get("step", 0), int):
        return False
    files, checksums = marker.get("files", {}), marker.get("checksums", {})
    return (isinstance(files, dict) and all(isinstance(v, int) for v in files.values())
            and isinstance(checksums, dict) and all(isinstance(v, str) for v in checksums.values())
            and all(isinstance(marker.get(k, {}), dict) for k in ("model", "data")))


def damaged(step_dir: Path, what: str) -> str:
    """The one line refusing a damaged checkpoint, naming the newest older complete one to load instead."""
    match = _STEP_DIR.match(step_dir.name)
    older = [s for s, p in step_folders(step_dir.parent) if match and s < int(match.group(1)) and is_complete(p)]
    fix = (f"resume from the newest older complete checkpoint with --checkpoint.load_step {older[-1]}, or delete "
           f"{step_dir.name}" if older else "there is no older complete checkpoint: delete it to start over")
    return f"checkpoint {step_dir} is damaged: {what}; {fix}"


def verify_checksums(step_dir: Path, marker: dict[str, Any], names: list[str] | None = None) -> None:
    """Checks the files ``names`` (default: all) of a checkpoint against the CRC-32s its marker records; raises
    UserError naming the first mismatch. Markers written before checksums were recorded have none: no check."""
    expected = marker.get("checksums") or {}
    if names is not None:
        expected = {n: expected[n] for n in names if n in expected}
    missing = [n for n in expected if not (step_dir / n).is_file()]
    if missing:
        raise UserError(damaged(step_dir, f"{missing[0]} is missing"))
    bad = mismatched_files(step_dir, expected)
    if bad:
        raise UserError(damaged(step_dir, f"{bad[0]} does not match the checksum its save recorded (its bytes "
                                          "changed on disk)"))


@contextlib.contextmanager
def single_process_dcp() -> Iterator[None]:
    """Silences DCP's warning that it assumes one process when torch.distributed is not initialized: that is what
    a 1-process run or a loader means."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
        yield


def read_dcp_metadata(step_dir: Path) -> Any:
    """DCP's metadata of a checkpoint; UserError when the file (already size-checked by :func:`read_marker`)
    does not parse, i.e. is damaged on disk. Errors reading it (OSError) propagate as they are."""
    import pickle

    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(str(step_dir)).read_metadata()
    except (pickle.UnpicklingError, EOFError, OverflowError, ValueError, TypeError, AttributeError, KeyError) as e:
        raise UserError(f"checkpoint {step_dir} is damaged: its .metadata cannot be read ({type(e).__name__}: {e}); "
                        "load another step (checkpoint.load_step) or delete it") from None


def write_marker(step_dir: Path, content: dict[str, Any], checksums: dict[str, str] | None = None) -> None:
    """Marks a fully written checkpoint complete, recording the size of each file in it and ``checksums`` (file
    name -> CRC-32; call once every rank's files and DCP's .metadata are written). The marker is written
    atomically, so it is either absent or whole."""
    files = {p.name: p.stat().st_size for p in sorted(step_dir.iterdir())
             if p.is_file() and p.name not in (MARKER, MARKER + ".tmp")}
    record = {**content, "files": files}
    if checksums is not None:
        record["checksums"] = dict(sorted(checksums.items()))
    atomic_write_text(step_dir / MARKER, json.dumps(record, indent=2) + "\n")


def remove_checkpoint(step_dir: Path, ignore_errors: bool = False) -> None:
    """Deletes a step folder, its marker first: a deletion cut short (SIGKILL, a crash, a power loss) leaves an
    incomplete folder, skipped on resume, never one that still reads as complete with some of its files gone
    (``shutil.rmtree`` alone deletes in the folder's listing order, the marker possibly last)."""
    try:
        (step_dir / MARKER).unlink(missing_ok=True)
        fsync_folder(step_dir)  # the marker's removal reaches the disk before any of the files' removals
    except OSError:
        if not ignore_errors:
            raise
    shutil.rmtree(step_dir, ignore_errors=ignore_errors)


def checkpoint_folder_of(dump_folder: Path) -> Path:
    """The checkpoint folder of a dump folder: ``checkpoint.folder`` from its saved config.toml, else
    ``checkpoint``."""
    return dump_folder / saved_config(dump_folder).get("checkpoint", {}).get("folder", "checkpoint")


def newest_complete(folder: Path, warn: bool = True) -> Path | None:
    """The newest complete ``step-N`` in a checkpoint folder; newer incomplete ones are skipped with a warning."""
    for _, path in reversed(step_folders(folder)):
        if is_complete(path):
            return path
        if warn:
            print_warning(f"skipping incomplete checkpoint {path} (no {MARKER}: its save was interrupted)")
    return None


def find_checkpoint(path: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under ``path``: a dump folder or a checkpoint folder. None if there is none."""
    path = Path(path)
    if step_folders(path):
        return newest_complete(path, warn)
    return newest_complete(checkpoint_folder_of(path), warn)
