"""Hostile-user review of the interop paths: what a user can do wrong with a model folder or an export must end
in one line ``error: ...`` and exit 2, never in other weights than the folder holds nor in a user's files lost.

- A config.json edited to fewer layers than the weights hold (dlm_titan's export or a Llama folder), or a Llama
  folder with bias tensors whose config.json says it has none, is refused: the extra tensors were dropped without
  a word and a different model was loaded.
- A config.json edited to lack a shape field or to hold text or null where a number belongs is one line naming
  the file, not a KeyError, ValueError or TypeError traceback.
- ``export_checkpoint --out`` into a folder that is no earlier export (another model's folder, a folder of the
  user's own files) is refused before anything there is touched: the export removed its config.json and
  tokenizer files and overwrote its README.md. An earlier export's folder, also one whose export was killed
  half-way (no config.json yet, a temporary file left), is still replaced.
- A float16 export of weights beyond float16's range is refused before anything is written: the cast saved inf
  without a word (the folder then computed NaN).
- Weights holding NaN or inf in a Hugging Face folder (or an older export) are refused where they are read (the
  export script, ``load_model``, ``checkpoint.initial_load_path``), as a DCP checkpoint's already were.
- The export of a checkpoint whose training shards record their tokenizer ships no other tokenizer: the run's
  config.toml naming none, the embedded default (same vocabulary size, other ids) was shipped without a word; it
  is now left out with a warning, and one passed with --tokenizer_path is refused in one line.
- An export of the older kind (``"format": "dlm_titan"``) whose config.json is edited (fewer layers, another
  vocabulary, a field removed) is one line: the export script dropped layers or wrote a folder of the wrong
  shape without a word, and ``load_model`` raised a RuntimeError or KeyError traceback.
- A full disk while the export writes its weights is one line naming the cause (safetensors reports it as a
  SafetensorError, which no storage-error handler recognised: a traceback, for the trainer's final export too).
- A lit-gpt state dict holding tensors SMDM's models have none of (norm or attention biases of another lit-gpt
  model of an SMDM flavor's width) is refused: they were dropped without a word.
- A sharded folder whose shards disagree with its index (shards of two saves mixed) is refused: a tensor held by
  two shards took the values of whichever was read last, without a word.
- A checkpoint whose marker's model config is edited (fewer layers, a field removed or no number) is refused
  where its weights are read alone (export script, ``load_model``): DCP loads only the tensors asked for, so the
  export had fewer layers without a word; the others were KeyError/ValueError tracebacks.
- An export of one SMDM flavor as ``checkpoint.initial_load_path`` of a run whose ``model.flavor`` is another is
  refused before anything is built, naming both: the run trained the export's flavor without a word.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from harness import run_trainer, tiny_run_args, user_error_line, word_level_tokenizer
from safetensors.torch import load_file, save_file

from dlm_titan.config import load_config
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.interop.init_shape import InitialShape, build_training_model
from dlm_titan.models import ModelArgs, build_transencoder, model_config
from dlm_titan.models.flavors import get_model_args
from dlm_titan.train import main as train_main
from scripts.export_checkpoint import main as export_main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 256


def tiny_export(out, layers: int = 2, **kw) -> None:
    """A dlm_titan export folder of a tiny random model (no tokenizer); ``kw`` as :func:`write_hf_folder`'s."""
    model = build_transencoder(ModelArgs(layers, 4, 64, 96, vocab_size=VOCAB), 64, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    write_hf_folder(model.state_dict(), model_config(model, "tiny"), out, "float32", {"step": 3}, tokenizer_path=None,
                    **kw)


def save_llama(folder, **overrides) -> None:
    """A tiny random LlamaForCausalLM written by transformers."""
    shape = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**shape, **overrides})).save_pretrained(folder)


def edit_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("source", ["export", "llama"])
def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path, capsys, source):
    folder = tmp_path / "model"
    tiny_export(folder) if source == "export" else save_llama(folder)
    edit_config(folder, num_hidden_layers=1)
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert "model.layers.1." in line and "num_hidden_layers = 1" in line, line
    assert not (tmp_path / "out").exists()


