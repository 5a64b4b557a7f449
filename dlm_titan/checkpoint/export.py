"""Model weights in and out of training: the export and the inference loader.

:func:`export_model` writes a Hugging Face model folder (:mod:`dlm_titan.interop.hf_export`). :func:`load_model`
builds a :class:`~dlm_titan.models.TransEncoder` from such a folder, from an export of the earlier kind
(``model.safetensors`` + a ``config.json`` with ``"format": "dlm_titan"``, written by :func:`write_export`), from a
DCP ``step-N`` checkpoint (model weights only), from a whole dump folder (its newest complete checkpoint), from an
SMDM/lit-gpt state dict or from a Llama-family folder (:mod:`dlm_titan.interop.formats`). Nothing is unpickled:
safetensors, DCP and ``weights_only`` tensor reads only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dlm_titan.checkpoint.state import TRAIN_STATE, first_nonfinite, from_json_tensor
from dlm_titan.checkpoint_layout import (
    MARKER,
    damaged,
    find_checkpoint,
    is_dcp_folder,
    read_dcp_metadata,
    read_marker,
    single_process_dcp,
    verify_checksums,
)
from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write, atomic_write_text
from dlm_titan.interop.formats import check_shapes, read_interop
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import TransEncoder, build_model_from_config, model_config
from dlm_titan.models.attention import rope_cache

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FOLDER = "export"
"""Default export location inside a dump folder."""


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) parameters on the CPU, FQNs without wrapper prefixes.

    Under FSDP2 every rank takes part in the gather and only rank 0 receives the tensors (others get {}).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    options = StateDictOptions(full_state_dict=True, cpu_offload=distributed)
    state = get_model_state_dict(model, options=options)
    return {k: v.detach().to("cpu") for k, v in state.items()}


def export_model(model: nn.Module, model_cfg: dict[str, Any], out_dir: str | Path, dtype: str = "bfloat16",
                 step: int = 0, tokenizer_path: str = "", tokens_seen: int | None = None,
                 final_loss: float | None = None) -> Path:
    """Writes a Hugging Face model folder (:mod:`dlm_titan.interop.hf_export`) of a (possibly FSDP-sharded) model.

    Collective under FSDP2: call it on every rank; rank 0 writes. The weights file is replaced first and
    config.json last, each through a temporary name, so a reader never sees a half-written file.

    Args:
        model: the TransEncoder (plain, compiled, AC-wrapped or FSDP2-sharded).
        model_cfg: at least ``flavor``; shape fields default to the model's own (see :func:`model_config`).
        out_dir: export folder (created).
        dtype: "bfloat16" or "float32" (also "float16").
        step: training step the weights come from, recorded in config.json.
        tokenizer_path: the run's ``data.tokenizer_path``, converted into the folder's tokenizer files.
        tokens_seen: training tokens so far, recorded in config.json and the model card.
        final_loss: the last logged training loss, likewise.

    Returns:
        the export folder.
    """
    if dtype not in DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    state = full_model_state_dict(model)
    if not state:  # non-zero ranks of a sharded model
        return Path(out_dir)
    base = getattr(model, "args", None)
    cfg = {**(model_config(model, model_cfg.get("flavor", "")) if base is not None else {}), **model_cfg}
    write_hf_folder(state, cfg, out_dir, dtype, {"flavor": cfg.get("flavor"), "step": int(step),
                                                 "tokens_seen": tokens_seen, "final_loss": final_loss}, tokenizer_path)
    return Path(out_dir)


def write_export(state: dict[str, torch.Tensor], model_cfg: dict[str, Any], out_dir: str | Path, dtype: str,
                 step: int) -> None:
    """Writes a full state dict (already on one process) as an export folder; see :func:`export_model`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    config = {**model_cfg, "dtype": dtype, "step": int(step), "format": "dlm_titan"}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def is_export_folder(path: Path) -> bool:
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def read_model_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, full CPU state dict) of an export folder, a ``step-N`` checkpoint or a dump folder.

    A dump folder resolves to its newest complete checkpoint, or to its ``export`` folder when it has no
    checkpoint. Raises UserError when ``path`` is none of these.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"no such checkpoint or export: {path}")
    interop = read_interop(path)  # Hugging Face folders (dlm_titan's export, Llama) and SMDM/lit-gpt files
    if interop is not None:
        return _finite(path, *interop)
    if is_export_folder(path):
        return _finite(path, *_read_export(path))
    if is_dcp_folder(path):
        return _read_dcp_model(path)
    step_dir = find_checkpoint(path)
    if step_dir is not None:
        return _read_dcp_model(step_dir)
    if (path / EXPORT_FOLDER / CONFIG_FILE).is_file():
        return read_model_weights(path / EXPORT_FOLDER)
    raise UserError(f"{path} holds no complete checkpoint (step-N with its marker) and no export "
                    f"({WEIGHTS_FILE} + {CONFIG_FILE}); pass a dump folder, a step-N folder or an export folder")


