"""Review of checkpoint loading and exporting: what the other checkpoint tests leave out.

- A checkpoint's model must be this run's also in what is no tensor shape: RoPE's base (rope_theta) and RMSNorm's
  epsilon (norm_eps) change every output of the same weights, so a resume or an initial load that would silently
  continue with other ones is refused, in one line naming each differing field with both values and the fix.
- An export from a checkpoint (a step-N folder or a dump folder) keeps the tokens the run had seen, as the trainer's
  own export does, in config.json and in the model card.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from harness import user_error_line

from dlm_titan.checkpoint.export import load_model, write_export
from dlm_titan.checkpoint.resume import check_model
from dlm_titan.errors import UserError
from dlm_titan.interop.hf_export import write_hf_folder
from dlm_titan.models import ModelArgs, build_transencoder, model_config
from dlm_titan.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
STEPS, GLOBAL_BATCH, SEQ_LEN = 2, 4, 32  # tiny_run_args' sequence length
SIX_M = dict(n_layers=6, n_heads=4, dim=256, ffn_dim=1024)  # the 6M flavor's shape, as tiny_run_args builds it


def six_m_shaped(seed: int, **constants) -> torch.nn.Module:
    """A model of the 6M flavor's tensor shapes, with RoPE/RMSNorm constants ``constants``."""
    model = build_transencoder(ModelArgs(**SIX_M, vocab_size=VOCAB, **constants), 64, "math", "cpu")
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model


@pytest.fixture(scope="module")
def off_default_run(tmp_path_factory):
    """A 2-step run initialised from a Hugging Face folder of the 6M flavor's tensor shapes but rope_theta 5e5 and
    RMSNorm eps 1e-6 (which only the folder, not model.flavor = 6M, gives), checkpointing every step."""
    from harness import run_trainer, tiny_run_args, write_random_shards

    root = tmp_path_factory.mktemp("off_default_run")
    (root / "data").mkdir()
    data = write_random_shards(root / "data", VOCAB)
    model = six_m_shaped(seed=3, rope_theta=500000.0, norm_eps=1e-6)
    write_hf_folder(model.state_dict(), model_config(model, ""), root / "folder", "float32", {})
    run_trainer(tiny_run_args(data, root / "run", VOCAB, STEPS, GLOBAL_BATCH, 1, 0, "--checkpoint.initial_load_path",
                              str(root / "folder"), "--checkpoint.enable", "--checkpoint.interval", "1",
                              "--checkpoint.export_dtype", "float32"))
    return root, data


def private_copy(dump: Path, to: Path) -> Path:
    """A hard-linked copy of a dump folder (saves never write into existing files), config.toml copied for real
    (a run rewrites it)."""
    shutil.copytree(dump, to, copy_function=os.link)
    saved = (to / "config.toml").read_text()
    (to / "config.toml").unlink()
    (to / "config.toml").write_text(saved)
    return to


def test_resume_with_other_rope_theta_and_norm_eps_is_refused(off_default_run, tmp_path, capsys):
    """Resuming the run without the folder that shaped it builds the 6M flavor (rope_theta 1e4, eps 1e-5): the same
    tensor shapes, so only the two constants tell the checkpoint's model from this one. Refused, nothing saved; the
    resume with the folder continues."""
    from harness import tiny_run_args

    root, data = off_default_run
    dump = private_copy(root / "run", tmp_path / "run")
    before = sorted(p.name for p in (dump / "checkpoint").iterdir())
    line = user_error_line(capsys, train_main, tiny_run_args(data, dump, VOCAB, STEPS + 1, GLOBAL_BATCH, 1, 0, "--checkpoint.enable"))
    assert f"{dump / 'checkpoint' / f'step-{STEPS}'} holds a custom-shape model with" in line
    for field, saved, ours in (("rope_theta", 500000.0, 10000.0), ("norm_eps", 1e-06, 1e-05)):
        assert f"{field} = {saved}" in line.split(" but ")[0] and f"{field} = {ours}" in line.split(" but ")[1], line
    assert "n_layers" not in line and "checkpoint.initial_load_path" in line and "dump_folder" in line
    assert sorted(p.name for p in (dump / "checkpoint").iterdir()) == before
    argv = tiny_run_args(data, dump, VOCAB, STEPS + 1, GLOBAL_BATCH, 1, 0, "--checkpoint.enable",
                         "--checkpoint.initial_load_path", str(root / "folder"))
    assert train_main(argv) == 0
    saved = json.loads((dump / "checkpoint" / f"step-{STEPS + 1}" / "complete.json").read_text())["model"]
    assert (saved["rope_theta"], saved["norm_eps"]) == (500000.0, 1e-6)


