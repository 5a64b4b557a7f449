"""Review of the Hugging Face export: what the other interop tests leave out.

- A re-export into an existing folder (the trainer's final export of an extended run, or the script run twice)
  that dies half-way must not leave a folder that looks complete: it either loads as the earlier export or not at
  all, never as a mix of two exports (weights of one, config.json of the other, or shards of both).
- Bad destinations are one line and exit 2, not a traceback.
- A shape off SMDM's defaults (rope_theta, norm eps, one key/value head) reaches transformers intact: its logits
  equal dlm_titan's own model run in float64, for the diffusion model and the causal baseline.
- config.json names the weights' dtype under both keys transformers has read (``torch_dtype`` in 4.x, ``dtype``).
- A config.json that is valid JSON but no object is one line and exit 2 wherever a folder is read; so is a
  sharded folder's ``model.safetensors.index.json`` that is no object, lacks its weight map or names a shard that
  is not there.
- A folder saved by transformers 4.x names its dtype ``torch_dtype`` only: that is the dtype read back.
- dlm_titan.interop imports nothing of dlm_titan.checkpoint (which imports it): no import cycle between packages.
- The exported tokenizer names its unknown token as transformers' own conversion of the SentencePiece model does.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from harness import user_error_line, word_level_tokenizer

from dlm_titan.checkpoint.export import load_model
from dlm_titan.errors import UserError
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config
from scripts.export_checkpoint import main as export_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 256  # no tokenizer (the exports warn that they have none)


def tiny(seed: int, causal: bool = False, **shape) -> torch.nn.Module:
    args = ModelArgs(2, 4, 64, 96, vocab_size=VOCAB, **shape)
    model = build_transencoder(args, 64, "math", "cpu", causal=causal)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.eval()


def export(model, out, step: int, **kw) -> None:
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), out, "float32", {"step": step}, **kw)


def what_loads(out, tokens: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(logits, recorded step) of the folder as dlm_titan reads it, or None when it is not a model folder."""
    try:
        model = load_model(out, attn_backend="math")
    except UserError:
        return None
    with torch.no_grad():
        return model(tokens), int(model.config["step"])