def _finite(path: Path, cfg: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[dict[str, Any],
                                                                                      dict[str, torch.Tensor]]:
    """(cfg, state), refused in one line when the weights hold NaN or inf, as a checkpoint's are: a model that
    would only compute NaN (or start a run from them through ``checkpoint.initial_load_path``)."""
    bad = first_nonfinite(state)
    if bad is not None:
        raise UserError(f"the weights in {path} hold NaN or inf (first: {bad}); use another model or checkpoint")
    return cfg, state


def _read_export(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        state = load_file(str(path / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"cannot read the export in {path} ({e}); re-export it") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path / CONFIG_FILE} holds no JSON object; re-export the model")
    try:  # its config.json is the model's whole description: a hand edit must not reshape the weights silently
        check_shapes(cfg, state, path)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path / CONFIG_FILE} does not describe a model ({type(e).__name__}: {e}); restore the "
                        "config.json the export wrote, or re-export the model") from None
    return cfg, state


def _read_dcp_model(step_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Model weights only of a DCP checkpoint, read into a fresh CPU state dict of the recorded shape; the config
    also holds the step and, where the checkpoint's training state records it, ``tokens_seen`` (for exports)."""
    import torch.distributed.checkpoint as dcp

    marker = read_marker(step_dir)  # raises UserError for an incomplete or damaged checkpoint
    verify_checksums(step_dir, marker)
    metadata = read_dcp_metadata(step_dir)
    cfg = marker.get("model")
    try:
        model = build_model_from_config(cfg, "cpu", attn_backend="math")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(damaged(step_dir, f"its {MARKER} records no model config a model can be built from "
                                          f"({type(e).__name__}: {e})")) from None
    model.to_empty(device="cpu")
    state = {k: v for k, v in model.state_dict().items()}
    _check_saved_shapes(step_dir, state, metadata)
    size = getattr(metadata.state_dict_metadata.get(TRAIN_STATE), "size", None)  # None: no training state saved
    blobs = {} if size is None else {TRAIN_STATE: torch.empty(size, dtype=torch.uint8)}
    with single_process_dcp():
        dcp.load({"model": state, **blobs}, checkpoint_id=str(step_dir), no_dist=True)
    bad = first_nonfinite(state)
    if bad is not None:
        raise UserError(damaged(step_dir, f"its weights hold non-finite values (first: {bad})"))
    tokens = from_json_tensor(blobs[TRAIN_STATE]).get("tokens_seen") if blobs else None
    return {**cfg, "dtype": "float32", "step": int(marker["step"]),
            **({} if tokens is None else {"tokens_seen": int(tokens)})}, state


def _check_saved_shapes(step_dir: Path, state: dict[str, torch.Tensor], metadata: Any) -> None:
    """UserError where the model the marker describes is not the one the checkpoint holds (a hand-edited marker):
    DCP loads only the tensors asked for, so a marker edited to fewer layers gave a smaller model without a word,
    and other shapes a DCP traceback."""
    saved = {k.removeprefix("model."): tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    ours = {k: tuple(v.shape) for k, v in state.items()}
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        k = differ[0]
        raise UserError(damaged(step_dir, f"its {MARKER} describes a model whose {k} is "
                                          f"{ours.get(k) or 'absent'}, but the checkpoint holds "
                                          f"{saved.get(k) or 'no such tensor'}"))


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
               attn_backend: str = "auto", max_seq_len: int | None = None) -> TransEncoder:
    """Builds a TransEncoder in eval mode from an export folder, a ``step-N`` checkpoint or a dump folder.

    Args:
        path: export folder (``model.safetensors`` + ``config.json``), DCP ``step-N`` folder (model weights
            only are read) or dump folder (its newest complete checkpoint, else its export).
        device: where the model lives.
        dtype: parameter dtype; None keeps the stored one (the export dtype, float32 for checkpoints).
        attn_backend: as ``model.attn_backend``; "auto" picks by device.
        max_seq_len: longest sequence the RoPE cache covers (default: the training seq_len).

    Returns:
        the model, with ``model.config`` (the config JSON, including ``step``); ``model(tokens, targets,
        token_weights)`` computes the masked cross-entropy as in training.
    """
    cfg, state = read_model_weights(path)
    if max_seq_len is not None:
        cfg = {**cfg, "max_seq_len": int(max_seq_len)}
    model = build_model_from_config(cfg, device, attn_backend)
    missing = set(model.state_dict()) - set(state)
    unexpected = set(state) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"weights in {path} do not match a {cfg.get('flavor')} model: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    model.load_state_dict(state, assign=True)
    model.rope = torch.empty(0)  # the meta buffer cannot move; the real one is built below
    model.to(device=device, dtype=dtype)
    # RoPE stays float32 whatever the weights' dtype, as in training (attention casts it per call)
    model.rope = rope_cache(model.max_seq_len, model.args.head_dim, model.args.rope_theta, device=torch.device(device))
    model.config = cfg
    return model.eval()
