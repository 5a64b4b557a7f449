"""What the user-facing docs (README, docs/) promise, checked on the real scripts and trainer."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np

from scripts import prepare_corpus


def test_prepare_corpus_summary_names_the_prefix(tmp_path: Path):
    """README's "your own data" steps prepare the validation folder with ``--prefix validation`` and no ``--split``:
    the summary line must name what was written (``validation: ...``), not the default split ``train``, which
    reads as if training data had been prepared."""
    src = tmp_path / "val"
    src.mkdir()
    (src / "license.txt").write_text("Permission is hereby granted, free of charge, to any person.\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = prepare_corpus.main(["--source_path", str(src), "--destination_path", str(tmp_path / "shards"),
                                    "--prefix", "validation", "--num_workers", "1"])
    assert code == 0
    line = out.getvalue().strip()
    assert line.startswith("validation: 1 files, 1 documents, "), line
    assert line.endswith(f"1 shards in {tmp_path / 'shards'}"), line
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "validation_000000_0000000000.bin", "validation_manifest.json"]


def test_vocab_size_zero_follows_the_tokenizer(tmp_path: Path, monkeypatch):
    """README and docs/data.md: ``--model.vocab_size 0`` makes the model's vocabulary follow the tokenizer. With a
    120-token tokenizer.json the run builds a 120-way head (its first loss is near ln 120, far below ln 32000),
    saves the resolved size in config.toml, and the launcher's config check accepts the same flags."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers, trainers

    from dlm_titan.config import load_config
    from dlm_titan.data import general_corpus, prepare_split
    from dlm_titan.train import main
    from tests.harness import run_trainer, tiny_run_args

    words = "the a cat dog sat ran on far mat away big small red blue one two three".split()
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(words, size=rng.integers(10, 40))) for _ in range(60)]
    tok = HF(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainer=trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                              show_progress=False))
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    vocab = tok.get_vocab_size()
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_split(str(tmp_path / "raw"), str(tok_path), str(tmp_path / "data"), "train", corpus=general_corpus(),
                  prefix="train_slim", chunk_size=256, num_workers=1)

    def argv(dump: str) -> list[str]:
        return tiny_run_args(tmp_path / "data", tmp_path / dump, 0, 1, 4, 4, 0, "--data.tokenizer_path", str(tok_path))

    monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    assert main(argv("check")) == 0  # run_train.sh's check before torchrun
    monkeypatch.delenv("DLM_TITAN_CHECK_ONLY")
    losses = run_trainer(argv("dump"))
    assert abs(losses[1] - math.log(vocab)) < 1.0, (losses, vocab)
    saved = load_config(["--job.config_file", str(tmp_path / "dump" / "config.toml")])
    assert saved.model.vocab_size == vocab
