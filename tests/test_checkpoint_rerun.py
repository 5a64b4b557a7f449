"""Rerunning a finished run: the same command again on its dump folder resumes from the last checkpoint, trains
no step and exports again; the export must keep what the first run recorded (final loss, tokens seen)."""

from __future__ import annotations

import json
from pathlib import Path

from harness import run_trainer, tiny_run_args, write_random_shards

VOCAB = 256
STEPS = 2


def _export_facts(dump: Path) -> tuple[dict, str]:
    return json.loads((dump / "export" / "config.json").read_text()), (dump / "export" / "README.md").read_text()


def test_rerun_of_a_finished_run_keeps_the_exports_final_loss(tmp_path):
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", VOCAB)
    dump = tmp_path / "dump"
    argv = tiny_run_args(data, dump, VOCAB, STEPS, 2, 1, 0, "--checkpoint.enable", "--checkpoint.export_dtype", "float32")
    losses = run_trainer(argv)
    first, _ = _export_facts(dump)
    assert first["final_loss"] == losses[STEPS]

    assert run_trainer(argv) == {}  # the rerun resumes at the last step and logs nothing
    config, card = _export_facts(dump)
    assert (config["step"], config["final_loss"]) == (STEPS, losses[STEPS])
    assert config["tokens_seen"] == first["tokens_seen"] == STEPS * 2 * 32
    assert f"final training loss {losses[STEPS]:.4f}" in card
