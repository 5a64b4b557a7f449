"""Hostile-user cases of the data path: shard folders and preparations in states a user can leave them in, each
refused with one line naming the problem and the fix instead of training on the wrong data."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from harness import train_tiny_sentencepiece

from dlm_titan.data import build_train_loader, build_val_loader, prepare_split
from dlm_titan.data import prepare as prepare_mod
from dlm_titan.data.shards import ShardError, list_shards, write_shard
from dlm_titan.data.tokenizer import embedded_tokenizer_path
from dlm_titan.errors import UserError

SEQ_LEN = 15
EMBEDDED = embedded_tokenizer_path()


def shard(folder: Path, name: str, n: int = 64) -> None:
    """A valid uint16 shard of ``n`` small token ids."""
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(folder / name, (np.arange(n) % 50).astype(np.uint16))


def data_cfg(**overrides) -> SimpleNamespace:
    base = dict(path="", train_prefixes=["train_slim"], train_weights=[1.0], val_prefix="validation",
                tokenizer_path="", num_workers=0)
    return SimpleNamespace(**{**base, **overrides})


def train_loader(folder: Path, **overrides):
    return build_train_loader(data_cfg(**overrides), data_path=str(folder), seq_len=SEQ_LEN, local_batch_size=2,
                              global_batch_size=2, dp_rank=0, dp_world_size=1, seed=0, vocab_size=32000)


def corpus(folder: Path, files: int = 2, docs: int = 40) -> Path:
    """``files`` jsonl inputs of ``docs`` short documents each."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = [json.dumps({"text": f"input {f} document {d} " + "word " * (d % 7)}) for d in range(docs)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def prepare(src: Path, out: Path, prefix: str = "train_slim", chunk_size: int = 200) -> dict:
    return prepare_split(str(src), "", str(out), "train", chunk_size=chunk_size, corpus=prepare_mod.general_corpus(),
                         prefix=prefix, show_progress=False)


def test_a_shard_linked_to_a_missing_target_is_refused(tmp_path):
    """A shard symlinked from another disk whose target is gone (an unmounted volume) was skipped without a word,
    so training read the remaining shards only."""
    shard(tmp_path, "train_slim_0.bin")
    os.symlink(tmp_path / "elsewhere" / "train_slim_1.bin", tmp_path / "train_slim_1.bin")
    with pytest.raises(ShardError, match=r"train_slim_1\.bin is a symbolic link to .*elsewhere.*does not exist"):
        list_shards(tmp_path, "train_slim")
    with pytest.raises(ShardError, match="symbolic link"):
        train_loader(tmp_path)
    # a link to a shard that exists is read as that shard
    shard(tmp_path / "elsewhere", "train_slim_1.bin")
    assert [Path(p).name for p in list_shards(tmp_path, "train_slim")] == ["train_slim_0.bin", "train_slim_1.bin"]


@pytest.mark.parametrize("prefixes", [["train_slim", "train_slim"], ["train", "train_star"],
                                      ["train_slim", "train_slim_1"]])
