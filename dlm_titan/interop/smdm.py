"""SMDM's released checkpoints (lit-gpt state dicts: ``.safetensors``, ``.pth`` or ``.pt``) in dlm_titan's names.

lit-gpt's keys and their dlm_titan names (i = block):

    transformer.wte.weight              tok_embeddings.weight   (vocab + 1 rows: the mask token last; vocab rows =
                                                                 SMDM's autoregressive baseline, loaded as causal)
    transformer.h.i.norm_1.weight       layers.i.attention_norm.weight
    transformer.h.i.attn.attn.weight    layers.i.attention.wqkv.weight   (reordered, see below)
    transformer.h.i.attn.proj.weight    layers.i.attention.wo.weight
    transformer.h.i.norm_2.weight       layers.i.ffn_norm.weight
    transformer.h.i.mlp.swiglu.w1/w2/w3 layers.i.feed_forward.w_gate / w_up / w_down
    transformer.ln_f.weight             norm.weight
    lm_head.weight                      output.weight

lit-gpt's fused QKV (``CausalSelfAttention.forward``: ``view(B, T, n_query_groups, q_per_kv + 2, head_size)``)
stores, for each key/value group, its q_per_kv query heads, then its key head, then its value head; dlm_titan's
stores all query heads, then all key heads, then all value heads. Query head ``g * q_per_kv + j`` reads group g in
both. The shape (flavor) is looked up from (layers, width, SwiGLU width) in SMDM's table.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from dlm_titan.errors import UserError, first_and_more
from dlm_titan.models.flavors import ALIASES, FLAVORS, get_model_args

SUFFIXES = (".safetensors", ".pth", ".pt")
_BLOCK = {
    "norm_1.weight": "attention_norm.weight",
    "attn.proj.weight": "attention.wo.weight",
    "norm_2.weight": "ffn_norm.weight",
    "mlp.swiglu.w1.weight": "feed_forward.w_gate.weight",
    "mlp.swiglu.w2.weight": "feed_forward.w_up.weight",
    "mlp.swiglu.w3.weight": "feed_forward.w_down.weight",
}
_TOP = {"transformer.wte.weight": "tok_embeddings.weight", "transformer.ln_f.weight": "norm.weight",
        "lm_head.weight": "output.weight"}


def is_litgpt_file(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth``/``.pt`` checkpoint (read with ``weights_only``: no code is
    unpickled; a ``{"model": state_dict}`` wrapper as lit-gpt's training scripts save is unwrapped)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unpickling_error(path, e) from None
    except Exception as e:  # safetensors, pickle and zip errors have no common base
        why = " ".join(str(e).split())[:200]  # one line
        raise UserError(f"cannot read {path} as a state dict ({type(e).__name__}: {why})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    return {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}


def _unpickling_error(path: Path, error: pickle.UnpicklingError) -> UserError:
    """torch.load's weights-only refusal (several lines, terminal colours) as one line saying what it means."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if found is not None:
        return UserError(f"cannot read {path} without unpickling code: it holds a {found[1]} object besides tensors "
                         "(e.g. in training hyperparameters); where you trust the file, save its state dict alone "
                         "(torch.save(state_dict, ...) or safetensors' save_file) and convert that")
    cause = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
    why = " ".join((cause[1] if cause else text).split())[:200]
    return UserError(f"cannot read {path} as a torch state dict (UnpicklingError: {why})")