def test_llama_bias_tensors_behind_a_config_without_biases_are_refused(tmp_path, capsys):
    folder = tmp_path / "llama"
    save_llama(folder, attention_bias=True)
    edit_config(folder, attention_bias=False)
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert "_proj.bias" in line and "bias" in line.split(";")[-1], line


def test_llama_rotary_inv_freq_buffers_are_no_extra_weights(tmp_path):
    """Older transformers saved ``rotary_emb.inv_freq`` buffers with the weights: they hold no parameter."""
    from dlm_titan.interop.formats import read_interop

    folder = tmp_path / "llama"
    save_llama(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg, _ = read_interop(folder)
    assert cfg["n_layers"] == 2


@pytest.mark.parametrize("source", ["export", "llama"])
@pytest.mark.parametrize("edit", ["missing", "text", "null"])
def test_config_field_missing_or_no_number_is_one_line_exit_2(tmp_path, capsys, source, edit):
    folder = tmp_path / "model"
    tiny_export(folder) if source == "export" else save_llama(folder)
    config = json.loads((folder / "config.json").read_text())
    if edit == "missing":
        del config["hidden_size"]
    else:
        config["hidden_size"] = "sixty-four" if edit == "text" else None
    (folder / "config.json").write_text(json.dumps(config))
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert "config.json" in line and ("hidden_size" in line if edit == "missing" else "not a number" in line), line


@pytest.mark.parametrize("content", ["llama folder", "own files"])
def test_export_into_a_folder_that_is_no_export_touches_nothing(tmp_path, capsys, content):
    source, out = tmp_path / "source", tmp_path / "out"
    tiny_export(source)
    if content == "llama folder":
        save_llama(out)
    else:
        out.mkdir()
        (out / "README.md").write_text("my notes\n")
        (out / "tokenizer.json").write_text("{}\n")
        (out / "results.csv").write_text("1,2\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = user_error_line(capsys, export_main, [str(source), "--out", str(out)])
    assert "is no dlm_titan export folder" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_export_replaces_an_earlier_export_also_one_killed_half_way(tmp_path, capsys):
    from dlm_titan.checkpoint.export import load_model

    source, out = tmp_path / "source", tmp_path / "out"
    tiny_export(source)
    tiny_export(out, layers=1)
    assert export_main([str(source), "--out", str(out), "--dtype", "float32"]) == 0
    assert load_model(out, attn_backend="math").args.n_layers == 2
    (out / "config.json").unlink()  # as an export killed after taking the earlier one out of service
    (out / "model.safetensors.tmp").write_bytes(b"partial")
    (out / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    assert export_main([str(source), "--out", str(out), "--dtype", "float32"]) == 0
    assert load_model(out, attn_backend="math").args.n_layers == 2


def test_float16_export_of_weights_beyond_its_range_is_refused(tmp_path, capsys):
    source, out = tmp_path / "source", tmp_path / "out"
    tiny_export(source)
    weights = load_file(str(source / "model.safetensors"))
    weights["lm_head.weight"][0, 0] = 1e6
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})
    tiny_export(out, layers=1)  # an earlier export there stays as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    line = user_error_line(capsys, export_main, [str(source), "--out", str(out), "--dtype", "float16"])
    assert "lm_head.weight" in line and "float16" in line and "bfloat16 or float32" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert export_main([str(source), "--out", str(out), "--dtype", "bfloat16"]) == 0


@pytest.mark.parametrize("source", ["export", "llama"])
def test_folder_weights_holding_inf_are_refused(tmp_path, capsys, source):
    from dlm_titan.checkpoint.export import load_model
    from dlm_titan.errors import UserError

    folder = tmp_path / "model"
    tiny_export(folder) if source == "export" else save_llama(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.norm.weight"][3] = float("inf")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert "NaN or inf" in line and "norm.weight" in line, line
    with pytest.raises(UserError, match="NaN or inf"):
        load_model(folder, attn_backend="math")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """(step folder of a 2-step run of vocabulary 32000, the embedded tokenizer's, on shards of a small BPE
    tokenizer; that tokenizer.json). The run's config.toml names no data.tokenizer_path."""
    from dlm_titan.data import prepare_split
    from tests.test_eval_tokenizer_identity import TEXTS, build_tokenizer

    root = tmp_path_factory.mktemp("hostile_tok")
    tokenizer = build_tokenizer(root)
    (root / "src").mkdir()
    (root / "src" / "a.txt").write_text("\n".join(TEXTS * 150))
    prepare_split(str(root / "src"), str(tokenizer), str(root / "data"), "train", prefix="train_slim")
    run_trainer(tiny_run_args(root / "data", root / "out", 32000, 2, 2, 2, 0, "--checkpoint.enable",
                              "--checkpoint.interval", "2"))
    return root / "out" / "checkpoint" / "step-2", tokenizer


def test_checkpoint_export_ships_no_tokenizer_but_the_training_one(bpe_run, tmp_path, capsys):
    from dlm_titan.data.tokenizer import embedded_tokenizer_path

    step, tokenizer = bpe_run
    out = tmp_path / "export"
    capsys.readouterr()
    assert export_main([str(step), "--out", str(out), "--dtype", "float32"]) == 0
    err = capsys.readouterr().err
    assert "warning: the export has no tokenizer" in err and "--tokenizer_path" in err, err
    assert (out / "config.json").is_file() and not (out / "tokenizer.json").exists()
    if embedded_tokenizer_path() is not None:
        line = user_error_line(capsys, export_main, [str(step), "--out", str(out), "--tokenizer_path", ""])
        assert "another tokenizer" in line, line
    assert export_main([str(step), "--out", str(out), "--tokenizer_path", str(tokenizer)]) == 0
    shipped = json.loads((out / "tokenizer.json").read_text())
    assert "</s>" in shipped["model"]["vocab"] and len(shipped["model"]["vocab"]) < 1000


@pytest.mark.parametrize("edit", [{"n_layers": 1}, {"vocab_size": VOCAB + 44}, {"dim": None}])
def test_edited_config_of_an_older_export_is_one_line_exit_2(tmp_path, capsys, edit):
    from dlm_titan.checkpoint.export import load_model, write_export
    from dlm_titan.errors import UserError

    model = build_transencoder(ModelArgs(2, 4, 64, 96, vocab_size=VOCAB), 64, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(0)
    folder = tmp_path / "old"
    write_export(model.state_dict(), model_config(model, "tiny"), folder, "float32", step=3)
    config = json.loads((folder / "config.json").read_text())
    for key, value in edit.items():
        config.pop(key) if value is None else config.update({key: value})
    (folder / "config.json").write_text(json.dumps(config))
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert "config" in line, line
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):
        load_model(folder, attn_backend="math")


def test_full_disk_during_the_export_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    source, out = tmp_path / "source", tmp_path / "out"
    tiny_export(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}

    def full_disk(*args, **kwargs):  # what safetensors raised on a 300 kB tmpfs that filled up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    capsys.readouterr()
    assert export_main([str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the warning that the source has no tokenizer, the error
    assert [line for line in err if not line.startswith("warning: ")] == err[-1:], err
    assert err[-1].startswith("error: ") and "No space left on device" in err[-1] and "rerun" in err[-1], err
    assert not (out / "config.json").exists() and not list(out.glob("*.tmp"))
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_full_disk_at_the_trainers_final_export_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from dlm_titan.train import main as train_main
    from tests.harness import write_random_shards

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)

    def full_disk(*args, **kwargs):  # DCP saves the checkpoint; only the export's safetensors write fails
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    args = tiny_run_args(data, tmp_path / "run", VOCAB, 1, 2, 2, 0, "--checkpoint.enable", "--checkpoint.interval", "1")
    capsys.readouterr()
    assert train_main(args) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: No space left on device"), err
    assert (tmp_path / "run" / "checkpoint" / "step-1" / "complete.json").is_file()


def test_litgpt_file_with_tensors_smdm_has_none_of_is_refused(tmp_path, capsys):
    from tests.test_interop_smdm import litgpt_state

    state = litgpt_state()
    state["transformer.h.0.norm_1.bias"] = torch.zeros(state["transformer.h.0.norm_1.weight"].shape)
    save_file(state, str(tmp_path / "layernorm.safetensors"))
    line = user_error_line(capsys, export_main, [str(tmp_path / "layernorm.safetensors"), "--out", str(tmp_path / "o"),
                                                    "--tokenizer_path", word_level_tokenizer(tmp_path)])
    assert "transformer.h.0.norm_1.bias" in line and "no SMDM checkpoint" in line, line
    assert not (tmp_path / "o").exists()


def test_shards_of_two_saves_mixed_are_refused(tmp_path, capsys):
    folder = tmp_path / "sharded"
    tiny_export(folder, max_shard_bytes=60_000)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    first, last = sorted(set(weight_map.values()))[0], sorted(set(weight_map.values()))[-1]
    moved = next(name for name, file in weight_map.items() if file == first)
    stale = load_file(str(folder / last))
    stale[moved] = torch.zeros_like(load_file(str(folder / first))[moved])  # an older save's copy of the tensor
    save_file(stale, str(folder / last), metadata={"format": "pt"})
    line = user_error_line(capsys, export_main, [str(folder), "--out", str(tmp_path / "out")])
    assert moved in line and last in line and "different saves" in line, line



@pytest.mark.parametrize("edit", ["fewer layers", "no model", "no number"])
def test_edited_checkpoint_marker_is_one_line_exit_2(tmp_path, capsys, edit):
    from dlm_titan.checkpoint_layout import MARKER
    from tests.harness import write_random_shards

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    run_trainer(tiny_run_args(data, tmp_path / "run", VOCAB, 1, 2, 2, 0, "--checkpoint.enable",
                              "--checkpoint.interval", "1"))
    step = tmp_path / "run" / "checkpoint" / "step-1"
    marker = json.loads((step / MARKER).read_text())
    if edit == "fewer layers":
        marker["model"]["n_layers"] -= 1
    elif edit == "no model":
        del marker["model"]
    else:
        marker["model"]["dim"] = "wide"
    (step / MARKER).write_text(json.dumps(marker))
    line = user_error_line(capsys, export_main, [str(step), "--out", str(tmp_path / "out")])
    assert "is damaged" in line and MARKER in line, line
    assert not (tmp_path / "out").exists()


def test_export_of_another_flavor_as_initial_load_path_is_refused(tmp_path, capsys):
    """The export records its flavor (6M): beside --model.flavor 19M it is refused naming both and the flag that
    fixes it; beside 6M (or a 1B export beside 1028M) it shapes the model as before, without a message."""
    from harness import write_random_shards

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB, files=1)
    model = build_transencoder(get_model_args("6M", VOCAB), 32, "math", "meta")
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    write_hf_folder(state, model_config(model, "6M"), tmp_path / "exp", "float32", {"flavor": "6M"},
                    tokenizer_path=None)
    argv = tiny_run_args(data, tmp_path / "run", VOCAB, 1, 2, 1, 0, "--model.flavor", "19M",
                         "--checkpoint.initial_load_path", str(tmp_path / "exp"))
    line = user_error_line(capsys, train_main, argv)
    assert line == (f"error: checkpoint.initial_load_path {tmp_path / 'exp'} holds a 6M model but model.flavor is 19M; "
                    "set --model.flavor 6M to start from its weights, or leave checkpoint.initial_load_path out to "
                    "train a fresh 19M"), line
    assert not (tmp_path / "run" / "checkpoint").exists()
    cfg = load_config(["--model.vocab_size", str(VOCAB), "--checkpoint.initial_load_path", str(tmp_path / "exp")])
    assert build_training_model(cfg, 32, torch.device("meta")).args.n_layers == 6
    assert capsys.readouterr().out == ""
    big = {**model_config(build_transencoder(get_model_args("1B", VOCAB), 32, "math", "meta"), "1B")}
    InitialShape("folder", big).check_flavor("1028M")  # an alias names the same flavor
