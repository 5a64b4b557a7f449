"""A run initialised from a Hugging Face folder (``checkpoint.initial_load_path``) takes its shape from it.

Llama-family folders (and dlm_titan's own exports of such models) have no SMDM flavor: grouped-query attention,
rope_theta and width come from the folder's config.json, so ``model.flavor`` is ignored for them. So do the DCP
checkpoints of such a run (its second stage in another dump folder): their marker records the shape, and a shape
that is not the one of the flavor it names (or that names none) is taken as a folder's is. The vocabulary must
still be the run's ``model.vocab_size`` (the data were tokenized for it). SMDM/lit-gpt files and checkpoints of
SMDM flavors keep ``model.flavor``, checked against the weights when they load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlm_titan.checkpoint_layout import MARKER, find_checkpoint, is_dcp_folder, read_marker
from dlm_titan.errors import UserError
from dlm_titan.interop.formats import interop_kind, interop_shape
from dlm_titan.models import TransEncoder, build_model, build_transencoder
from dlm_titan.models.flavors import ALIASES, FLAVORS, ModelArgs, get_model_args


def _shape_of(initial_load_path: str) -> dict[str, Any] | None:
    """The shape recorded for ``initial_load_path`` when it, not model.flavor, decides the model's, else None."""
    if not initial_load_path:
        return None
    path = Path(initial_load_path)
    kind = interop_kind(path)
    if kind in ("hf", "llama"):
        return interop_shape(path)
    if kind is None and path.is_dir():
        return _checkpoint_shape(path)
    return None


def _checkpoint_shape(path: Path) -> dict[str, Any] | None:
    """The model config in the marker of a DCP checkpoint (a ``step-N`` folder, or a dump folder's newest complete
    one) whose shape is no SMDM flavor's; None for any other folder (the loader reports what is wrong with it)."""
    step_dir = path if is_dcp_folder(path) else find_checkpoint(path, warn=False)
    if step_dir is None or not (step_dir / MARKER).is_file():
        return None
    try:
        saved = read_marker(step_dir).get("model") or {}
    except UserError:
        return None  # incomplete or damaged: the load says so
    if not saved or _is_flavor_shape(saved):
        return None
    return saved


def _is_flavor_shape(saved: dict[str, Any]) -> bool:
    """Whether a recorded model config is the shape of the SMDM flavor it names."""
    if ALIASES.get(saved.get("flavor"), saved.get("flavor")) not in FLAVORS:
        return False
    a = get_model_args(saved["flavor"], int(saved["vocab_size"]))
    return (a.n_layers, a.n_heads, a.dim, a.ffn_dim, a.kv_heads, a.rope_theta, a.norm_eps) == (
        saved["n_layers"], saved["n_heads"], saved["dim"], saved["ffn_dim"], saved.get("n_kv_heads") or saved["n_heads"],
        saved.get("rope_theta", 10000.0), saved.get("norm_eps", 1e-5))


def folder_model_args(initial_load_path: str, vocab_size: int) -> ModelArgs | None:
    """The shape of a Hugging Face folder (or of a checkpoint of a run shaped by one) named by
    ``initial_load_path``, or None (flavor decides)."""
    shape = _shape_of(initial_load_path)
    if shape is None:
        return None
    if shape["vocab_size"] != vocab_size:
        raise UserError(f"checkpoint.initial_load_path {initial_load_path} has a vocabulary of {shape['vocab_size']}; "
                        f"set --model.vocab_size {shape['vocab_size']} (and tokenize the data with its tokenizer)")
    return ModelArgs(int(shape["n_layers"]), int(shape["n_heads"]), int(shape["dim"]), int(shape["ffn_dim"]),
                     vocab_size=vocab_size, norm_eps=float(shape.get("norm_eps", 1e-5)),
                     rope_theta=float(shape.get("rope_theta", 10000.0)), n_kv_heads=int(shape.get("n_kv_heads") or 0))


def run_flavor(cfg) -> str:
    """The flavor a run records (checkpoint markers, exports): ``model.flavor``, or, when the initial folder gives
    the shape, that folder's own ("" for a Llama folder: no SMDM flavor), never the ignored ``model.flavor``."""
    shape = _shape_of(cfg.checkpoint.initial_load_path)
    if shape is None:
        return cfg.model.flavor
    return str(shape.get("flavor") or "") if _is_flavor_shape(shape) else ""


def build_training_model(cfg, max_seq_len: int, device: torch.device, causal: bool = False) -> TransEncoder:
    """:func:`dlm_titan.models.build_model`, or a model of the initial folder's shape (see the module doc)."""
    args = folder_model_args(cfg.checkpoint.initial_load_path, cfg.model.vocab_size)
    if args is None:
        return build_model(cfg.model, max_seq_len, device, causal)
    return build_transencoder(args, max_seq_len, cfg.model.attn_backend, device, causal)
