"""dlm_titan's Hugging Face model folder: transformers loads it (trust_remote_code) and gives dlm_titan's logits;
its tokenizer encodes as training did; its sampler equals dlm_titan.sampling; weights shard; dlm_titan reads it
back (and still reads the older exports)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dlm_titan.checkpoint.export import load_model, write_export
from dlm_titan.data.tokenizer import load_tokenizer
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config
from dlm_titan.sampling import SamplerConfig, sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 32000  # the embedded tokenizer's
SMALL = 256  # a vocabulary for the tests that need no tokenizer (their exports warn that they have none)


def tiny_model(n_kv_heads: int = 0, seed: int = 1, vocab: int = VOCAB):
    args = ModelArgs(2, 4, 64, 96, vocab_size=vocab, n_kv_heads=n_kv_heads)
    model = build_transencoder(args, 64, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A GQA model exported in float32 (tokenizer: the embedded SentencePiece model)."""
    model = tiny_model(n_kv_heads=2)
    out = tmp_path_factory.mktemp("hf")
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), out, "float32",
                    {"flavor": "tiny", "step": 7, "tokens_seen": 1234, "final_loss": 3.5})
    return model, out


def corpus_texts(limit: int) -> list[str]:
    """The first documents of the embedded corpus (prose and code), 3000 characters each."""
    import zstandard

    from dlm_titan.data.embedded import embedded_corpus_dir

    texts = []
    for file in sorted(embedded_corpus_dir().glob("*/*/*.jsonl.zst")):
        with zstandard.open(file, "rt", encoding="utf-8") as f:
            texts += [json.loads(line)["text"][:3000] for line, _ in zip(f, range(limit // 4), strict=False)]
    assert len(texts) >= limit // 2
    return texts[:limit]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A GQA model with a small vocabulary exported in float32, without tokenizer files."""
    model = tiny_model(n_kv_heads=2, vocab=SMALL)
    out = tmp_path_factory.mktemp("small")
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), out, "float32", {})
    return model, out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_folder_holds_the_contract(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_dlm_titan.py", "modeling_dlm_titan.py",
            "diffusion_rule.py", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dlm_titan" and config["architectures"] == ["DlmTitanForMaskedLM"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForMaskedLM"}
    assert (config["vocab_size"], config["mask_token_id"]) == (VOCAB + 1, VOCAB)  # input ids: the mask included
    assert (config["num_key_value_heads"], config["dtype"]) == (2, "float32")
    assert (config["flavor"], config["step"], config["tokens_seen"], config["final_loss"]) == ("tiny", 7, 1234, 3.5)
    card = (out / "README.md").read_text()
    assert "tiny" in card and "3.5000" in card and "1,234 tokens" in card
    for template in ("configuration_dlm_titan.py", "modeling_dlm_titan.py", "diffusion_rule.py"):  # torch + transformers
        imports = [line for line in (out / template).read_text().splitlines() if line.startswith(("import", "from"))]
        assert all(m.split()[1].split(".")[0] in {"__future__", "numpy", "torch", "transformers", ""} for m in imports)


@pytest.mark.slow
def test_transformers_logits_equal_dlm_titan_fp32(exported):
    model, out = exported
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "DlmTitanForMaskedLM"
    tokens = torch.randint(0, VOCAB + 1, (2, 23))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model(tokens)) < 1e-5
        base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
        assert rel_err(base(tokens).last_hidden_state, model.hidden_states(tokens)) < 1e-5


@pytest.mark.slow
def test_bfloat16_export_within_rounding(tmp_path):
    model = tiny_model(vocab=SMALL)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "bfloat16", {})
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.bfloat16)
    ours = load_model(tmp_path, dtype=torch.bfloat16, attn_backend="math")
    tokens = torch.randint(0, SMALL + 1, (1, 17))
    with torch.no_grad():
        reference = tiny_model(vocab=SMALL)(tokens)
        assert rel_err(hf(tokens).logits, ours(tokens)) < 2e-2
        assert rel_err(hf(tokens).logits, reference) < 3e-2  # bf16 weights and activations vs fp32


def test_dlm_titan_reads_the_folder_back_and_the_older_export(exported, tmp_path):
    model, out = exported
    loaded = load_model(out, attn_backend="math")
    tokens = torch.randint(0, VOCAB + 1, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    assert loaded.config["step"] == 7 and loaded.args.kv_heads == 2
    old = tmp_path / "old"
    mha = tiny_model()
    write_export(mha.state_dict(), model_config(mha, "tiny"), old, "float32", 3)  # today's "format": "dlm_titan"
    with torch.no_grad():
        assert torch.equal(load_model(old, attn_backend="math")(tokens), mha(tokens))


def test_sharded_weights_load_in_transformers_and_dlm_titan(tmp_path):
    model = tiny_model(vocab=SMALL)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {}, max_shard_bytes=60_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    tokens = torch.randint(0, SMALL + 1, (1, 9))
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model(tokens)) < 1e-5
        assert torch.equal(load_model(tmp_path, attn_backend="math")(tokens), model(tokens))
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})  # unsharded again
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()


def test_tokenizer_encodes_as_training(exported):
    _, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer("")
    texts = ["Hello world", " leading space", "   three", "two  spaces\n\nnewline\ttab", "émoji 🤗 中文 ∑",
             " ", "  ", "", "a\n b", "<s> </s> <unk> <|mdm_mask|>", "x" * 300]
    texts += corpus_texts(40)
    for text in texts:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text, bos=False, eos=False), repr(text[:80])
        assert hf_tok.decode(ids) == ours.decode(ids)
    assert (hf_tok.mask_token_id, hf_tok.eos_token_id, hf_tok.bos_token_id) == (VOCAB, ours.eos_id, ours.bos_id)
    # dlm_titan reads the folder's tokenizer too (data.tokenizer_path / --tokenizer_path), encoding the same
    back = load_tokenizer(str(out), max_vocab_size=VOCAB)
    assert (back.vocab_size, back.eos_id, back.bos_id) == (VOCAB, ours.eos_id, ours.bos_id)
    assert all(back.encode(t) == ours.encode(t) for t in texts[:20])


@pytest.mark.slow
def test_reexport_keeps_the_tokenizer_and_weights(exported, tmp_path):
    """scripts.export_checkpoint from an exported folder (e.g. to bfloat16) ships the folder's own tokenizer."""
    from scripts.export_checkpoint import main as export_main

    model, out = exported
    assert export_main([str(out), "--out", str(tmp_path / "again"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "again" / "tokenizer.json").read_text()) == json.loads((out / "tokenizer.json").read_text())
    tokens = torch.randint(0, VOCAB + 1, (1, 9))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "again", attn_backend="math")(tokens), model(tokens))


@pytest.mark.parametrize("options", [
    dict(algorithm="confidence", temperature=0.0),
    dict(algorithm="confidence", temperature=1.0, cfg_scale=0.5, block_length=4),
    dict(algorithm="stochastic", temperature=0.7),
])
@pytest.mark.slow
def test_generate_diffusion_equals_dlm_titan_sampler(small, options):
    model, out = small
    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True).eval()
    prompt = torch.randint(0, SMALL, (2, 5))
    cfg = SamplerConfig(length=8, steps=4, stop_at_eos=True, seed=3, **options)
    eos = int(prompt[0, 0])  # a token the model may well produce, so stopping is exercised
    ours = sample(model, prompt, cfg, mask_id=SMALL, eos_id=eos)
    theirs = hf.generate_diffusion(prompt, length=8, steps=4, eos_token_id=eos, seed=3, **options)
    assert torch.equal(theirs, ours)
    assert not (theirs == SMALL).any()


@pytest.mark.slow
def test_training_final_export_is_a_transformers_folder(tmp_path):
    """The trainer's final export: a folder transformers loads, with the run's step, tokens and tokenizer."""
    from harness import run_trainer, tiny_run_args, write_random_shards

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    dump = tmp_path / "dump"
    losses = run_trainer(tiny_run_args(data, dump, VOCAB, 2, 2, 1, 0, "--checkpoint.enable",
                                       "--checkpoint.export_dtype", "float32"))
    config = json.loads((dump / "export" / "config.json").read_text())
    assert (config["step"], config["tokens_seen"], config["flavor"]) == (2, 2 * 2 * 32, "6M")
    assert config["final_loss"] == losses[2]  # the last logged loss
    assert f"final training loss {losses[2]:.4f}" in (dump / "export" / "README.md").read_text()
    hf = transformers.AutoModelForMaskedLM.from_pretrained(dump / "export", trust_remote_code=True)
    tokens = torch.randint(0, VOCAB + 1, (1, 9))
    with torch.no_grad():
        want = load_model(dump / "checkpoint" / "step-2", attn_backend="math")(tokens)
        assert rel_err(hf(tokens).logits, want) < 1e-5
    assert transformers.AutoTokenizer.from_pretrained(dump / "export", trust_remote_code=True).mask_token_id == VOCAB


def test_tokenizer_json_source_keeps_training_encoding(tmp_path):
    """A run tokenized with a Hugging Face tokenizer.json (byte-level BPE with a BOS post-processor, which training
    never applies): the exported tokenizer encodes as dlm_titan did, special-token strings in text stay text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x * 2\n", "naïve café"] * 30
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    model = tiny_model(vocab=512)  # above the tokenizer's 300 tokens: the mask id is 512, not 300
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path / "hf", "float32", {},
                    tokenizer_path=str(tmp_path / "tok"))
    ours = load_tokenizer(str(tmp_path / "tok"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    for text in [*texts[:3], " lead", "a <s> b <|endoftext|> c <|unused_300|>", "🤗 zz", ""]:
        assert hf_tok(text)["input_ids"] == ours.encode(text, eos=False), repr(text)
    assert (hf_tok.eos_token_id, hf_tok.mask_token_id) == (ours.eos_id, 512)
    assert load_tokenizer(str(tmp_path / "hf"), max_vocab_size=512).encode("a b") == ours.encode("a b")


def test_autoregressive_baseline_exports_causal(tmp_path):
    """training.objective = "ar": a causal model without mask row; transformers' copy is causal too."""
    args = ModelArgs(2, 4, 64, 96, vocab_size=SMALL)
    model = build_transencoder(args, 64, "math", "cpu", causal=True)
    model.to_empty(device="cpu")
    model.init_weights(2)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "float32", {})
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["causal"], config["vocab_size"], config["mask_token_id"]) == (True, SMALL, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    tokens = torch.randint(0, SMALL, (1, 9))
    with torch.no_grad():
        assert rel_err(hf(tokens).logits, model.eval()(tokens)) < 1e-5
        loaded = load_model(tmp_path, attn_backend="math")
        assert loaded.causal and torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(ValueError, match="autoregressive"):  # no masked-LM head (nor generate_diffusion) for it
        transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True)