def _get(state: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor:
    if key not in state:
        raise UserError(f"{path} is not an SMDM/lit-gpt checkpoint: key {key!r} is missing")
    return state[key]


def infer_flavor(state: dict[str, torch.Tensor], path: Path, flavor: str | None = None) -> str:
    """The SMDM flavor whose (layers, width, SwiGLU width) the state dict has; ``flavor`` overrides the lookup but
    must fit. UserError for an unknown or ambiguous shape."""
    n_layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
    dim = _get(state, "transformer.wte.weight", path).shape[1]
    ffn = _get(state, "transformer.h.0.mlp.swiglu.w1.weight", path).shape[0]
    shape = f"{n_layers} layers, width {dim}, SwiGLU width {ffn}"
    if flavor:
        args = get_model_args(flavor)
        if (args.n_layers, args.dim, args.ffn_dim) != (n_layers, dim, ffn):
            raise UserError(f"--flavor {flavor} does not fit {path} ({shape}; {flavor} has {args.n_layers} layers, "
                            f"width {args.dim}, SwiGLU width {args.ffn_dim})")
        return ALIASES.get(flavor, flavor)
    matches = [f for f in FLAVORS if (lambda a: (a.n_layers, a.dim, a.ffn_dim))(get_model_args(f)) == (n_layers, dim, ffn)]
    if len(matches) != 1:
        what = "no SMDM flavor has" if not matches else f"several flavors ({', '.join(matches)}) have"
        raise UserError(f"{path}: {what} its shape ({shape}); pass --flavor NAME")
    return matches[0]


def litgpt_qkv_to_ours(w: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """lit-gpt's per-group [q heads of the group, k, v] rows -> [all q heads, all k heads, all v heads]."""
    q_per_kv = n_heads // n_kv_heads
    grouped = w.reshape(n_kv_heads, q_per_kv + 2, -1, w.shape[-1])
    q, k, v = grouped.split([q_per_kv, 1, 1], dim=1)
    return torch.cat([t.reshape(-1, w.shape[-1]) for t in (q, k, v)])


def read_litgpt(path: Path, flavor: str | None = None, max_seq_len: int = 2048) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(model config, state dict in dlm_titan names) of an SMDM/lit-gpt checkpoint file."""
    state = load_state_file(path)
    name = infer_flavor(state, path, flavor)
    vocab = _get(state, "lm_head.weight", path).shape[0]
    rows = state["transformer.wte.weight"].shape[0]
    if rows not in (vocab, vocab + 1):
        raise UserError(f"{path}: the embedding has {rows} rows for a head of {vocab} outputs (expected {vocab + 1}, "
                        f"or {vocab} for an autoregressive model)")
    args = get_model_args(name, vocab)
    cfg = {"flavor": name, "vocab_size": vocab, "max_seq_len": max_seq_len, "mask_id": vocab, "n_layers": args.n_layers,
           "n_heads": args.n_heads, "n_kv_heads": args.n_heads, "dim": args.dim, "ffn_dim": args.ffn_dim,
           "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "causal": rows == vocab, "step": 0}
    read: set[str] = set()

    def take(key: str) -> torch.Tensor:
        read.add(key)
        return _get(state, key, path)

    out = {ours: take(key) for key, ours in _TOP.items()}
    for i in range(args.n_layers):
        for key, ours in _BLOCK.items():
            out[f"layers.{i}.{ours}"] = take(f"transformer.h.{i}.{key}")
        w = take(f"transformer.h.{i}.attn.attn.weight")
        if tuple(w.shape) != (3 * args.dim, args.dim):
            raise UserError(f"{path}: transformer.h.{i}.attn.attn.weight has shape {tuple(w.shape)}, expected "
                            f"{(3 * args.dim, args.dim)} for {name}")
        out[f"layers.{i}.attention.wqkv.weight"] = litgpt_qkv_to_ours(w, args.n_heads, args.n_heads)
    # A tensor nothing read (biases, LayerNorm biases of another lit-gpt model of the same width) would be dropped,
    # loading another model than the file holds without a word.
    if unread := sorted(set(state) - read):
        raise UserError(f"{path} holds {first_and_more(unread)}, which SMDM's models (RMSNorm, SwiGLU, no biases) "
                        "have no parameter for: it is no SMDM checkpoint; dlm_titan reads SMDM's lit-gpt models only")
    return cfg, out