def test_training_sources_that_share_a_shard_are_refused(tmp_path, prefixes):
    """A prefix that begins another (``train`` also selects ``train_star*.bin``), or one listed twice, read the
    shared shards under both weights: the mixture was not the one the weights say."""
    for name in ("train_slim_0.bin", "train_slim_1.bin", "train_star_0.bin"):
        shard(tmp_path, name)
    with pytest.raises(UserError, match=f"data.train_prefixes {prefixes[0]!r} and {prefixes[1]!r} both select"):
        train_loader(tmp_path, train_prefixes=prefixes, train_weights=[0.5, 0.5])
    # disjoint prefixes, and a shared one whose weight is 0 (never read), are fine
    train_loader(tmp_path, train_prefixes=["train_slim", "train_star"], train_weights=[0.5, 0.5])
    train_loader(tmp_path, train_prefixes=prefixes, train_weights=[1.0, 0.0])


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no clean-up and no final manifest write."""


@pytest.mark.parametrize("prefix", ["train_slim", "validation"])
def test_shards_of_a_killed_preparation_are_refused_until_it_is_rerun(tmp_path, monkeypatch, prefix):
    """A preparation killed mid-input (the OOM killer, a lost node) leaves that input's first shards and, before
    its first periodic manifest write, no manifest at all: training read the cut-short stream as data."""
    src, out = corpus(tmp_path / "src"), tmp_path / "out"

    def killed_mid_input(jobs, *args):
        writer = prepare_mod.ShardWriter(out, f"{prefix}_000001", 200, np.dtype(np.uint16))
        writer.add(np.ones(450, dtype=np.uint16))  # two full shards of the second input written, then killed
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(prepare_mod, "_run_jobs", killed_mid_input)
        with pytest.raises(Killed):
            prepare(src, out, prefix)
    assert sorted(p.name for p in out.glob("*.bin")) == [f"{prefix}_000001_0000000000.bin",
                                                         f"{prefix}_000001_0000000001.bin"]
    build = (lambda: train_loader(out)) if prefix == "train_slim" else (
        lambda: build_val_loader(data_cfg(), data_path=str(out), seq_len=SEQ_LEN, local_batch_size=2, dp_rank=0,
                                 dp_world_size=1, vocab_size=32000))
    with pytest.raises(UserError, match=rf"2 shard\(s\) in .*{prefix}_000001_0000000000.bin.* are not recorded in "
                                        rf"{prefix}_manifest.json: .*run the same prepare command again"):
        build()
    manifest = prepare(src, out, prefix)  # the re-run finishes the job; its shards are all recorded
    assert manifest["totals"]["inputs"] == 2
    build()


def test_a_failed_first_run_does_not_lock_its_settings(tmp_path):
    """The manifest of a run that finished no input records settings nothing was made with: a re-run with other
    settings (after fixing the input) is not refused as 'shards made with another chunk_size'."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "bad.jsonl").write_text("not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        prepare(src, out)
    assert (out / "train_slim_manifest.json").is_file()
    (src / "bad.jsonl").write_text(json.dumps({"text": "now fixed " * 50}) + "\n")
    assert prepare(src, out, chunk_size=300)["chunk_size"] == 300
    with pytest.raises(UserError, match="another chunk_size"):  # once shards exist, their settings hold
        prepare(src, out, chunk_size=200)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> str:
    """Not the embedded tokenizer: the same kind of file, other ids."""
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("tok"))


def test_sources_prepared_with_different_tokenizers_are_refused(tmp_path, other_tokenizer):
    """With no data.tokenizer_path, a training source or the validation set prepared with another tokenizer (of
    ids within the model's vocabulary) trained or validated on ids that mean other text, without a word; the
    validation set was not compared even with a configured data.tokenizer_path."""
    src, out = corpus(tmp_path / "src"), tmp_path / "out"
    prepare(src, out, "train_slim")
    prepare_split(str(src), other_tokenizer, str(out), "train", chunk_size=200, corpus=prepare_mod.general_corpus(),
                  prefix="train_star", show_progress=False)
    with pytest.raises(UserError, match=r"train_star_manifest.json .* tokenizer tiny.model .*those of "
                                        r"train_slim_manifest.json with tokenizer.model .*one tokenizer"):
        train_loader(out, train_prefixes=["train_slim", "train_star"], train_weights=[0.5, 0.5])
    train_loader(out)  # one source alone is consistent

    prepare_split(str(src), other_tokenizer, str(out), "validation", chunk_size=200,
                  corpus=prepare_mod.general_corpus(), prefix="validation", show_progress=False)
    for tokenizer_path in ("", EMBEDDED):
        with pytest.raises(UserError, match="validation_manifest.json .* tokenizer tiny.model"):
            build_val_loader(data_cfg(tokenizer_path=tokenizer_path), data_path=str(out), seq_len=SEQ_LEN,
                             local_batch_size=2, dp_rank=0, dp_world_size=1, vocab_size=32000)
    # the validation set of the training sources' tokenizer is accepted
    build_val_loader(data_cfg(train_prefixes=["train_star"]), data_path=str(out), seq_len=SEQ_LEN,
                     local_batch_size=2, dp_rank=0, dp_world_size=1, vocab_size=32000)


