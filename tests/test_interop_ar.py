"""The autoregressive baseline across formats: its Hugging Face export loads as AutoModelForCausalLM with dlm_titan's
logits (causal mask applied), transformers' generate() equals dlm_titan's greedy AR sampling, and AR weights
initialise a masked diffusion run (checkpoint.initial_load_path) with the mask row added (the mean of the token
embeddings), from an export or a DCP checkpoint; a diffusion model's weights start an AR run without it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from harness import run_trainer, tiny_run_args, write_random_shards

from dlm_titan.ar_sampling import ARSamplerConfig, generate
from dlm_titan.config import Model
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_model, build_transencoder, model_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 256  # no tokenizer needed (the exports warn that they have none)


def init(model):
    model.to_empty(device="cpu")
    model.init_weights(4)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_ar_export_loads_as_causal_lm(tmp_path):
    model = init(build_transencoder(ModelArgs(2, 4, 64, 96, vocab_size=VOCAB, n_kv_heads=2), 64, "math", "cpu", causal=True))
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DlmTitanForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_dlm_titan.DlmTitanForCausalLM"
    assert "AutoModelForCausalLM" in (tmp_path / "README.md").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(hf).__name__ == "DlmTitanForCausalLM"
    tokens = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        logits = hf(tokens).logits
        assert rel_err(logits, model(tokens)) < 1e-5
        changed = tokens.clone()
        changed[:, 8] = (changed[:, 8] + 1) % VOCAB  # causal: positions before 8 do not see it
        after = hf(changed).logits
        assert torch.equal(after[:, :8], logits[:, :8]) and not torch.allclose(after[:, 8:], logits[:, 8:])
        loss = hf(tokens, labels=tokens).loss  # labels shifted inside: position i predicts token i + 1
        want = torch.nn.functional.cross_entropy(logits[:, :-1].double().flatten(0, 1), tokens[:, 1:].flatten())
        assert loss.item() == pytest.approx(want.item(), rel=1e-5)
        out = hf.generate(tokens[:, :5], max_new_tokens=7, do_sample=False, pad_token_id=0)
    ours = generate(model, tokens[:, :5], ARSamplerConfig(max_new_tokens=7, temperature=0))
    assert torch.equal(out, ours)


def test_mdm_export_is_not_a_causal_lm(tmp_path):
    model = init(build_transencoder(ModelArgs(2, 4, 64, 96, vocab_size=VOCAB), 64, "math", "cpu"))
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})
    assert "AutoModelForCausalLM" not in json.loads((tmp_path / "config.json").read_text())["auto_map"]
    with pytest.raises((ValueError, KeyError)):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)


def _initial_state(argv: list[str]) -> dict[str, torch.Tensor]:
    """The model weights a Trainer of ``argv`` starts from."""
    from dlm_titan import distributed as dist_utils
    from dlm_titan.config import load_config
    from dlm_titan.train import Trainer

    try:
        return {k: v.detach().clone() for k, v in Trainer(load_config(argv)).model.state_dict().items()}
    finally:
        dist_utils.shutdown()


def _assert_mask_row_added(start: dict[str, torch.Tensor], ar: dict[str, torch.Tensor]) -> None:
    emb = ar["tok_embeddings.weight"]
    assert start["tok_embeddings.weight"].shape == (VOCAB + 1, emb.shape[1])
    assert torch.equal(start["tok_embeddings.weight"][:VOCAB], emb)
    torch.testing.assert_close(start["tok_embeddings.weight"][VOCAB].double(), emb.double().mean(0), rtol=0, atol=1e-6)
    assert all(torch.equal(start[k], v) for k, v in ar.items() if k != "tok_embeddings.weight")


@pytest.mark.slow
def test_ar_weights_initialise_an_mdm_run_and_back(tmp_path):
    from dlm_titan.checkpoint.export import load_model

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    ar = init(build_model(Model(flavor="6M", vocab_size=VOCAB), 32, torch.device("cpu"), causal=True))
    write_hf_folder(ar.state_dict(), model_config(ar, "6M"), tmp_path / "ar_export", "float32", {})
    mdm_args = tiny_run_args(data, tmp_path / "mdm", VOCAB, 1, 2, 2, 0)
    start = _initial_state([*mdm_args, "--checkpoint.initial_load_path", str(tmp_path / "ar_export")])
    _assert_mask_row_added(start, ar.state_dict())

    # a DCP checkpoint of an AR run likewise (the weights read whole, then the row added)
    ar_run = tiny_run_args(data, tmp_path / "ar_run", VOCAB, 1, 2, 2, 0, "--training.objective", "ar",
                           "--checkpoint.enable", "--checkpoint.interval", "1")
    run_trainer(ar_run)
    trained = load_model(tmp_path / "ar_run").state_dict()
    start = _initial_state([*mdm_args, "--checkpoint.initial_load_path", str(tmp_path / "ar_run")])
    _assert_mask_row_added(start, trained)

    # and the reverse: a diffusion model's weights start an AR run, its mask row dropped
    mdm = init(build_model(Model(flavor="6M", vocab_size=VOCAB), 32, torch.device("cpu")))
    write_hf_folder(mdm.state_dict(), model_config(mdm, "6M"), tmp_path / "mdm_export", "float32", {})
    ar_args = tiny_run_args(data, tmp_path / "ar2", VOCAB, 1, 2, 2, 0, "--training.objective", "ar")
    start = _initial_state([*ar_args, "--checkpoint.initial_load_path", str(tmp_path / "mdm_export")])
    assert start["tok_embeddings.weight"].shape == (VOCAB, 256)
    for name, value in mdm.state_dict().items():
        assert torch.equal(start[name], value[:VOCAB] if name == "tok_embeddings.weight" else value), name
