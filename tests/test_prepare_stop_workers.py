"""Ctrl-C during a parallel preparation stops its worker processes before the unfinished inputs' shards are
removed, and only them: a child process the caller started before is left running."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from dlm_titan.data import general_corpus, prepare_split
from dlm_titan.data import prepare as prepare_mod


def corpus(folder: Path, files: int, docs: int) -> Path:
    folder.mkdir(parents=True)
    for f in range(files):
        lines = [json.dumps({"text": f"input {f} document {d} " + "word " * (d % 7)}) for d in range(docs)]
        (folder / f"part{f}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.multiprocess
def test_ctrl_c_stops_the_workers_and_leaves_other_children(tmp_path, monkeypatch):
    src, out = corpus(tmp_path / "src", files=4, docs=3000), tmp_path / "out"

    def ctrl_c_while_tokenizing(pending, bar, counters, on_done):
        deadline = time.monotonic() + 60
        while not any(out.glob("*.bin")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the workers are writing shards
        assert any(out.glob("*.bin")), "the workers wrote nothing within a minute"
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "_collect", ctrl_c_while_tokenizing)
    bystander = mp.get_context("spawn").Process(target=time.sleep, args=(120,))
    bystander.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare_split(str(src), "", str(out), "train", chunk_size=200, num_workers=2, corpus=general_corpus(),
                          prefix="train_slim", show_progress=False)
        assert mp.active_children() == [bystander]  # the workers are gone (joined), the bystander is not
        assert not list(out.glob("*.bin"))  # nothing was finished: every stream removed
        time.sleep(0.5)
        assert not list(out.glob("*.bin")), "a worker went on writing shards after the preparation stopped"
    finally:
        bystander.terminate()  # the process this test started
        bystander.join()
