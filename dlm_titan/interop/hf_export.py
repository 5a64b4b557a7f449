"""Writes a Hugging Face model folder of a dlm_titan model, loadable with transformers:

    config.json                  transformers config (model_type dlm_titan, auto_map) + trainer facts
    model.safetensors            weights (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    configuration_dlm_titan.py   standalone config and model code (torch + transformers only)
    modeling_dlm_titan.py
    diffusion_rule.py            the sampler's reveal rule (torch + numpy), imported by modeling_dlm_titan.py
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (see :mod:`.hf_tokenizer`)
    README.md                    model card

``AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)`` then gives dlm_titan's logits; the
autoregressive baseline's folder (``causal``) loads as ``AutoModelForCausalLM`` instead, with ``generate()``
(``AutoModelForMaskedLM`` refuses it: its labels are not shifted).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from dlm_titan.errors import UserError
from dlm_titan.fileio import atomic_write_text, fsync_folder
from dlm_titan.interop.hf_format import TEMPLATES, hf_config, to_hf_state
from dlm_titan.interop.hf_tokenizer import TOKENIZER_FILES, tokenizer_files
from dlm_titan.interop.safetensors_io import MAX_SHARD_BYTES, write_weights

CONFIG_FILE = "config.json"
_TEMPLATE_DIR = Path(__file__).parent / "templates"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def write_hf_folder(state: dict[str, torch.Tensor], cfg: dict[str, Any], out_dir: str | Path, dtype: str,
                    info: dict[str, Any], tokenizer_path: str | None = "", max_shard_bytes: int = MAX_SHARD_BYTES,
                    tokenizer_required: bool = False) -> Path:
    """Writes a full dlm_titan state dict as a Hugging Face model folder (weights first, config.json last).

    Args:
        state: full state dict with dlm_titan names (one process).
        cfg: the model's shape (:func:`dlm_titan.models.model_config`).
        out_dir: the folder (created; an earlier export there is replaced, its config.json removed first).
        dtype: "float32", "bfloat16" or "float16".
        info: trainer facts for config.json and the card: flavor, step, tokens_seen, final_loss (any may be absent).
        tokenizer_path: as ``data.tokenizer_path`` ("" = the embedded tokenizer); None = no tokenizer files.
        max_shard_bytes: weights above this size are sharded.
        tokenizer_required: a tokenizer that cannot be converted is a UserError, raised before anything is
            written, instead of a warning and a folder without tokenizer files.
    """
    if dtype not in DTYPES:
        raise UserError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    files, special, problem = _tokenizer(tokenizer_path, cfg, tokenizer_required)
    source = to_hf_state(state, cfg)
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in source.items()}
    _check_finite(source, tensors, dtype)
    out = _open_destination(Path(out_dir))
    if problem:
        print(f"warning: the export in {out} has no tokenizer: {problem}", file=sys.stderr)
    write_weights(tensors, out, max_shard_bytes)
    for name in TEMPLATES:
        shutil.copyfile(_TEMPLATE_DIR / name, out / name)
    for name in TOKENIZER_FILES:  # an earlier export's files go when this one has none
        if name in files:
            atomic_write_text(out / name, files[name])
        else:
            (out / name).unlink(missing_ok=True)
    info = {k: v for k, v in info.items() if v is not None}
    atomic_write_text(out / "README.md", model_card(cfg, dtype, info, has_tokenizer=special is not None))
    config = hf_config(cfg, dtype, info, special or {})
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out


def _check_finite(source: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """UserError, before anything is written, for weights that would be saved holding NaN or inf: a value beyond
    the range of ``dtype`` (float16's largest is 65504), which the cast turns into inf without a word, or weights
    that already hold them (a diverged model)."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            original = source[name].detach()
            if bool(torch.isfinite(original).all()):
                raise UserError(f"{name} holds {original.abs().max().item():.4g}, beyond the largest {dtype} value "
                                f"({torch.finfo(t.dtype).max:.4g}): a {dtype} export would hold inf there; export "
                                "in bfloat16 or float32 (--dtype, checkpoint.export_dtype)")
            raise UserError(f"the weights hold NaN or inf (first: {name}); the model diverged: export an earlier "
                            "checkpoint")


def _open_destination(out: Path) -> Path:
    """Creates ``out`` and takes an earlier export there out of service: its config.json goes first, so a write
    that dies half-way leaves a folder that is no model folder (config.json is written last), never one that
    loads the new weights under the old config or shards of two exports. UserError where no folder can be made."""
    if out.exists() and not out.is_dir():
        raise UserError(f"export destination {out} is a file, not a folder; choose another destination")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the export folder {out} ({e.strerror or e}); "
                        "choose another destination") from None
    fsync_folder(out)
    return out