def _children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Linux /proc; its main thread made the pool's processes)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_workers_leave_ctrl_c_to_the_preparation_and_end_with_it(tmp_path):
    """Workers of a preparation killed with SIGKILL went on tokenizing into the folder (shards nothing records),
    then waited forever for work: processes that lived, holding their memory, until someone killed them. And
    Ctrl-C, which reaches every process of the group, raised in workers still importing: their tracebacks
    around the preparation's one line."""
    src = corpus(tmp_path / "src", files=6, docs=3000)
    out = tmp_path / "out"
    code = ("import sys; from dlm_titan.data import general_corpus, prepare_split; "
            f"prepare_split({str(src)!r}, '', {str(out)!r}, 'train', chunk_size=200, num_workers=2, "
            "corpus=general_corpus(), prefix='train_slim', show_progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (out.is_dir() and any(out.glob("*.bin"))) and time.monotonic() < deadline:
            time.sleep(0.05)  # the workers are tokenizing
        workers = _children(proc.pid)
        assert workers and proc.poll() is None, "the preparation ended before it could be killed"
        for w in workers:  # SigIgn: the mask of ignored signals, SIGINT (2) is bit 1
            ignored = next(line for line in Path(f"/proc/{w}/status").read_text().splitlines()
                           if line.startswith("SigIgn:"))
            assert int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1)), f"process {w} would raise on Ctrl-C"
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [w for w in workers if Path(f"/proc/{w}").exists()]
        assert not alive, f"worker processes {alive} outlived the killed preparation"
    finally:
        for w in workers:  # the processes this test started, by id
            try:
                os.kill(w, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("prefix", ["train_*", "tr*", "train_?lim", "train_[s]lim"])
def test_a_prefix_with_a_wildcard_is_one_line(tmp_path, prefix):
    """``train_*`` became the pattern ``train_**.bin``, a ValueError traceback from pathlib; ``?`` and ``[`` were
    silently read as wildcards of a prefix the docs call literal."""
    shard(tmp_path, "train_slim_0.bin")
    with pytest.raises(UserError, match=re.escape(f"data prefix {prefix!r} holds a wildcard; a prefix is the literal beginning")):
        train_loader(tmp_path, train_prefixes=[prefix])


def test_ctrl_c_during_prepare_is_one_line_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    """Ctrl-C during a preparation ended in a KeyboardInterrupt traceback; the finished inputs were kept and the
    unfinished removed, but nothing said so or how to go on."""
    from scripts import prepare_corpus

    src, out = corpus(tmp_path / "src", files=3), tmp_path / "out"
    argv = ["--source_path", str(src), "--tokenizer_path", "", "--destination_path", str(out), "--prefix",
            "train_slim", "--num_workers", "1", "--chunk_size", "200"]
    original = prepare_mod.process_input

    def ctrl_c_in_the_second_input(job, progress):
        if job.stream == 1:
            raise KeyboardInterrupt
        return original(job, progress)

    with monkeypatch.context() as m:
        m.setattr(prepare_mod, "process_input", ctrl_c_in_the_second_input)
        assert prepare_corpus.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: interrupted;") and "run the same command again" in err[0]
    assert {p.name.split("_")[2] for p in out.glob("*.bin")} == {"000000"}  # the finished input only
    train_loader(out)  # what is there is recorded
    assert prepare_corpus.main(argv) == 0
    assert {p.name.split("_")[2] for p in out.glob("*.bin")} == {"000000", "000001", "000002"}


@pytest.mark.parametrize("val_prefix, shared", [("validation", 0), ("train_slim", 2)])
def test_validation_on_training_shards_is_warned_about(tmp_path, capsys, val_prefix, shared):
    rng = np.random.default_rng(0)
    for name in ("train_slim_0000000000.bin", "train_slim_0000000001.bin", "validation_0000000000.bin"):
        write_shard(tmp_path / name, rng.integers(0, 1000, 64, dtype=np.uint16))
    build_val_loader(data_cfg(val_prefix=val_prefix), data_path=str(tmp_path), seq_len=SEQ_LEN, local_batch_size=1,
                     dp_rank=0, dp_world_size=1)
    err = capsys.readouterr().err
    if shared:
        assert f"warning: {shared} of the {shared} validation shards (data.val_prefix 'train_slim') are also " \
               f"training shards, e.g. {tmp_path / 'train_slim_0000000000.bin'}: the validation loss measures " \
               "training data; prepare a separate validation split" in err
    else:
        assert "warning" not in err
