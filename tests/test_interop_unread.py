"""Reading a Hugging Face state dict reports, in the same pass, the tensors no parameter read."""

from __future__ import annotations

import torch

from dlm_titan.interop.hf_format import from_hf_state, to_hf_state
from dlm_titan.models import ModelArgs, build_transencoder, model_config


def test_from_hf_state_reports_what_it_did_not_read():
    model = build_transencoder(ModelArgs(2, 4, 32, 64, vocab_size=40, n_kv_heads=2), 16, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    cfg, state = model_config(model, "tiny"), model.state_dict()
    hf = to_hf_state(state, cfg)
    read, unread = from_hf_state(hf, cfg)
    assert unread == [] and read.keys() == state.keys()
    assert all(torch.equal(read[k], state[k]) for k in state)

    hf["model.layers.1.self_attn.q_proj.bias"] = torch.zeros(32)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # a buffer, not a weight
    one_layer = dict(cfg, n_layers=1)  # a config.json edited to fewer layers: layer 1 is never read
    _, unread = from_hf_state(hf, one_layer)
    assert unread[0] == "model.layers.1.input_layernorm.weight"
    assert "model.layers.1.self_attn.q_proj.bias" in unread and len(unread) == 10
    assert not any(k.endswith("inv_freq") for k in unread)