def _tokenizer(tokenizer_path: str | None, cfg: dict[str, Any],
               required: bool) -> tuple[dict[str, str], dict[str, int] | None, str | None]:
    """The tokenizer files (name -> text), its BOS/EOS ids and None; ({}, None, why) when there is none or it
    cannot be converted (the weights of a finished run are still exported), a UserError then if ``required``."""
    if tokenizer_path is None:
        problem = "the source has no tokenizer files; pass --tokenizer_path to ship one"
        if required:
            raise UserError(problem)
        return {}, None, problem
    try:
        tok, files = tokenizer_files(tokenizer_path, int(cfg["vocab_size"]), int(cfg["max_seq_len"]),
                                     mask=not cfg.get("causal", False))
    except UserError as e:
        if required:
            raise
        return {}, None, str(e)
    return files, {k: v for k, v in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id)) if v >= 0}, None


def model_card(cfg: dict[str, Any], dtype: str, info: dict[str, Any], has_tokenizer: bool) -> str:
    """A short README.md: what the model is, its shape and training, how to load and sample it."""
    kind = "autoregressive baseline (causal)" if cfg.get("causal") else "masked diffusion language model (SMDM recipe)"
    facts = [f"- flavor: {info.get('flavor') or 'custom'}; {cfg['n_layers']} layers, d={cfg['dim']}, "
             f"{cfg['n_heads']} heads ({cfg.get('n_kv_heads') or cfg['n_heads']} key/value), d_ff={cfg['ffn_dim']}, "
             f"vocabulary {cfg['vocab_size']}" + ("" if cfg.get("causal") else f" + the mask token (id {cfg['vocab_size']})"),
             f"- weights: {dtype}; training sequence length {cfg['max_seq_len']}"]
    if "step" in info:
        facts.append(f"- training step {info['step']}" + (f", {info['tokens_seen']:,} tokens seen" if "tokens_seen" in info else ""))
    if "final_loss" in info:
        facts.append(f"- final training loss {info['final_loss']:.4f}")
    if not has_tokenizer:
        facts.append("- no tokenizer files: use the tokenizer the model was trained with")
    if cfg.get("causal"):
        return _causal_card(kind, facts)
    return f"""---
library_name: transformers
tags: [dlm_titan, masked-diffusion, smdm]
---
# dlm_titan {kind}

Trained with dlm_titan. Bidirectional LLaMA encoder (RMSNorm, RoPE, SwiGLU, no biases, untied head).

{chr(10).join(facts)}

## Load

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # (the flag spares a prompt: config.json has code)
ids = tok("The capital of France is", return_tensors="pt").input_ids  # no BOS/EOS added, as in training
logits = model(ids).logits                       # [1, L, vocab_size - 1]; the mask token is tok.mask_token_id
out = model.generate_diffusion(ids, length=64, steps=64, eos_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids.shape[1]:]))
```

Training documents were the tokenizer's tokens followed by EOS (no BOS). Sequences are never padded: batch
prompts of one length.
"""


def _causal_card(kind: str, facts: list[str]) -> str:
    """The model card of the autoregressive baseline: a causal LLaMA that loads as AutoModelForCausalLM."""
    return f"""---
library_name: transformers
tags: [dlm_titan, autoregressive, smdm]
---
# dlm_titan {kind}

Trained with dlm_titan as SMDM's autoregressive baseline (`training.objective = "ar"`): causal LLaMA (RMSNorm, RoPE,
SwiGLU, no biases, untied head), next-token loss.

{chr(10).join(facts)}

## Load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)
ids = tok("The capital of France is", return_tensors="pt").input_ids  # no BOS/EOS added, as in training
logits = model(ids).logits                       # [1, L, vocab_size]: the next token at every position
out = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=tok.eos_token_id)
print(tok.decode(out[0, ids.shape[1]:]))
```

Training documents were the tokenizer's tokens followed by EOS (no BOS). Sequences are never padded: batch
prompts of one length.
"""
