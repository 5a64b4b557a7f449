"""Llama-family Hugging Face folders (``LlamaForCausalLM``: config.json + safetensors, e.g. TinyLlama) as
dlm_titan models, the starting point of AR-to-diffusion continued pretraining (DiffuLLaMA, Dream, Open-dLLM).

The shape comes from the folder's config.json: grouped-query attention (``num_key_value_heads``), ``rope_theta``
and the vocabulary are kept. Parameters map one to one onto dlm_titan's (``model.layers.i.self_attn.q_proj`` ...,
the names of :mod:`.hf_format`), q, k and v fused into ``wqkv`` without any permutation: transformers' Llama
already stores q and k for the rotate-half (GPT-NeoX) RoPE that dlm_titan uses (``rotate_half(x) = [-x2, x1]``,
cos/sin of ``cat(freqs, freqs)``, inverse frequencies ``theta^(-2i/head_dim)``).

Two things are added: tied input/output embeddings are untied (the head starts as a copy of the embedding), and
the embedding gains the mask-token row at id ``vocab_size``, initialised to the mean of the token embeddings (an
input of the embedding's own scale that favours no token; the head never predicts it). Attention becomes
bidirectional as soon as the model is used as a diffusion model (Dream's recipe); a causal Llama can also be
loaded as the autoregressive baseline (``causal``). Features dlm_titan does not implement are refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dlm_titan.errors import UserError
from dlm_titan.interop.hf_format import check_no_unexpected, from_hf_state
from dlm_titan.interop.mask_row import with_mask_row
from dlm_titan.interop.safetensors_io import read_weights

ARCHITECTURES = ("LlamaForCausalLM",)


def is_llama_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == "llama" or any(a in ARCHITECTURES for a in config.get("architectures") or [])


def _rope_theta(config: dict[str, Any], where: Path) -> float:
    """rope_theta of a transformers 4 (``rope_theta``, ``rope_scaling``) or 5 (``rope_parameters``) config."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not implemented in dlm_titan (only plain RoPE); "
                        "use a checkpoint without rope_scaling")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def llama_shape(config: dict[str, Any], where: Path, max_seq_len: int | None = None) -> dict[str, Any]:
    """dlm_titan's shape of a Llama config.json; UserError naming the first unsupported feature."""
    arch = config.get("architectures") or ["?"]
    if not any(a in ARCHITECTURES for a in arch):
        raise UserError(f"{where}: architecture {arch[0]} is not supported (only {', '.join(ARCHITECTURES)})")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UserError(f"{where}: {key} = true is not supported (dlm_titan's layers have no biases)")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):  # transformers' two names of x * sigmoid(x)
        raise UserError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (SwiGLU uses silu)")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        shape = {
            "flavor": "", "vocab_size": int(config["vocab_size"]), "mask_id": int(config["vocab_size"]),
            "max_seq_len": int(max_seq_len or config.get("max_position_embeddings", 2048)),
            "n_layers": int(config["num_hidden_layers"]), "n_heads": heads,
            "n_kv_heads": int(config.get("num_key_value_heads") or heads), "dim": dim,
            "ffn_dim": int(config["intermediate_size"]), "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": _rope_theta(config, where), "causal": False, "step": 0,
        }
    except KeyError as e:
        raise UserError(f"{where}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a hand-edited field: null or text where a number belongs
        raise UserError(f"{where} holds a value that is not a number ({e}); restore the model's own config.json") from None
    if int(config.get("head_dim") or dim // heads) != dim // heads:
        raise UserError(f"{where}: head_dim {config['head_dim']} differs from hidden_size / num_attention_heads "
                        f"({dim // heads}); not supported")
    return shape


def read_llama(folder: Path, max_seq_len: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, state dict in dlm_titan names) of a Llama folder: untied, with the mask row appended."""
    config = json.loads((folder / "config.json").read_text())
    shape = llama_shape(config, folder / "config.json", max_seq_len)
    hf = read_weights(folder)
    if "lm_head.weight" not in hf and config.get("tie_word_embeddings") and "model.embed_tokens.weight" in hf:
        hf["lm_head.weight"] = hf["model.embed_tokens.weight"].clone()  # untied: the head trains on its own
    try:
        state, unread = from_hf_state(hf, shape)
    except KeyError as e:
        raise UserError(f"{folder}: the weights lack {e.args[0]!r}") from None
    check_no_unexpected(unread, shape, folder)
    return shape, with_mask_row(state)
