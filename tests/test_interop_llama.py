"""Llama-family folders in: a tiny random LlamaForCausalLM (grouped-query attention, tied embeddings, rope_theta
500000) saved by transformers imports with its parameters equal under the documented mapping, and gives
transformers' logits (the last position of a one-layer model, which sees every token under causal and
bidirectional attention alike; every position of a two-layer model loaded causal); unsupported features and other
architectures are one line, exit 2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from harness import user_error_line

from dlm_titan.checkpoint.export import load_model
from dlm_titan.interop.formats import read_interop
from dlm_titan.models import build_model_from_config
from dlm_titan.models.attention import rope_cache
from scripts.export_checkpoint import main as export_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB, HEADS, KV_HEADS, DIM = 96, 4, 2, 32


def save_llama(folder, layers: int, **overrides):
    """A random LlamaForCausalLM written by transformers (norm weights randomised too, so a swapped norm shows)."""
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=48,
                                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                                      tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=64,
                                      **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 2 else 1.0)
    model.save_pretrained(folder)
    return model


def test_parameters_equal_under_the_mapping(tmp_path):
    hf = save_llama(tmp_path, layers=2)
    assert "lm_head.weight" not in transformers.modeling_utils.load_state_dict(str(tmp_path / "model.safetensors"))
    cfg, state = read_interop(tmp_path)
    assert (cfg["n_heads"], cfg["n_kv_heads"], cfg["rope_theta"], cfg["vocab_size"], cfg["norm_eps"]) == (
        HEADS, KV_HEADS, 500000.0, VOCAB, hf.config.rms_norm_eps)
    src = hf.state_dict()
    emb = src["model.embed_tokens.weight"]
    assert torch.equal(state["tok_embeddings.weight"][:VOCAB], emb)
    assert torch.allclose(state["tok_embeddings.weight"][VOCAB], emb.mean(0))  # the mask row: mean embedding
    assert torch.equal(state["output.weight"], emb)  # untied: a copy of the tied embedding
    assert state["output.weight"].data_ptr() != state["tok_embeddings.weight"].data_ptr()
    assert torch.equal(state["norm.weight"], src["model.norm.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        qkv = torch.cat([src[p + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        assert torch.equal(state[f"layers.{i}.attention.wqkv.weight"], qkv)  # no permutation of q or k
        for ours, theirs in [("attention.wo", "self_attn.o_proj"), ("feed_forward.w_gate", "mlp.gate_proj"),
                             ("feed_forward.w_up", "mlp.up_proj"), ("feed_forward.w_down", "mlp.down_proj"),
                             ("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]:
            assert torch.equal(state[f"layers.{i}.{ours}.weight"], src[p + theirs + ".weight"])


@pytest.mark.parametrize("hidden_act", ["silu", "swish"])  # transformers' two names of the same function
def test_one_layer_last_position_logits_equal_transformers(tmp_path, hidden_act):
    hf = save_llama(tmp_path, layers=1)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": hidden_act}))
    model = load_model(tmp_path, attn_backend="math")
    assert not model.causal and model.args.kv_heads == KV_HEADS
    tokens = torch.randint(0, VOCAB, (3, 13))
    with torch.no_grad():
        want, got = hf(tokens).logits[:, -1], model(tokens)[:, -1]
    assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_every_position_of_a_causal_import_equals_transformers(tmp_path):
    """Loaded as the autoregressive baseline (causal, no mask row), every position matches: RoPE layout, GQA
    grouping and rope_theta are right at each position, not only where attention sees everything."""
    hf = save_llama(tmp_path, layers=2)
    cfg, state = read_interop(tmp_path)
    model = build_model_from_config({**cfg, "causal": True}, "cpu", attn_backend="math")
    state["tok_embeddings.weight"] = state["tok_embeddings.weight"][:VOCAB]
    model.load_state_dict(state, assign=True)
    model.rope = rope_cache(model.max_seq_len, model.args.head_dim, model.args.rope_theta)
    tokens = torch.randint(0, VOCAB, (2, 17))
    with torch.no_grad():
        want, got = hf(tokens).logits, model(tokens)
    assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("overrides,named", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_llama_features_are_one_line_exit_2(tmp_path, capsys, overrides, named):
    folder = tmp_path / "llama"
    save_llama(folder, layers=1)
    config = json.loads((folder / "config.json").read_text())
    if "rope_scaling" in overrides:  # transformers 5 writes rope_parameters
        config["rope_parameters"] = {**overrides["rope_scaling"], "rope_theta": 500000.0}
    config.update({k: v for k, v in overrides.items() if k != "rope_scaling"})
    (folder / "config.json").write_text(json.dumps(config))
    assert named in user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_other_architectures_and_missing_weights_are_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "llama"
    save_llama(folder, layers=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                    "model_type": "gpt2"}))
    assert "GPT2LMHeadModel is not supported" in user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "o")])
    (folder / "config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.weight" in user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "o")])
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # not read: it would need unpickling
    assert "only safetensors" in user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_plan_line_names_the_folder_that_gives_the_shape(tmp_path):
    from dlm_titan.config import load_config
    from dlm_titan.interop.init_shape import build_training_model
    from dlm_titan.train import plan_summary

    save_llama(tmp_path / "llama", layers=2)
    cfg = load_config(["--checkpoint.initial_load_path", str(tmp_path / "llama"), "--model.vocab_size", str(VOCAB)])
    model = build_training_model(cfg, 16, torch.device("cpu"))
    line = plan_summary(cfg, model, 10, 1, 1, torch.device("cpu"), tmp_path)[0]
    assert line.startswith(f"model of {tmp_path / 'llama'}: 2 layers, d={DIM}")
    assert "6M" not in line
