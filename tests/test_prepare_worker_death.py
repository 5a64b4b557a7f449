"""scripts.prepare_corpus with a worker process that dies (SIGKILL, as the out-of-memory killer sends): the
command stops within a minute with one error line and exit 2 instead of waiting forever, leaves no shard of the
input cut short, and a re-run resumes from the recorded inputs to exactly the files of a clean run.

The death is injected without test hooks in the library: a sitecustomize.py on the subprocess's PYTHONPATH
(imported by every Python process, the spawned workers included) wraps ``prepare.process_input`` so that, in a
worker process, one chosen input kills its own process after its first batch of shards is written.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HF
from tokenizers import models, pre_tokenizers, trainers

from dlm_titan.data import general_corpus, prepare_split

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog sat ran on far mat away big small red blue one two three".split()
POISON = "f2.jsonl"  # sorts in the middle: inputs before and after it are left to do when it dies

SITECUSTOMIZE = f'''
import multiprocessing, os, signal
from pathlib import Path

import dlm_titan.data.prepare as prepare

_original = prepare.process_input


def process_input(job, progress):
    if Path(job.path).name != {POISON!r} or multiprocessing.parent_process() is None:
        return _original(job, progress)

    def progress_then_die(docs, tokens):
        progress(docs, tokens)
        written = sorted(Path(job.destination).glob(f"{{job.prefix}}_{{job.stream:06d}}_*.bin"))
        Path(job.destination, "poison_written.json").write_text(repr(len(written)))
        os.kill(os.getpid(), signal.SIGKILL)

    return _original(job, progress_then_die)


prepare.process_input = process_input
'''


def docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(n)]


def make_corpus(root: Path) -> tuple[Path, str]:
    tok = HF(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(docs(0, 200), trainer=trainer)
    tok.save(str(root / "tokenizer.json"))
    src = root / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs(i + 1, 40)))
    return src, str(root / "tokenizer.json")


def prepare_subprocess(src: Path, tok: str, dst: Path, pythonpath: list[Path]) -> tuple[int, str]:
    """``python -m scripts.prepare_corpus`` with 2 workers in a new session: (exit code, stderr). A run still
    going after 60 s (the hang this test is about) is killed with its workers, and the test fails."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, pythonpath)), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "scripts.prepare_corpus", "--source_path", str(src), "--tokenizer_path", tok,
           "--destination_path", str(dst), "--prefix", "train_x", "--chunk_size", "64", "--num_workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("prepare_corpus still running 60 s after a worker died (it waits forever)")
    return proc.returncode, err


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.multiprocess
def test_dead_worker_stops_with_one_line_and_the_rerun_resumes(tmp_path: Path):
    src, tok = make_corpus(tmp_path)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    dst = tmp_path / "out"

    code, err = prepare_subprocess(src, tok, dst, [hook, REPO])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: a worker process died") and "out-of-memory" in lines[0], err
    assert "fewer --num_workers" in lines[0] and "re-run skips the inputs finished" in lines[0], err
    # the dying input had written shards; none is left, and it is not recorded
    assert int((dst / "poison_written.json").read_text()) > 0
    (dst / "poison_written.json").unlink()
    assert not list(dst.glob("train_x_000002_*"))
    recorded = json.loads((dst / "train_x_manifest.json").read_text())["inputs"]
    assert POISON not in recorded
    for entry in recorded.values():  # what is recorded is all there; nothing else of an unfinished input is
        assert all((dst / name).is_file() for name in entry["shards"])
    kept = {name for entry in recorded.values() for name in entry["shards"]} | {"train_x_manifest.json"}
    assert set(files(dst)) == kept

    code, err = prepare_subprocess(src, tok, dst, [REPO])  # no injection this time
    assert code == 0, err

    clean = tmp_path / "clean"  # the serial path in this process: independent of the worker pool
    prepare_split(str(src), tok, str(clean), "train", chunk_size=64, num_workers=1, corpus=general_corpus(),
                  show_progress=False, prefix="train_x")
    assert files(dst) == files(clean)
