"""The autoregressive objective (``training.objective = "ar"``) used the wrong way round, as a user would: its
Hugging Face export loaded with the masked-LM class, its runs plotted and logged with diffusion-only views, and
isoFLOP comparisons collected before both objectives finished."""

from __future__ import annotations

import os

import pytest
import torch

from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 256  # no tokenizer needed


def tiny(causal: bool) -> torch.nn.Module:
    model = build_transencoder(ModelArgs(2, 4, 64, 96, vocab_size=VOCAB), 32, "math", "cpu", causal=causal)
    model.to_empty(device="cpu")
    model.init_weights(4)
    return model.eval()


def test_ar_export_is_refused_as_a_masked_lm(tmp_path):
    """An AR folder loaded with AutoModelForMaskedLM gave a causal model under a masked-LM head whose labels are not
    shifted (a meaningless loss), without a word; it now says to use AutoModelForCausalLM, as the causal class
    says the reverse for a diffusion folder."""
    transformers = pytest.importorskip("transformers")
    model = tiny(causal=True)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)).__name__ == (
        "DlmTitanForCausalLM")
