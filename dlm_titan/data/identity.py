"""What a run's training data is, recorded in each checkpoint, so a resume can tell that it changed.

The sample stream of a resumed run is the saved one only if the shards are the same: a shard that grew (more
tokens appended) or a shard file added or removed between save and resume changes which window every later
sample index reads. The identity is the sorted shard list with each file's size, plus what each preparation
manifest of those shards records about how they were made (tokenizer hash, totals). Names are relative to the
data folder, so moving identical shards to another ``data.path`` keeps the identity.

The same manifests also tell which shards a preparation finished: :func:`check_preparation_complete` refuses the
shards of an input the manifest does not record (a preparation killed mid-input, or still running).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from dlm_titan.errors import UserError

from .shards import list_shards


def dataset_identity(data_path: str | os.PathLike, prefixes: list[str]) -> dict[str, Any]:
    """``{"shards": {name: bytes}, "manifests": {name: {...}}}`` of the shards that ``prefixes`` select."""
    folder = Path(data_path)
    shards = {}
    for prefix in prefixes:
        for path in list_shards(folder, prefix):
            shards[Path(path).name] = os.path.getsize(path)
    return {"shards": dict(sorted(shards.items())), "manifests": _manifests(folder, prefixes)}


def _manifests(folder: Path, prefixes: list[str]) -> dict[str, Any]:
    """Tokenizer hash and totals of each readable manifest ``{split}_{corpus}_manifest.json`` of these shards."""
    found = {}
    for path, manifest in selected_manifests(folder, prefixes):
        tokenizer = manifest.get("tokenizer") or {}
        if isinstance(tokenizer, dict):
            found[path.name] = {"tokenizer_sha256": tokenizer.get("sha256"), "totals": manifest.get("totals")}
    return found


def check_preparation_complete(data_path: str | os.PathLike, prefixes: list[str]) -> None:
    """UserError if a shard that ``prefixes`` select belongs to a preparation (``{stem}_{stream:06d}_{n:010d}.bin``
    beside ``{stem}_manifest.json``) whose manifest does not record it: that input's preparation was interrupted
    (killed, so it could not clean up) or is still running, and its stream may be cut short."""
    folder = Path(data_path)
    names = {Path(p).name for prefix in prefixes for p in list_shards(folder, prefix)}
    for path, manifest in selected_manifests(folder, prefixes):
        inputs = manifest.get("inputs")
        if not isinstance(inputs, dict):
            continue
        recorded = {name for entry in inputs.values() if isinstance(entry, dict) for name in entry.get("shards", ())}
        stream = re.compile(re.escape(path.name[: -len("_manifest.json")]) + r"_\d{6}_\d{10}\.bin")
        stray = sorted(n for n in names if stream.fullmatch(n) and n not in recorded)
        if stray:
            raise UserError(f"{len(stray)} shard(s) in {folder} ({_names(stray)}) are not recorded in {path.name}: "
                            "their preparation was interrupted or is still running; run the same prepare command "
                            "again (it redoes only the unfinished inputs), or delete those shards")


def selected_manifests(folder: str | os.PathLike, prefixes: list[str]) -> list[tuple[Path, dict[str, Any]]]:
    """(path, content) of each readable manifest ``{stem}_manifest.json`` of the shards that ``prefixes`` select."""
    found = []
    for path in sorted(Path(folder).glob("*_manifest.json")):
        stem = path.name[: -len("_manifest.json")]
        if not any(stem.startswith(p) or p.startswith(stem + "_") for p in prefixes):
            continue
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # preparation's bookkeeping only
        if isinstance(manifest, dict):
            found.append((path, manifest))
    return found


def describe_change(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """One phrase saying how ``current`` differs from ``saved`` (None if it does not), naming up to 3 files."""
    old, new = saved.get("shards", {}), current.get("shards", {})
    parts = []
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    resized = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    if added:
        parts.append(f"{len(added)} shard(s) added ({_names(added)})")
    if removed:
        parts.append(f"{len(removed)} shard(s) missing ({_names(removed)})")
    if resized:
        first = resized[0]
        parts.append(f"{len(resized)} shard(s) changed size ({first}: {old[first]:,} -> {new[first]:,} bytes"
                     f"{', ...' if len(resized) > 1 else ''})")
    if not parts and saved.get("manifests", {}) != current.get("manifests", {}):
        parts.append("a preparation manifest records another tokenizer or other totals")
    return "; ".join(parts) or None


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
