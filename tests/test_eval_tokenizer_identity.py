"""Evaluating a training checkpoint with a tokenizer other than the run's is refused (one line, exit 2).

A run is trained for 2 steps on shards prepared with a byte-level BPE tokenizer.json built here (the model's
vocabulary is 32000, as the embedded default tokenizer's, so that tokenizer loads without a size error and only
the recorded identity can tell them apart). Its step folder evaluated with no tokenizer (the embedded default)
must be refused by scripts.generate, scripts.eval_elbo and the lm-eval model; with the training tokenizer it
works; a checkpoint whose marker records no tokenizer (older markers) works as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HF
from tokenizers import decoders, models, pre_tokenizers, trainers

from dlm_titan.checkpoint_layout import MARKER
from dlm_titan.data import prepare_split
from dlm_titan.data.tokenizer import embedded_tokenizer_path, file_sha256
from dlm_titan.errors import UserError
from tests.harness import run_trainer, tiny_run_args

TEXTS = ["the cat sat on the mat", "a dog ran far away", "Sing, O goddess, the anger of Achilles!"]

pytestmark = pytest.mark.skipif(embedded_tokenizer_path() is None, reason="the embedded tokenizer is missing")


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer.json of ~300 tokens with EOS ``</s>``."""
    tok = HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path]:
    """(step folder of a 2-step run on shards of the BPE tokenizer, that tokenizer.json)."""
    root = tmp_path_factory.mktemp("eval_tok")
    tokenizer = build_tokenizer(root)
    src = root / "src"
    src.mkdir()
    (src / "a.txt").write_text("\n".join(TEXTS * 150))
    data = root / "data"
    prepare_split(str(src), str(tokenizer), str(data), "train", prefix="train_slim")
    dump = root / "out"
    run_trainer(tiny_run_args(data, dump, 32000, 2, 2, 2, 0, "--checkpoint.enable", "--checkpoint.interval", "2"))
    step = dump / "checkpoint" / "step-2"
    recorded = json.loads((step / MARKER).read_text())["data"]["manifests"]
    assert [m["tokenizer_sha256"] for m in recorded.values()] == [file_sha256(tokenizer)]  # what the check reads
    return step, tokenizer


def generate(checkpoint: Path, *extra: str) -> int:
    from scripts.generate import main

    return main(["--checkpoint", str(checkpoint), "--prompt", "the cat", "--length", "4", "--steps", "2",
                 "--device", "cpu", *extra])


def eval_elbo(checkpoint: Path, text: Path, *extra: str) -> int:
    from scripts.eval_elbo import main

    return main(["--checkpoint", str(checkpoint), "--text_file", str(text), "--device", "cpu", "--seq_len", "16",
                 "--mc_samples", "2", *extra])


def test_default_tokenizer_refused_for_a_run_on_another(run, tmp_path: Path, capsys):
    step, tokenizer = run
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXTS * 4))
    for label, call in (("generate", lambda: generate(step)), ("elbo", lambda: eval_elbo(step, text))):
        assert call() == 2, label
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert "embedded default tokenizer" in err and file_sha256(tokenizer)[:12] in err, err
        assert file_sha256(embedded_tokenizer_path())[:12] in err and "--tokenizer_path" in err, err
    with pytest.raises(UserError, match=r"tokenizer_path=PATH in --model_args"):
        from dlm_titan.lm_eval.model import DLMTitanLM

        DLMTitanLM(pretrained=str(step), device="cpu", compile="false")


def test_training_tokenizer_accepted(run, tmp_path: Path, capsys):
    step, tokenizer = run
    text = tmp_path / "t.txt"
    text.write_text(" ".join(TEXTS * 4))
    for tok_path in (str(tokenizer), str(tokenizer.parent)):  # the file or its folder, as data.tokenizer_path
        assert generate(step, "--tokenizer_path", tok_path) == 0
        assert eval_elbo(step, text, "--tokenizer_path", tok_path) == 0
    capsys.readouterr()
    from dlm_titan.lm_eval.model import DLMTitanLM

    lm = DLMTitanLM(pretrained=str(step), tokenizer_path=str(tokenizer), device="cpu", compile="false")
    assert lm.scorer.tok.path == str(tokenizer)


def test_checkpoint_without_recorded_tokenizer_is_not_checked(run, tmp_path: Path, capsys):
    """A marker without the data identity (written before it was recorded) loads with the default as before."""
    import shutil

    step, _ = run
    old = tmp_path / "step-2"
    shutil.copytree(step, old)
    marker = json.loads((old / MARKER).read_text())
    del marker["data"]
    (old / MARKER).write_text(json.dumps(marker))
    assert generate(old) == 0
    assert capsys.readouterr().out.startswith("the cat")


def test_final_export_of_a_run_without_tokenizer_path_ships_no_wrong_tokenizer(run, capsys):
    """The run named no data.tokenizer_path and its shards' manifest records the BPE tokenizer: its final export
    (``export/`` in the dump folder) must not ship the embedded tokenizer's files, so a tool given the dump folder
    without a tokenizer is refused (the checkpoint's recorded identity), not handed the wrong one."""
    step, tokenizer = run
    dump = step.parent.parent
    export = dump / "export"
    assert (export / "config.json").is_file()
    assert not (export / "tokenizer.json").exists() and not (export / "tokenizer.model").exists()
    assert generate(dump) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and file_sha256(tokenizer)[:12] in err, err


def test_an_export_brings_its_own_tokenizer_to_every_tool(run, tmp_path: Path, capsys):
    """An export of the run ships the run's tokenizer (converted, with the mask token): generate, eval_elbo and
    the lm-eval model use it when no tokenizer is given, so the export scores as the run trained."""
    from dlm_titan.checkpoint.eval_tokenizer import load_checked_tokenizer
    from scripts.export_checkpoint import main as export

    step, tokenizer = run
    out = tmp_path / "export"
    assert export([str(step), "--out", str(out), "--tokenizer_path", str(tokenizer), "--dtype", "float32"]) == 0
    tok = load_checked_tokenizer(str(out), "", 32000)
    assert Path(tok.path).parent == out
    reference = HF.from_file(str(tokenizer))
    for text in TEXTS:
        assert tok.encode(text, bos=False, eos=False) == reference.encode(text).ids
    text = tmp_path / "doc.txt"
    text.write_text(TEXTS[0])
    assert generate(out) == 0
    assert eval_elbo(out, text) == 0