def transformers_loads(out) -> bool:
    try:
        transformers.AutoModelForMaskedLM.from_pretrained(out, trust_remote_code=True)
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.parametrize("dies_at", ["second shard", "model card"])
def test_reexport_that_dies_half_way_never_looks_complete(tmp_path, monkeypatch, dies_at):
    import safetensors.torch

    import dlm_titan.interop.hf_export as hf_export

    old, new = tiny(seed=1), tiny(seed=2)
    tokens = torch.randint(0, VOCAB + 1, (1, 9))
    export(old, tmp_path, step=7, max_shard_bytes=60_000)
    with torch.no_grad():
        want = old(tokens)
    assert torch.equal(what_loads(tmp_path, tokens)[0], want)

    class Killed(Exception):
        pass

    if dies_at == "second shard":
        calls = []
        real = safetensors.torch.save_file

        def save_file(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    else:  # every weight file of the new export written, the card and config.json not yet
        def model_card(*args, **kwargs):
            raise Killed

        monkeypatch.setattr(hf_export, "model_card", model_card)
    with pytest.raises(Killed):
        export(new, tmp_path, step=9, max_shard_bytes=60_000)
    monkeypatch.undo()
    loaded = what_loads(tmp_path, tokens)
    if loaded is not None:  # only the earlier export, whole, may still be there
        logits, step = loaded
        assert step == 7 and torch.equal(logits, want), "a mix of two exports loads"
    else:
        assert not transformers_loads(tmp_path)
    export(new, tmp_path, step=9, max_shard_bytes=60_000)  # the rerun completes it
    logits, step = what_loads(tmp_path, tokens)
    with torch.no_grad():
        assert step == 9 and torch.equal(logits, new(tokens))


def test_bad_destination_is_one_line_exit_2(tmp_path, capsys):
    """--out naming a file, a path under a file or a run's dump folder: one line, exit 2, nothing written."""
    export(tiny(seed=1), tmp_path / "src", step=3)
    (tmp_path / "a_file").write_text("not a folder")
    assert "a_file" in user_error_line(capsys, export_main, [str(tmp_path / "src"), "--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "not a folder"
    assert "a_file" in user_error_line(capsys, export_main, [str(tmp_path / "src"), "--out", str(tmp_path / "a_file" / "sub")])
    (tmp_path / "dump").mkdir()  # a run's dump folder: an export there would shadow its newest checkpoint
    (tmp_path / "dump" / "config.toml").write_text("[job]\n")
    assert "dump" in user_error_line(capsys, export_main, [str(tmp_path / "src"), "--out", str(tmp_path / "dump")])
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == ["config.toml"]


def float64_reference(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """dlm_titan's own model, every parameter in float64."""
    ref = build_transencoder(model.args, model.max_seq_len, "math", "cpu", causal=model.causal)
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()}, assign=True)
    from dlm_titan.models.attention import rope_cache

    ref.rope = rope_cache(ref.max_seq_len, ref.args.head_dim, ref.args.rope_theta)
    with torch.no_grad():
        return ref(tokens)


@pytest.mark.parametrize("causal", [False, True])
def test_off_default_shape_reaches_transformers_intact(tmp_path, causal):
    """rope_theta 5e5, RMSNorm eps 1e-6 and one key/value head for four query heads: transformers' copy (float64)
    equals dlm_titan's model (float64) at every position, so none of the three fell back to a default."""
    model = tiny(seed=5, causal=causal, rope_theta=500000.0, norm_eps=1e-6, n_kv_heads=1)
    with torch.no_grad():  # norm weights away from 1, so a wrong eps or a skipped norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.02, 2.0)
    export(model, tmp_path, step=1)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]) == (500000.0, 1e-6, 1)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    hf = auto.from_pretrained(tmp_path, trust_remote_code=True).double().eval()
    tokens = torch.randint(0, VOCAB + (0 if causal else 1), (2, 40))
    with torch.no_grad():
        got = hf(tokens).logits
    want = float64_reference(model, tokens)
    assert ((got - want).norm() / want.norm()).item() < 1e-6
    back = load_model(tmp_path, attn_backend="math")
    assert (back.args.rope_theta, back.args.norm_eps, back.args.kv_heads, back.causal) == (500000.0, 1e-6, 1, causal)


def test_explicit_tokenizer_that_cannot_be_shipped_is_one_line_exit_2(tmp_path, capsys):
    """--tokenizer_path names what the user wants shipped: a path that does not exist, or a tokenizer that does not
    fit the model (here the embedded 32000-token one for a 256-token model), stops the export before it writes,
    rather than exporting without tokenizer files and exiting 0."""
    from dlm_titan.data.tokenizer import embedded_tokenizer_path

    export(tiny(seed=1), tmp_path / "src", step=3)
    out = ["--out", str(tmp_path / "out")]
    assert "nope" in user_error_line(capsys, export_main, [str(tmp_path / "src"), "--tokenizer_path", str(tmp_path / "nope"), *out])
    too_big = embedded_tokenizer_path()
    assert "32000" in user_error_line(capsys, export_main, [str(tmp_path / "src"), "--tokenizer_path", too_big, *out])
    assert not (tmp_path / "out").exists()


