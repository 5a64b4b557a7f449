"""A run initialised from a Hugging Face folder reads the folder's shape once at start: the model it builds, the
flavor it records and the plan line it prints all come from that one reading (each used to read it again, and
each reading parsed config.json up to three times)."""

from __future__ import annotations

import json

from harness import tiny_run_args, write_random_shards

from dlm_titan import distributed as dist_utils
from dlm_titan.config import load_config
from dlm_titan.interop import formats, init_shape
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config
from dlm_titan.train import Trainer

VOCAB = 256


def gqa_folder(folder):
    """A Hugging Face folder of a 2-layer grouped-query model with rope_theta 5e5 (no SMDM flavor's shape)."""
    args = ModelArgs(2, 4, 64, 96, vocab_size=VOCAB, rope_theta=500000.0, n_kv_heads=2)
    model = build_transencoder(args, 64, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(7)
    write_hf_folder(model.state_dict(), model_config(model, ""), folder, "float32", {})
    return folder


def count_calls(monkeypatch, module, name: str) -> list[int]:
    """Wraps ``module.name`` so that each call appends to the returned list."""
    calls: list[int] = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_config_shape_parses_config_json_once(tmp_path, monkeypatch):
    folder = gqa_folder(tmp_path / "gqa")
    parses = count_calls(monkeypatch, formats, "_config")
    shape = formats.config_shape(folder)
    assert (shape["n_layers"], shape["dim"], shape["n_kv_heads"], shape["rope_theta"]) == (2, 64, 2, 500000.0)
    assert len(parses) == 1
    assert formats.config_shape(tmp_path) is None  # no config.json: flavor (or a checkpoint marker) decides


def test_trainer_reads_the_initial_folder_shape_once(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    folder = gqa_folder(tmp_path / "gqa")
    reads = count_calls(monkeypatch, init_shape, "_shape_of")
    argv = tiny_run_args(data, tmp_path / "run", VOCAB, 2, 4, 1, 0, "--checkpoint.initial_load_path", str(folder),
                         "--checkpoint.enable")
    try:
        trainer = Trainer(load_config(argv))
        assert len(reads) == 1
        a = trainer.model.args
        assert (a.n_layers, a.dim, a.kv_heads, a.rope_theta) == (2, 64, 2, 500000.0)  # the folder's shape, not 6M's
        assert f"model of {folder}: 2 layers, d=64" in capsys.readouterr().out
        trainer.train()
    finally:
        dist_utils.shutdown()
    marker = json.loads((tmp_path / "run" / "checkpoint" / "step-2" / "complete.json").read_text())
    assert marker["model"]["flavor"] == ""  # the folder's (no SMDM flavor), not the ignored model.flavor
    assert len(reads) == 1
