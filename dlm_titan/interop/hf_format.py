"""dlm_titan's Hugging Face model folder: what :mod:`.hf_export` writes and the loaders read back.

Parameter names follow transformers' Llama naming (``model.layers.{i}.self_attn.q_proj.weight``, ...); dlm_titan's
fused ``wqkv`` is stored as separate q, k and v projections (its rows are q, then k, then v). ``config.json`` holds
the transformers configuration (``model_type = "dlm_titan"``, ``auto_map``) and what the trainer knows beyond the
shape (``flavor``, ``step``, ``tokens_seen``, ``final_loss``; attributes of the loaded config too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dlm_titan.errors import UserError, first_and_more

MODEL_TYPE = "dlm_titan"
TEMPLATES = ("configuration_dlm_titan.py", "modeling_dlm_titan.py", "diffusion_rule.py")
"""The code files (interop/templates) copied into every folder; modeling_dlm_titan.py imports the other two."""
ARCHITECTURE = "DlmTitanForMaskedLM"
AUTO_MAP = {
    "AutoConfig": "configuration_dlm_titan.DlmTitanConfig",
    "AutoModel": "modeling_dlm_titan.DlmTitanModel",
    "AutoModelForMaskedLM": "modeling_dlm_titan.DlmTitanForMaskedLM",
}
CAUSAL_ARCHITECTURE = "DlmTitanForCausalLM"
CAUSAL_AUTO_MAP = {**AUTO_MAP, "AutoModelForCausalLM": "modeling_dlm_titan.DlmTitanForCausalLM"}
"""The autoregressive baseline's folder also loads as AutoModelForCausalLM (its architecture)."""

# dlm_titan name (per block, after "layers.{i}.") -> HF name (after "model.layers.{i}."), wqkv apart.
_BLOCK = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w_gate.weight": "mlp.gate_proj.weight",
    "feed_forward.w_up.weight": "mlp.up_proj.weight",
    "feed_forward.w_down.weight": "mlp.down_proj.weight",
}
_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_QKV = ("q_proj", "k_proj", "v_proj")


def qkv_sizes(cfg: dict[str, Any]) -> list[int]:
    """Rows of q, k and v in a fused ``wqkv`` of the shape ``cfg`` (:func:`dlm_titan.models.model_config`)."""
    head_dim = int(cfg["dim"]) // int(cfg["n_heads"])
    kv = int(cfg.get("n_kv_heads") or cfg["n_heads"])
    return [int(cfg["n_heads"]) * head_dim, kv * head_dim, kv * head_dim]


