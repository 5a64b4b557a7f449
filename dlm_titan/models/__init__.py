"""SMDM model family: flavors, the TransEncoder and its attention, and the one way to build a model.

A model is built on the meta device from its shape (:class:`ModelArgs`), either named by a flavor in the run's
``model`` config section (:func:`build_model`) or recorded as JSON in a checkpoint or export
(:func:`model_config` writes it, :func:`build_model_from_config` reads it back).
"""

from __future__ import annotations

from typing import Any

import torch

from dlm_titan.models.attention import resolve_attn_backend
from dlm_titan.models.flavors import ALIASES, FLAVORS, ModelArgs, get_model_args
from dlm_titan.models.transformer import LossFn, TransEncoder, default_loss

__all__ = [
    "ALIASES", "FLAVORS", "LossFn", "ModelArgs", "TransEncoder", "build_model", "build_model_from_config",
    "build_transencoder", "default_loss", "get_model_args", "model_config",
]


def build_transencoder(args: ModelArgs, max_seq_len: int, attn_backend: str, device: str | torch.device,
                       causal: bool = False) -> TransEncoder:
    """A TransEncoder of shape ``args`` on the meta device (no memory allocated): parallelize it, then
    materialize it with ``to_empty`` and initialise or load its weights.

    Args:
        args: the model's shape.
        max_seq_len: longest sequence the RoPE cache covers.
        attn_backend: as ``model.attn_backend``; "auto" is resolved for ``device``.
        device: the device it will run on.
        causal: the autoregressive baseline (``training.objective = "ar"``): causal attention, no mask row.
    """
    backend = resolve_attn_backend(attn_backend, torch.device(device))
    with torch.device("meta"):
        return TransEncoder(args, max_seq_len=max_seq_len, attn_backend=backend, causal=causal)


def build_model(model_cfg, max_seq_len: int, device: torch.device, causal: bool = False) -> TransEncoder:
    """Builds a TransEncoder on the meta device from the ``model`` config section (no memory allocated).

    Args:
        model_cfg: the ``model`` section (flavor, vocab_size, attn_backend).
        max_seq_len: longest sequence the RoPE cache covers.
        device: the device it will run on, used to resolve attn_backend = "auto".
        causal: the autoregressive baseline (``training.objective = "ar"``): causal attention, no mask row.
    """
    args = get_model_args(model_cfg.flavor, model_cfg.vocab_size)
    return build_transencoder(args, max_seq_len, model_cfg.attn_backend, device, causal)


def model_config(model: TransEncoder, flavor: str) -> dict[str, Any]:
    """The JSON description of a model's shape, enough to rebuild it (written in exports and checkpoints)."""
    a: ModelArgs = model.args
    return {
        "flavor": flavor,
        "vocab_size": a.vocab_size,
        "max_seq_len": int(model.max_seq_len),
        "mask_id": a.mask_id,
        "n_layers": a.n_layers,
        "n_heads": a.n_heads,
        "n_kv_heads": a.kv_heads,
        "dim": a.dim,
        "ffn_dim": a.ffn_dim,
        "norm_eps": a.norm_eps,
        "rope_theta": a.rope_theta,
        "causal": bool(model.causal),  # the autoregressive baseline: causal attention, no mask row
    }


def build_model_from_config(cfg: dict[str, Any], device: str | torch.device = "cpu",
                            attn_backend: str = "auto") -> TransEncoder:
    """An uninitialized TransEncoder (on the meta device) of the shape in ``cfg`` (see :func:`model_config`)."""
    args = ModelArgs(int(cfg["n_layers"]), int(cfg["n_heads"]), int(cfg["dim"]), int(cfg["ffn_dim"]),
                     vocab_size=int(cfg["vocab_size"]), norm_eps=float(cfg.get("norm_eps", 1e-5)),
                     rope_theta=float(cfg.get("rope_theta", 10000.0)), n_kv_heads=int(cfg.get("n_kv_heads", 0)))
    return build_transencoder(args, int(cfg["max_seq_len"]), attn_backend, device, bool(cfg.get("causal", False)))
