"""Multi-process use as a user meets it, on CPU (gloo): launcher mistakes, bad input that only some ranks see,
Ctrl-C, and what torchrun's own ending made of the trainers' one-line errors.

The launcher tests run run_train.sh with a stand-in ``PYTHON`` that records its calls (no process starts); the
multiprocess ones start 2 gloo ranks of the real trainer on a 6M model over random shards, seconds each.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
"""


def launch(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """run_train.sh with a stand-in python that records each call and succeeds; (the result, the calls)."""
    fake = tmp_path / "fake_python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DLM_TITAN", "NGPU", "NNODES", "RDZV"))}
    result = subprocess.run(["bash", str(REPO / "run_train.sh")], capture_output=True, text=True, timeout=60,
                            env={**base, "PYTHON": str(fake), "CALLS": str(calls), **env})
    return result, calls.read_text().splitlines() if calls.exists() else []


def test_several_nodes_without_a_rendezvous_endpoint_are_refused(tmp_path):
    """NNODES=2 without RDZV_ENDPOINT (or with port 0): each node's torchrun made its own rendezvous on localhost
    and waited 10 minutes for the others without a word. Now one line, exit 2, before anything starts."""
    for endpoint in (None, "localhost:0"):
        env = {"NNODES": "2"} if endpoint is None else {"NNODES": "2", "RDZV_ENDPOINT": endpoint}
        result, calls = launch(tmp_path, **env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "RDZV_ENDPOINT=" in lines[0], result.stderr
        assert lines[0].startswith("error: NNODES=2 needs RDZV_ENDPOINT") and calls == []
    # the check alone (DLM_TITAN_CHECK_ONLY, as slurm_train.sh runs it) meets no rendezvous and needs none
    result, calls = launch(tmp_path, NNODES="2", DLM_TITAN_CHECK_ONLY="1")
    assert result.returncode == 0 and len(calls) == 1
    result, calls = launch(tmp_path, NNODES="2", RDZV_ENDPOINT="node0:29500")
    assert result.returncode == 0 and "--rdzv_endpoint node0:29500" in calls[-1]