def to_hf_state(state: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """dlm_titan parameter names -> HF names, the fused QKV split into q, k, v."""
    out = {hf: state[ours] for ours, hf in _TOP.items()}
    for i in range(int(cfg["n_layers"])):
        for ours, hf in _BLOCK.items():
            out[f"model.layers.{i}.{hf}"] = state[f"layers.{i}.{ours}"]
        for name, part in zip(_QKV, state[f"layers.{i}.attention.wqkv.weight"].split(qkv_sizes(cfg)), strict=True):
            out[f"model.layers.{i}.self_attn.{name}.weight"] = part
    return out


def from_hf_state(hf: dict[str, torch.Tensor], cfg: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF names -> dlm_titan names (q, k, v fused) for a model of shape ``cfg``, and the names in ``hf`` that no
    parameter read, sorted (layers beyond ``n_layers``, biases: weights that would be dropped; see
    :func:`check_no_unexpected`). RoPE's ``rotary_emb.inv_freq`` buffers, which older transformers saved and which
    hold no parameter, are not reported. KeyError names a missing HF parameter."""
    read: set[str] = set()

    def take(name: str) -> torch.Tensor:
        read.add(name)
        return hf[name]

    out = {ours: take(name) for ours, name in _TOP.items()}
    for i in range(int(cfg["n_layers"])):
        for ours, name in _BLOCK.items():
            out[f"layers.{i}.{ours}"] = take(f"model.layers.{i}.{name}")
        parts = [take(f"model.layers.{i}.self_attn.{name}.weight") for name in _QKV]
        out[f"layers.{i}.attention.wqkv.weight"] = torch.cat(parts)
    unread = sorted(k for k in hf if k not in read and not k.endswith("rotary_emb.inv_freq"))
    return out, unread


def check_no_unexpected(unread: list[str], cfg: dict[str, Any], where: Path) -> None:
    """UserError naming the first tensor of a Hugging Face folder that no parameter of the model its config.json
    describes reads (``unread`` from :func:`from_hf_state`): such weights would be dropped without a word (a
    config.json edited to fewer layers, biases the model has none of), leaving another model than the folder
    holds."""
    if unread:
        raise UserError(f"{where}: the weights hold {first_and_more(unread)}, which the model its config.json describes "
                        f"(num_hidden_layers = {cfg['n_layers']}, no biases) has no parameter for; restore the "
                        "config.json that came with these weights (dlm_titan implements no bias terms)")


def hf_config(cfg: dict[str, Any], dtype: str, info: dict[str, Any], special: dict[str, int]) -> dict[str, Any]:
    """config.json of a model of shape ``cfg`` (see :func:`dlm_titan.models.model_config`).

    Args:
        cfg: the dlm_titan shape.
        dtype: the weights' dtype name.
        info: trainer facts (flavor, step, tokens_seen, final_loss), kept as top-level keys.
        special: ``bos_token_id`` / ``eos_token_id`` of the tokenizer (absent ones omitted).
    """
    causal = bool(cfg.get("causal", False))
    return {
        "model_type": MODEL_TYPE,
        "architectures": [CAUSAL_ARCHITECTURE if causal else ARCHITECTURE],
        "auto_map": dict(CAUSAL_AUTO_MAP if causal else AUTO_MAP),
        "vocab_size": int(cfg["vocab_size"]) + (0 if causal else 1),  # input ids, the mask token included
        "hidden_size": int(cfg["dim"]),
        "intermediate_size": int(cfg["ffn_dim"]),
        "num_hidden_layers": int(cfg["n_layers"]),
        "num_attention_heads": int(cfg["n_heads"]),
        "num_key_value_heads": int(cfg.get("n_kv_heads") or cfg["n_heads"]),
        "rms_norm_eps": float(cfg.get("norm_eps", 1e-5)),
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "max_position_embeddings": int(cfg["max_seq_len"]),
        "causal": causal,
        "mask_token_id": None if causal else int(cfg["vocab_size"]),
        "tie_word_embeddings": False,
        "dtype": dtype,
        "torch_dtype": dtype,  # transformers 4.x reads this name (5.x reads dtype, and takes either)
        **special,
        **info,
    }


def is_dlm_titan_hf_config(config: dict[str, Any]) -> bool:
    return config.get("model_type") == MODEL_TYPE


def shape_from_hf_config(config: dict[str, Any], where: Path) -> dict[str, Any]:
    """The dlm_titan shape (and step, dtype, flavor) recorded in one of our config.json files (``where``);
    UserError naming a field that is missing or no number (a hand-edited file), not a KeyError or ValueError."""
    try:
        return _shape_from_hf_config(config)
    except KeyError as e:
        raise UserError(f"{where} lacks {e.args[0]!r}; restore the config.json the export wrote "
                        "(or export the model again)") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where} holds a value that is not a number ({e}); restore the config.json the export "
                        "wrote (or export the model again)") from None


def _shape_from_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    causal = bool(config.get("causal", False))
    vocab = int(config["vocab_size"]) - (0 if causal else 1)  # the head's outputs: every input id but the mask
    return {
        "flavor": config.get("flavor", ""),
        "vocab_size": vocab,
        "max_seq_len": int(config.get("max_position_embeddings", 2048)),
        "mask_id": vocab,
        "n_layers": int(config["num_hidden_layers"]),
        "n_heads": int(config["num_attention_heads"]),
        "n_kv_heads": int(config.get("num_key_value_heads") or config["num_attention_heads"]),
        "dim": int(config["hidden_size"]),
        "ffn_dim": int(config["intermediate_size"]),
        "norm_eps": float(config.get("rms_norm_eps", 1e-5)),
        "rope_theta": float(config.get("rope_theta", 10000.0)),
        "causal": causal,
        "dtype": config.get("dtype") or config.get("torch_dtype") or "float32",  # transformers 4.x: torch_dtype only
        "step": int(config.get("step", 0)),
        "tokens_seen": int(config.get("tokens_seen", 0)),
    }
