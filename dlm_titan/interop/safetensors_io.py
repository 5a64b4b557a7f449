"""Weights of a Hugging Face model folder: ``model.safetensors``, or shards with ``model.safetensors.index.json``
above a size limit (transformers' layout: ``model-00001-of-00003.safetensors``, the index maps each tensor to its
file and records the total size)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write, atomic_write_text

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
"""transformers' name of a shard (``model-00001-of-00003.safetensors``)."""
MAX_SHARD_BYTES = 5 * 1000**3  # transformers' default max_shard_size, "5GB"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards in order, each shard at most ``max_bytes`` (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += _nbytes(t)
    return shards


def _save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' ``save_file``, its failure to write (a full disk, a read-only folder) raised as the OSError it
    is: safetensors reports it as a ``SafetensorError`` naming the errno in text, which no handler of storage
    errors (the trainer's, the export script's) recognises, so a full disk ended in a traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        found = re.search(r"os error (\d+)", str(e))
        if found is None:
            raise
        code = int(found[1])
        raise OSError(code, os.strerror(code), str(path)) from e


def write_weights(tensors: dict[str, torch.Tensor], out: Path, max_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Writes the tensors (one file, or shards + index when they exceed ``max_bytes``); removes weight files of an
    earlier export in ``out`` that this one does not write. Returns the file names written."""
    shards = plan_shards(tensors, max_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
    for stale in [*out.glob("model*.safetensors"), out / INDEX]:
        if stale.name not in names and stale.is_file():
            stale.unlink()
    for file, keys in zip(names, shards, strict=True):
        part = {k: tensors[k].contiguous() for k in keys}
        atomic_write(out / file, lambda p, part=part: _save_file(part, p))
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
                 "weight_map": {k: file for file, keys in zip(names, shards, strict=True) for k in keys}}
        atomic_write_text(out / INDEX, json.dumps(index, indent=2) + "\n")
    return names


def is_weights_file_name(name: str) -> bool:
    """Whether ``name`` is one a model folder's weights go by: ``model.safetensors`` or a shard's."""
    return name == SINGLE or SHARD.fullmatch(name) is not None


def has_weights(folder: Path) -> bool:
    return (folder / SINGLE).is_file() or (folder / INDEX).is_file()


def _weight_map(folder: Path) -> dict[str, str]:
    """The folder's index: tensor name -> shard file; UserError naming the index (and a missing shard) when it is
    not the JSON object with a ``weight_map`` of file names that transformers writes."""
    index = folder / INDEX
    fix = "re-export or re-download the model (or delete the index of a model saved in one model.safetensors)"
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {index} ({e}); {fix}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise UserError(f"{index} holds no weight_map object mapping each tensor to its shard file (transformers' "
                        f"index); {fix}")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{index} names shard {missing[0]}, which is not in {folder}"
                        f"{f' ({len(missing)} shards missing)' if len(missing) > 1 else ''}; copy every shard the "
                        f"index names into the folder, or {fix}")
    return weight_map


def _check_shard(folder: Path, file: str, names: set[str], weight_map: dict[str, str]) -> None:
    """UserError where shard ``file`` (holding tensors ``names``) disagrees with the index: a tensor the index maps
    elsewhere (or nowhere), or one it maps here that the shard lacks. Shards of two saves mixed in one folder (a
    re-download that stopped half-way, files copied over another model's) would otherwise give the tensors of
    whichever shard was read last, without a word."""
    stray = sorted(n for n in names if weight_map.get(n) != file)
    lacking = sorted(n for n, f in weight_map.items() if f == file and n not in names)
    if stray or lacking:
        what = (f"holds {stray[0]}, which the index maps to {weight_map.get(stray[0]) or 'no shard'}" if stray
                else f"lacks {lacking[0]}, which the index maps to it")
        raise UserError(f"shard {file} in {folder} {what}: the shards and {INDEX} come from different saves; "
                        "re-export or re-download the whole model")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors`` or of the shards its index names (CPU), each shard checked
    to hold exactly the tensors the index maps to it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not has_weights(folder):
        raise UserError(f"{folder} has no {SINGLE} (nor {INDEX}): only safetensors weights are read; save the model "
                        "with transformers' save_pretrained (safe_serialization, its default)")
    weight_map = _weight_map(folder) if (folder / INDEX).is_file() else None
    files = [SINGLE] if weight_map is None else sorted(set(weight_map.values()))
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(str(folder / file))
        except (OSError, ValueError, SafetensorError) as e:
            raise UserError(f"cannot read the weights in {folder} ({e}); re-export or re-download them") from None
        if weight_map is not None:
            _check_shard(folder, file, set(shard), weight_map)
        state.update(shard)
    return state
