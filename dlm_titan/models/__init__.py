"""SMDM model family: flavors, the TransEncoder and its attention."""

from __future__ import annotations

import torch

from dlm_titan.models.attention import resolve_attn_backend
from dlm_titan.models.flavors import ALIASES, FLAVORS, ModelArgs, get_model_args
from dlm_titan.models.transformer import TransEncoder

__all__ = ["ALIASES", "FLAVORS", "ModelArgs", "TransEncoder", "build_model", "get_model_args"]


def build_model(model_cfg, max_seq_len: int, device: torch.device, causal: bool = False) -> TransEncoder:
    """Builds a TransEncoder on the meta device from the ``model`` config section (no memory allocated).

    Args:
        model_cfg: the ``model`` section (flavor, vocab_size, attn_backend).
        max_seq_len: longest sequence the RoPE cache covers.
        device: the device it will run on, used to resolve attn_backend = "auto".
        causal: the autoregressive baseline (``training.objective = "ar"``): causal attention, no mask row.
    """
    args = get_model_args(model_cfg.flavor, model_cfg.vocab_size)
    backend = resolve_attn_backend(model_cfg.attn_backend, device)
    with torch.device("meta"):
        return TransEncoder(args, max_seq_len=max_seq_len, attn_backend=backend, causal=causal)
