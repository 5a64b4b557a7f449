"""A run initialised from a Hugging Face folder (``checkpoint.initial_load_path``) takes its shape from it.

Llama-family folders (and dlm_titan's own exports of such models) have no SMDM flavor: grouped-query attention,
rope_theta and width come from the folder's config.json, so ``model.flavor`` is ignored for them. The vocabulary
must still be the run's ``model.vocab_size`` (the data were tokenized for it). SMDM/lit-gpt files and dlm_titan
checkpoints keep ``model.flavor``, checked against the weights when they load.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dlm_titan.errors import UserError
from dlm_titan.interop.formats import interop_kind, interop_shape
from dlm_titan.models import TransEncoder, build_model, build_transencoder
from dlm_titan.models.flavors import ModelArgs


def folder_model_args(initial_load_path: str, vocab_size: int) -> ModelArgs | None:
    """The shape of a Hugging Face folder named by ``initial_load_path``, or None (flavor decides)."""
    if not initial_load_path or interop_kind(Path(initial_load_path)) not in ("hf", "llama"):
        return None
    shape = interop_shape(Path(initial_load_path))
    if shape["vocab_size"] != vocab_size:
        raise UserError(f"checkpoint.initial_load_path {initial_load_path} has a vocabulary of {shape['vocab_size']}; "
                        f"set --model.vocab_size {shape['vocab_size']} (and tokenize the data with its tokenizer)")
    return ModelArgs(shape["n_layers"], shape["n_heads"], shape["dim"], shape["ffn_dim"], vocab_size=vocab_size,
                     norm_eps=shape["norm_eps"], rope_theta=shape["rope_theta"], n_kv_heads=shape["n_kv_heads"])


def build_training_model(cfg, max_seq_len: int, device: torch.device, causal: bool = False) -> TransEncoder:
    """:func:`dlm_titan.models.build_model`, or a model of the initial folder's shape (see the module doc)."""
    args = folder_model_args(cfg.checkpoint.initial_load_path, cfg.model.vocab_size)
    if args is None:
        return build_model(cfg.model, max_seq_len, device, causal)
    return build_transencoder(args, max_seq_len, cfg.model.attn_backend, device, causal)