def test_initial_load_of_other_rope_theta_is_refused(tmp_path, capsys):
    """An export of the earlier ``"format": "dlm_titan"`` kind leaves the shape to model.flavor: one of the 6M
    flavor's tensor shapes but rope_theta 5e5 would load into the flavor's rope_theta 1e4 model unnoticed."""
    from harness import tiny_run_args, write_random_shards

    model = six_m_shaped(seed=4, rope_theta=500000.0)
    write_export(model.state_dict(), model_config(model, "6M"), tmp_path / "old_export", "float32", step=5)
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    line = user_error_line(capsys, train_main, tiny_run_args(data, tmp_path / "run", VOCAB, 1, GLOBAL_BATCH, 1, 0,
                                            "--checkpoint.initial_load_path", str(tmp_path / "old_export")))
    assert "rope_theta = 500000.0" in line and "rope_theta = 10000.0" in line, line
    assert "model.flavor" in line and "dump_folder" not in line
    assert not (tmp_path / "run" / "checkpoint").exists()


BASE = {"flavor": "6M", **SIX_M, "vocab_size": VOCAB, "mask_id": VOCAB, "max_seq_len": 32, "n_kv_heads": 4,
        "norm_eps": 1e-5, "rope_theta": 10000.0, "causal": False}


@pytest.mark.parametrize("field, value", [("rope_theta", 500000.0), ("norm_eps", 1e-6), ("n_kv_heads", 2),
                                          ("vocab_size", 320)])
def test_a_model_differing_in_one_field_is_refused_naming_it(field, value):
    """Each field alone: the line names it with the checkpoint's value and this run's, and no other field."""
    with pytest.raises(UserError) as refused:
        check_model(BASE, {**BASE, field: value}, Path("ckpt"))
    line = str(refused.value)
    theirs, ours = line.split(" but ")
    assert f"{field} = {value}" in theirs and f"{field} = {BASE[field]}" in ours and "\n" not in line
    assert all(f"{k} =" not in line for k in ("n_layers", "dim", "rope_theta", "norm_eps", "n_kv_heads") if k != field)


def test_markers_without_the_constants_read_as_the_defaults():
    """Markers written before n_kv_heads, rope_theta and norm_eps were recorded describe a default model: they
    still resume one, and are refused for another."""
    old = {k: v for k, v in BASE.items() if k not in ("n_kv_heads", "rope_theta", "norm_eps")}
    check_model(BASE, old, Path("old"))
    check_model(BASE, BASE, Path("same"))
    with pytest.raises(UserError, match="rope_theta = 10000.0 but .* rope_theta = 500000.0"):
        check_model({**BASE, "rope_theta": 500000.0}, old, Path("old"))


def test_export_from_a_checkpoint_keeps_tokens_seen(off_default_run, tmp_path):
    """The export script from a step-N folder and from the dump folder records the tokens seen (steps x global
    batch x sequence length) in config.json and the card, as the trainer's own export does."""
    from scripts.export_checkpoint import main as export_main

    root, _ = off_default_run
    tokens = STEPS * GLOBAL_BATCH * SEQ_LEN
    own = json.loads((root / "run" / "export" / "config.json").read_text())
    assert own["tokens_seen"] == tokens
    for name, source in (("from_step", root / "run" / "checkpoint" / f"step-{STEPS}"), ("from_dump", root / "run")):
        assert export_main([str(source), "--out", str(tmp_path / name), "--dtype", "float32"]) == 0
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert (config["step"], config["tokens_seen"]) == (STEPS, tokens), name
        assert f"training step {STEPS}, {tokens:,} tokens seen" in (tmp_path / name / "README.md").read_text()
    earlier = root / "run" / "checkpoint" / "step-1"
    assert load_model(earlier, attn_backend="math").config["tokens_seen"] == GLOBAL_BATCH * SEQ_LEN
