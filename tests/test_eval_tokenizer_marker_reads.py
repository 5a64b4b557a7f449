"""The export's tokenizer check reads the checkpoint's marker once (it read it once to see whether the run
recorded a tokenizer, and ``load_checked_tokenizer`` read it again), with the same answers as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dlm_titan.checkpoint.eval_tokenizer as eval_tokenizer
from dlm_titan.checkpoint_layout import MARKER
from dlm_titan.data.tokenizer import embedded_tokenizer_path, file_sha256
from dlm_titan.errors import UserError
from scripts.export_checkpoint import training_tokenizer

pytestmark = pytest.mark.skipif(embedded_tokenizer_path() is None, reason="the embedded tokenizer is missing")


def step_folder(root: Path, tokenizer_sha256: str) -> Path:
    """A complete ``step-2`` whose marker records one manifest's tokenizer hash (no weights: none are read)."""
    step = root / "checkpoint" / "step-2"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    manifests = {"train_slim": {"tokenizer_sha256": tokenizer_sha256}}
    (step / MARKER).write_text(json.dumps({"step": 2, "data": {"manifests": manifests}}))
    return step


@pytest.fixture
def marker_reads(monkeypatch) -> list[Path]:
    """The step folders whose marker eval_tokenizer reads, one entry a read."""
    reads: list[Path] = []
    real = eval_tokenizer.read_marker

    def counting(step_dir: Path) -> dict:
        reads.append(step_dir)
        return real(step_dir)

    monkeypatch.setattr(eval_tokenizer, "read_marker", counting)
    return reads


def test_the_recorded_tokenizer_is_shipped_after_one_marker_read(tmp_path, marker_reads):
    embedded = str(embedded_tokenizer_path())
    step = step_folder(tmp_path, file_sha256(embedded))
    assert training_tokenizer(step, embedded, 32000, explicit=True) == embedded
    assert marker_reads == [step]


def test_another_tokenizer_is_refused_after_one_marker_read(tmp_path, marker_reads, capsys):
    step = step_folder(tmp_path, "0" * 64)
    with pytest.raises(UserError, match="trained on shards tokenized with another tokenizer"):
        training_tokenizer(step, str(embedded_tokenizer_path()), 32000, explicit=True)
    assert training_tokenizer(step, "", 32000, explicit=False) is None  # not explicit: no tokenizer, a warning
    assert "warning: the export has no tokenizer" in capsys.readouterr().err
    assert marker_reads == [step, step]  # one read per call


def test_load_checked_tokenizer_alone_still_reads_the_marker(tmp_path, marker_reads):
    step = step_folder(tmp_path, "0" * 64)
    with pytest.raises(UserError):
        eval_tokenizer.load_checked_tokenizer(str(step), "", 32000)
    assert marker_reads == [step]