def test_folder_source_without_tokenizer_files_gets_no_guessed_tokenizer(tmp_path, capsys):
    """A Llama folder downloaded without its tokenizer files (here a 40,000-token vocabulary): the export ships no
    tokenizer and says so, instead of the embedded Llama-2 tokenizer padded to the model's vocabulary (and an
    earlier export's tokenizer files in the destination go)."""
    config = transformers.LlamaConfig(vocab_size=40000, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    assert not list((tmp_path / "llama").glob("tokenizer*"))
    (tmp_path / "out").mkdir()  # an earlier export's tokenizer there must not pass for this model's
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    capsys.readouterr()
    assert export_main([str(tmp_path / "llama"), "--out", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    assert "--tokenizer_path" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("tokenizer*"))
    assert "no tokenizer files" in (tmp_path / "out" / "README.md").read_text()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "eos_token_id" not in config and config["vocab_size"] == 40001


def test_checkpoint_holding_other_objects_is_one_line_exit_2(tmp_path, capsys):
    """A lit-gpt training checkpoint whose hyperparameters hold a Path cannot be read without unpickling code:
    one plain line (torch's own message spans lines and carries terminal colour codes), naming the way out."""
    import pathlib

    torch.save({"model": {"lm_head.weight": torch.zeros(4, 2)}, "hparams": {"out_dir": pathlib.PurePosixPath("out")}},
               tmp_path / "iter-001000-ckpt.pth")
    line = user_error_line(capsys, export_main, [str(tmp_path / "iter-001000-ckpt.pth"), "--out", str(tmp_path / "out"),
                                                    "--tokenizer_path", word_level_tokenizer(tmp_path)])
    assert "\x1b" not in line and "safetensors" in line


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_sentencepiece_user_defined_symbols_encode_as_training_or_ship_no_tokenizer(tmp_path, dummy_prefix):
    """A SentencePiece BPE model trained with user_defined_symbols: SentencePiece cuts them out of the text
    wherever they occur (also inside a word). Without a dummy prefix the exported tokenizer.json does the same;
    with one the tokenizers library cannot (a symbol's own text would get the prefix), so the export says so instead
    of shipping a tokenizer that encodes differently from the data the model was trained on."""
    import sentencepiece as spm

    from dlm_titan.data.tokenizer import load_tokenizer

    texts = ["The quick brown fox jumps over the lazy dog.", "naïve café [SEP] ok", "def f(x):\n    return x\n"] * 40
    texts += [f"item{i} and [SEP] firefox{i}" for i in range(200)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        user_defined_symbols=["[SEP]", "fox"], normalization_rule_name="identity", byte_fallback=True,
        add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False, minloglevel=2)
    model = build_transencoder(ModelArgs(1, 4, 64, 96, vocab_size=512), 64, "math", "cpu")  # above its 400 tokens
    model.to_empty(device="cpu")
    model.init_weights(1)
    if dummy_prefix:
        with pytest.raises(UserError, match=r"user-defined symbols \(\[SEP\], fox\)"):
            export(model, tmp_path / "hf", step=1, tokenizer_path=str(tmp_path / "sp.model"), tokenizer_required=True)
        return
    export(model, tmp_path / "hf", step=1, tokenizer_path=str(tmp_path / "sp.model"), tokenizer_required=True)
    ours = load_tokenizer(str(tmp_path / "sp.model"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["a[SEP]b", "[SEP] x", "x [SEP]", "the fox", "firefox", "Fox fox-fox", " fox", "", "[SEP][SEP]",
                 "<s> [SEP] </s>", "fox", *texts[:3], texts[-1]]:
        ids = hf_tok(text)["input_ids"]
        assert ids == ours.encode(text, eos=False), repr(text)
        assert hf_tok.decode(ids) == ours.decode(ids), repr(text)
    assert ours.encode("firefox", eos=False)[-1] == ours.backend.processor.piece_to_id("fox")  # cut out of the word
    back = load_tokenizer(str(tmp_path / "hf"), max_vocab_size=512)  # dlm_titan reading the folder's tokenizer
    assert all(back.encode(t, eos=False) == ours.encode(t, eos=False) for t in ["a[SEP]b", "the fox", *texts[:3]])


@pytest.fixture(scope="module")
def folder_shaped_run(tmp_path_factory):
    """A 2-step run initialised from a Hugging Face folder whose shape is no SMDM flavor (grouped-query attention,
    rope_theta 5e5), checkpointing every step and exporting at the end; model.flavor stays at the 6M default."""
    from harness import run_trainer, tiny_run_args, write_random_shards

    root = tmp_path_factory.mktemp("folder_run")
    (root / "data").mkdir()
    data = write_random_shards(root / "data", VOCAB)
    model = tiny(seed=7, rope_theta=500000.0, n_kv_heads=2)
    write_hf_folder(model.state_dict(), model_config(model, ""), root / "gqa", "float32", {})
    run_trainer(tiny_run_args(data, root / "run", VOCAB, 2, 4, 1, 0, "--checkpoint.initial_load_path",
                              str(root / "gqa"), "--checkpoint.enable", "--checkpoint.interval", "1",
                              "--checkpoint.export_dtype", "float32"))
    return root, data


def test_folder_shaped_run_does_not_record_the_ignored_flavor(folder_shaped_run):
    """The run's checkpoints and export describe its model: not as "6M" (model.flavor, ignored for the shape), whose
    6 layers and width 256 the recorded 2 layers and width 64 contradict."""
    root, _ = folder_shaped_run
    marker = json.loads((root / "run" / "checkpoint" / "step-2" / "complete.json").read_text())["model"]
    config = json.loads((root / "run" / "export" / "config.json").read_text())
    assert (marker["n_layers"], config["num_hidden_layers"], config["num_key_value_heads"]) == (2, 2, 2)
    assert marker["flavor"] == config["flavor"] == ""
    assert "6M" not in (root / "run" / "export" / "README.md").read_text()


def test_checkpoint_of_a_folder_shaped_run_initialises_a_new_run(folder_shaped_run, tmp_path):
    """A second stage in a new dump folder starts from the first stage's DCP checkpoint: it takes that model's
    shape (as it would from the folder), not model.flavor's."""
    from harness import tiny_run_args

    from dlm_titan import distributed as dist_utils
    from dlm_titan.config import load_config
    from dlm_titan.train import Trainer

    root, data = folder_shaped_run
    step2 = root / "run" / "checkpoint" / "step-2"
    argv = tiny_run_args(data, tmp_path / "stage2", VOCAB, 2, 4, 1, 0, "--checkpoint.initial_load_path", str(step2))
    want = load_model(step2, attn_backend="math").state_dict()
    try:
        trainer = Trainer(load_config(argv))
        a = trainer.model.args
        assert (a.n_layers, a.dim, a.kv_heads, a.rope_theta) == (2, 64, 2, 500000.0)
        got = trainer.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
    finally:
        dist_utils.shutdown()


def test_config_json_names_the_dtype_for_transformers_4_and_5(tmp_path, capfd):
    """transformers 4.x takes the weights' dtype from config.json's ``torch_dtype`` (5.x from ``dtype``): a bf16
    export records both, and the installed transformers loads it as bf16 without a word about either key."""
    import warnings

    model = tiny(seed=3)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), tmp_path, "bfloat16", {"step": 1})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = transformers.AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
        hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True, dtype="auto")
    assert loaded.dtype == torch.bfloat16 and {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    said = capfd.readouterr().err + "\n".join(str(w.message) for w in caught)
    assert "dtype" not in said, said


@pytest.mark.parametrize("content", ["[1, 2]", '"a string"', "null", "3"])
def test_config_json_that_is_no_object_is_one_line_exit_2(tmp_path, capsys, content):
    """A config.json that is valid JSON but no object (a list, a string, ...): the loader, the export script and
    a run's checkpoint.initial_load_path each say so in one line naming the file (exit 2), not with a traceback."""
    from harness import tiny_run_args, write_random_shards

    from dlm_titan.train import main as train_main

    export(tiny(seed=1), tmp_path / "hf", step=3)
    config = tmp_path / "hf" / "config.json"
    config.write_text(content + "\n")
    with pytest.raises(UserError, match="config.json holds"):
        load_model(tmp_path / "hf")
    assert str(config) in user_error_line(capsys, export_main, [str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    capsys.readouterr()
    code = train_main(tiny_run_args(data, tmp_path / "run", VOCAB, 1, 4, 1, 0, "--checkpoint.initial_load_path",
                                    str(tmp_path / "hf")))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and str(config) in err[0], err


@pytest.mark.parametrize("damage", ["[1, 2]", "null", '{"metadata": {}}', '{"weight_map": [1]}',
                                    '{"weight_map": {"model.norm.weight": 3}}', "missing shard"])
def test_shard_index_that_cannot_be_followed_is_one_line_exit_2(tmp_path, capsys, damage):
    """model.safetensors.index.json that is no object, has no weight map (or one that is no object of file names)
    or names a shard that is not in the folder: one line naming the index (and the shard), exit 2."""
    export(tiny(seed=1), tmp_path / "hf", step=3, max_shard_bytes=60_000)
    index = tmp_path / "hf" / "model.safetensors.index.json"
    if damage == "missing shard":
        shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[1]
        shard.unlink()
        named = [str(index), shard.name]
    else:
        index.write_text(damage + "\n")
        named = [str(index)]
    with pytest.raises(UserError) as raised:
        load_model(tmp_path / "hf")
    assert all(n in str(raised.value) for n in named) and "\n" not in str(raised.value), raised.value
    line = user_error_line(capsys, export_main, [str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert all(n in line for n in named), line
    assert not (tmp_path / "out").exists()


def test_transformers_4_folder_dtype_is_read_from_torch_dtype(tmp_path):
    """transformers 4.x writes only ``torch_dtype``: the shape read back takes the dtype from it; ``dtype`` (5.x)
    wins where both are present, and float32 is the default where neither is."""
    from dlm_titan.interop.formats import interop_shape

    export(tiny(seed=1), tmp_path, step=1)
    config = json.loads((tmp_path / "config.json").read_text())
    for keys, want in [({"torch_dtype": "bfloat16"}, "bfloat16"), ({"dtype": "float16", "torch_dtype": "bfloat16"},
                       "float16"), ({}, "float32")]:
        saved = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")} | keys
        (tmp_path / "config.json").write_text(json.dumps(saved))
        assert interop_shape(tmp_path)["dtype"] == want, keys


def _package_imports(package: str) -> dict[str, list[str]]:
    """dlm_titan subpackage -> the dlm_titan subpackages (and top-level modules) its modules import, anywhere in
    the module (function bodies too), read from the source."""
    import ast
    from pathlib import Path

    import dlm_titan

    root = Path(dlm_titan.__file__).parent
    found: dict[str, list[str]] = {}
    for file in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "dlm_titan" and len(parts) > 1 and parts[1] != package:
                    found.setdefault(parts[1], []).append(f"{file.name}:{node.lineno}")
    return found


def test_interop_and_checkpoint_import_one_way():
    """dlm_titan.checkpoint reads interop formats (its loaders and export); interop must not import checkpoint
    back, not even inside a function (both read the on-disk layout from dlm_titan.checkpoint_layout, below
    them)."""
    assert "interop" in _package_imports("checkpoint")
    assert "checkpoint" not in _package_imports("interop"), _package_imports("interop")["checkpoint"]


def _llama_conversion(model_file) -> object:
    """transformers' own Llama tokenizer of a SentencePiece model file (converted offline from the .model)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp()
    shutil.copy(model_file, os.path.join(folder, "tokenizer.model"))
    return transformers.LlamaTokenizer.from_pretrained(folder)


def test_exported_tokenizer_names_the_unknown_token_as_transformers_does(tmp_path):
    """transformers' LlamaTokenizer of the same SentencePiece model names ``<unk>`` as its unknown token (id 0,
    SentencePiece's unk_id): ours too, in tokenizer_config.json and special_tokens_map.json, so a token string
    outside the vocabulary maps to that id rather than None. Decoding the unknown id gives "<unk>" in both (where
    SentencePiece writes " ⁇ "): the same as transformers, documented in docs/checkpointing.md."""
    from dlm_titan.data.tokenizer import embedded_tokenizer_path, load_tokenizer
    from dlm_titan.interop.hf_tokenizer import tokenizer_files

    sp = load_tokenizer("").backend.processor
    reference = _llama_conversion(embedded_tokenizer_path())
    for name, text in tokenizer_files("", 32000, 64)[1].items():
        (tmp_path / name).write_text(text)
    ours = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.unk_token == reference.unk_token == sp.id_to_piece(sp.unk_id())
    assert ours.unk_token_id == reference.unk_token_id == sp.unk_id()
    assert ours.convert_tokens_to_ids("no-such-piece") == reference.convert_tokens_to_ids("no-such-piece") == sp.unk_id()
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["unk_token"] == reference.unk_token
    ids = [sp.piece_to_id("\u2581the"), sp.unk_id(), sp.piece_to_id("\u2581end")]
    assert ours.decode(ids) == reference.decode(ids) == "the<unk> end" and sp.decode(ids) == "the \u2047  end"
    assert ours("the end").input_ids == [ids[0], ids[2]]
