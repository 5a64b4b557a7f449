"""Which weights a path holds, read into dlm_titan's names: the one entry point of the interop package.

- a folder whose config.json has ``model_type = "dlm_titan"``: dlm_titan's Hugging Face export (:mod:`.hf_format`);
- a folder whose config.json is a Llama-family model (:mod:`.llama`);
- a ``.safetensors`` / ``.pth`` / ``.pt`` file: an SMDM/lit-gpt state dict (:mod:`.smdm`), unless it is a model
  folder's own weights file (``model.safetensors`` or a shard, config.json beside it): that is refused, naming the
  folder to pass instead.

Anything else (a DCP checkpoint, a dump folder, an export of the older ``"format": "dlm_titan"`` kind) is left
to :mod:`dlm_titan.checkpoint.export`; a config.json of another architecture is one clear error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dlm_titan.errors import UserError, first_and_more
from dlm_titan.interop.hf_format import (
    check_no_unexpected,
    from_hf_state,
    is_dlm_titan_hf_config,
    shape_from_hf_config,
)
from dlm_titan.interop.llama import is_llama_config, llama_shape, read_llama
from dlm_titan.interop.safetensors_io import is_weights_file_name, read_weights
from dlm_titan.interop.smdm import is_litgpt_file, read_litgpt

_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               type(None): "null"}
"""How a config.json that is no JSON object is named in the error."""


def _config(folder: Path) -> dict[str, Any] | None:
    """The config.json of a folder (None where there is none); UserError naming the file where it cannot be read
    or is valid JSON but no object."""
    file = folder / "config.json"
    if not (folder.is_dir() and file.is_file()):
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {file} ({e})") from None
    if not isinstance(config, dict):  # valid JSON, but no model configuration (e.g. a list)
        raise UserError(f"{file} holds {_JSON_TYPES.get(type(config), 'a JSON value')}, not the JSON object of a "
                        "model configuration; replace it with the model's config.json")
    return config


def _is_litgpt(path: Path) -> bool:
    """Whether ``path`` is an SMDM/lit-gpt state dict file; UserError for a model folder's own weights file (an
    export's ``model.safetensors``, a shard), which read as a lit-gpt file was "not an SMDM/lit-gpt checkpoint":
    true, but no word of the folder that loads."""
    if not is_litgpt_file(path):
        return False
    if is_weights_file_name(path.name) and (path.parent / "config.json").is_file():
        raise UserError(f"{path} is a weights file of the model folder {path.parent} (config.json beside it), not an "
                        "SMDM/lit-gpt state dict; pass the folder instead")
    return True


def interop_kind(path: Path) -> str | None:
    """"hf" (dlm_titan's HF folder), "llama", "litgpt", or None for the formats checkpoint/export.py reads.
    UserError for a config.json of an unsupported architecture or a model folder's weights file."""
    if _is_litgpt(path):
        return "litgpt"
    return _config_kind(path, _config(path))


def _config_kind(path: Path, config: dict[str, Any] | None) -> str | None:
    """:func:`interop_kind` of a folder whose config.json (None: none) is already read."""
    if config is None or config.get("format") == "dlm_titan":
        return None
    if is_dlm_titan_hf_config(config):
        return "hf"
    if is_llama_config(config):
        return "llama"
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    raise UserError(f"{path}: architecture {arch} is not supported; dlm_titan reads its own exports, "
                    "LlamaForCausalLM folders and SMDM/lit-gpt state dicts")


def interop_shape(path: Path, flavor: str | None = None) -> dict[str, Any] | None:
    """The model shape a path holds (reading config.json only, or the state dict of a lit-gpt file), or None."""
    if _is_litgpt(path):
        return read_litgpt(path, flavor)[0]
    return config_shape(path)


def config_shape(path: Path) -> dict[str, Any] | None:
    """The model shape in a folder's config.json (dlm_titan's HF folder or a Llama one), parsed once; None for any
    other path (a lit-gpt file included: its shape needs its state dict). UserError as :func:`interop_kind`."""
    config = _config(path)
    kind = _config_kind(path, config)
    if kind == "hf":
        return shape_from_hf_config(config, path / "config.json")
    if kind == "llama":
        return llama_shape(config, path / "config.json")
    return None


def read_interop(path: str | Path, flavor: str | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(model config, full CPU state dict in dlm_titan names) of an interop format, shapes checked; None when
    ``path`` is none of them.

    Args:
        path: a model folder or a lit-gpt state dict file.
        flavor: SMDM flavor of a lit-gpt file (default: inferred from its shapes).
    """
    path = Path(path)
    kind = interop_kind(path)
    if kind is None:
        return None
    if kind == "litgpt":
        cfg, state = read_litgpt(path, flavor)
    elif kind == "llama":
        cfg, state = read_llama(path)
    else:
        cfg = shape_from_hf_config(_config(path), path / "config.json")
        hf = read_weights(path)
        try:
            state, unread = from_hf_state(hf, cfg)
        except KeyError as e:
            raise UserError(f"{path}: the weights lack {e.args[0]!r}; re-export the model") from None
        check_no_unexpected(unread, cfg, path)
    check_shapes(cfg, state, path)
    return cfg, state


def check_shapes(cfg: dict[str, Any], state: dict[str, torch.Tensor], where: Path) -> None:
    """UserError naming the first parameter whose shape differs from a model of shape ``cfg``, or a tensor that
    no parameter of that model reads."""
    from dlm_titan.models import build_model_from_config

    expected = build_model_from_config(cfg, "cpu", attn_backend="math").state_dict()
    for name, t in expected.items():
        got = state.get(name)
        if got is None or tuple(got.shape) != tuple(t.shape):
            have = "missing" if got is None else f"shape {tuple(got.shape)}"
            raise UserError(f"{where}: parameter {name} is {have}, expected {tuple(t.shape)} for the model its "
                            "config describes")
    extra = sorted(set(state) - set(expected))
    if extra:  # weights the model would drop (e.g. layers beyond a config edited to fewer)
        raise UserError(f"{where}: the weights hold {first_and_more(extra)}, which the model its config describes "
                        "has no parameter for; restore the config that came with these weights")
