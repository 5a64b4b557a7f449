"""A run initialised from a Hugging Face folder (``checkpoint.initial_load_path``) takes its shape from it.

Llama-family folders (and dlm_titan's own exports of such models) have no SMDM flavor: grouped-query attention,
rope_theta and width come from the folder's config.json, so ``model.flavor`` is ignored for them. So do the DCP
checkpoints of such a run (its second stage in another dump folder): their marker records the shape, and a shape
that is not the one of the flavor it names (or that names none) is taken as a folder's is. The vocabulary must
still be the run's ``model.vocab_size`` (the data were tokenized for it). SMDM/lit-gpt files and checkpoints of
SMDM flavors keep ``model.flavor``, checked against the weights when they load. An export of an SMDM flavor gives
the shape too, and must be ``model.flavor``'s: another flavor's is refused before the model is built (it used to
train the folder's flavor in place of the configured one without a word).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dlm_titan.checkpoint_layout import MARKER, find_checkpoint, is_dcp_folder, read_marker
from dlm_titan.errors import UserError
from dlm_titan.interop.formats import config_shape
from dlm_titan.models import TransEncoder, build_model, build_transencoder
from dlm_titan.models.flavors import ALIASES, FLAVORS, ModelArgs, get_model_args


@dataclass(frozen=True)
class InitialShape:
    """What ``checkpoint.initial_load_path`` says of a run's shape, read once: the model, the flavor the run records
    and its plan's log line all ask.

    Attributes:
        path: the run's ``checkpoint.initial_load_path`` ("" for none).
        shape: the model config of the folder (or of the checkpoint marker) when it, not ``model.flavor``, decides
            the model's shape, else None.
    """

    path: str
    shape: dict[str, Any] | None

    @classmethod
    def read(cls, initial_load_path: str) -> InitialShape:
        return cls(initial_load_path, _shape_of(initial_load_path))

    def model_args(self, vocab_size: int) -> ModelArgs | None:
        """The model arguments of the folder's shape, or None (flavor decides); UserError when its vocabulary is
        not the run's."""
        shape = self.shape
        if shape is None:
            return None
        if shape["vocab_size"] != vocab_size:
            raise UserError(f"checkpoint.initial_load_path {self.path} has a vocabulary of {shape['vocab_size']}; "
                            f"set --model.vocab_size {shape['vocab_size']} (and tokenize the data with its tokenizer)")
        return ModelArgs(int(shape["n_layers"]), int(shape["n_heads"]), int(shape["dim"]), int(shape["ffn_dim"]),
                         vocab_size=vocab_size, norm_eps=float(shape.get("norm_eps", 1e-5)),
                         rope_theta=float(shape.get("rope_theta", 10000.0)),
                         n_kv_heads=int(shape.get("n_kv_heads") or 0))

    def flavor(self, model_flavor: str) -> str:
        """The flavor the run records: ``model_flavor``, or the folder's own when it gives the shape ("" for a
        Llama folder: no SMDM flavor)."""
        if self.shape is None:
            return model_flavor
        return str(self.shape.get("flavor") or "") if _is_flavor_shape(self.shape) else ""

    def check_flavor(self, model_flavor: str) -> None:
        """UserError when the folder holds another SMDM flavor's model than ``model_flavor`` (a folder of no flavor,
        a Llama one, gives the shape whatever ``model.flavor`` says, as documented)."""
        theirs = self.flavor(model_flavor) if self.shape is not None else ""
        if theirs and ALIASES.get(theirs, theirs) != ALIASES.get(model_flavor, model_flavor):
            raise UserError(f"checkpoint.initial_load_path {self.path} holds a {theirs} model but model.flavor is "
                            f"{model_flavor}; set --model.flavor {theirs} to start from its weights, or leave "
                            f"checkpoint.initial_load_path out to train a fresh {model_flavor}")


def _shape_of(initial_load_path: str) -> dict[str, Any] | None:
    """The shape recorded for ``initial_load_path`` when it, not model.flavor, decides the model's, else None."""
    if not initial_load_path:
        return None
    path = Path(initial_load_path)
    shape = config_shape(path)  # a Hugging Face or Llama folder (its config.json parsed once)
    if shape is None and path.is_dir():
        return _checkpoint_shape(path)
    return shape


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


def run_flavor(cfg, initial: InitialShape | None = None) -> str:
    """The flavor a run records (checkpoint markers, exports): ``model.flavor``, or, when the initial folder gives
    the shape, that folder's own ("" for a Llama folder: no SMDM flavor), never the ignored ``model.flavor``.
    ``initial``: the run's :class:`InitialShape` where already read."""
    return (initial or InitialShape.read(cfg.checkpoint.initial_load_path)).flavor(cfg.model.flavor)


def build_training_model(cfg, max_seq_len: int, device: torch.device, causal: bool = False,
                         initial: InitialShape | None = None) -> TransEncoder:
    """:func:`dlm_titan.models.build_model`, or a model of the initial folder's shape (see the module doc).
    ``initial``: the run's :class:`InitialShape` where already read. UserError when the folder holds another SMDM
    flavor than ``model.flavor``."""
    initial = initial or InitialShape.read(cfg.checkpoint.initial_load_path)
    initial.check_flavor(cfg.model.flavor)
    args = initial.model_args(cfg.model.vocab_size)
    if args is None:
        return build_model(cfg.model, max_seq_len, device, causal)
    return build_transencoder(args, max_seq_len, cfg.model.attn_backend, device, causal)
