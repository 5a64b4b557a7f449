"""Multi-process use as a user meets it, on CPU (gloo): launcher mistakes, bad input that only some ranks see,
Ctrl-C, and what torchrun's own ending made of the trainers' one-line errors.

The launcher tests run run_train.sh with a stand-in ``PYTHON`` that records its calls (no process starts); the
multiprocess ones start 2 gloo ranks of the real trainer on a 6M model over random shards, seconds each.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from harness import run_trainer, tiny_run_args, write_random_shards

from dlm_titan.data.shards import write_shard
from dlm_titan.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 256

_FAKE_PYTHON = """#!/usr/bin/env bash
echo "lws=${LOCAL_WORLD_SIZE:-} $*" >> "$CALLS"
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


# ------------------------------------------------------------------ torchrun's ending (dlm_titan.launch)


def _raising(error: BaseException):
    """A stand-in for torchrun's main that ends with ``error``."""

    def torchrun(argv: list[str]) -> None:
        raise error

    return torchrun


def _child_failed(*codes: int) -> Exception:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    return ChildFailedError("dlm_titan.train", {rank: ProcessFailure(rank, 100 + rank, code, "<N/A>")
                                                for rank, code in enumerate(codes)})


@pytest.mark.parametrize("codes,expect", [((2, -15), 2), ((1, 2), 2), ((130, 130), 130), ((-15, 130), 130)])
def test_launcher_ends_with_the_trainers_one_line_codes(monkeypatch, codes, expect):
    """A trainer that printed its one line (exit 2: bad input, 130: Ctrl-C) decides the launcher's exit code,
    whatever the other ranks (stopped by the agent, or failing in a collective with it) exited with."""
    import torch.distributed.run

    from dlm_titan import launch

    monkeypatch.setattr(torch.distributed.run, "main", _raising(_child_failed(*codes)))
    assert launch.main(["--nproc_per_node", "2"]) == expect


def test_launcher_keeps_torchrun_ending_for_anything_else(monkeypatch):
    """A bug's exit 1, a killed rank, SIGTERM (saved and stopped: torchrun's documented ending) are torchrun's own."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from dlm_titan import launch

    for error in (_child_failed(1, -9), SignalException("got signal: 15", signal.SIGTERM)):
        monkeypatch.setattr(torch.distributed.run, "main", _raising(error))
        with pytest.raises((ChildFailedError, SignalException)):
            launch.main([])
    monkeypatch.setattr(torch.distributed.run, "main", _raising(SignalException("got signal: 2", signal.SIGINT)))
    assert launch.main([]) == 130
    seen = []
    monkeypatch.setattr(torch.distributed.run, "main", seen.append)
    assert launch.main(["--nnodes", "1"]) == 0 and seen == [["--nnodes", "1"]]


@pytest.mark.multiprocess
def test_bad_input_seen_by_rank_0_only_is_one_line_and_exit_2(tmp_path):
    """A validation shard with an id outside the vocabulary: rank 0 alone reads the whole set at start (the launch
    pre-check does not), and exits 2 with its line while rank 1 waits in a collective. torchrun then exited 1 with
    its ChildFailedError traceback after the line."""
    data = tmp_path / "data"
    data.mkdir()
    write_random_shards(data, VOCAB)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=4096).astype(np.uint16)
    tokens[100] = VOCAB + 7
    write_shard(data / "valid_x_0000000000.bin", tokens)
    dump = tmp_path / "dump"
    (tmp_path / "empty.toml").write_text("")
    argv = tiny_run_args(data, dump, VOCAB, 4, 4, 1, 0, "--validation.enable", "--data.val_prefix", "valid_x")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NGPU": "2", "PYTHON": sys.executable}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(["bash", str(REPO / "run_train.sh"), "--job.config_file", str(tmp_path / "empty.toml"),
                             *argv], env=env, capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "ChildFailedError" not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"holds token id {VOCAB + 7}" in errors[0], out[-3000:]
    assert not dump.exists()  # the refused start left nothing behind


# ------------------------------------------------------------------ another world size on resume


def test_batch_layout_error_names_the_rank_counts_that_fit():
    """A checkpoint of global batch 8 x local 2 resumed on 3 ranks: the error's only fix was another
    global_batch_size, which the resume then refuses (the loader state keeps it); the rank counts that fit were
    left for the user to work out."""
    from dlm_titan.data.loader import micro_batches_per_step

    with pytest.raises(UserError, match=r"or run 1, 2 or 4 data-parallel ranks \(a resume must keep"):
        micro_batches_per_step(8, 2, 3)
    with pytest.raises(UserError) as refused:  # no rank count fits 6 sequences in micro-batches of 4
        micro_batches_per_step(6, 4, 2)
    assert "data-parallel ranks (" not in str(refused.value)
    assert micro_batches_per_step(8, 2, 4) == 1


# ------------------------------------------------------------------ degrees that do not multiply to the world size


@pytest.mark.parametrize("replicate,shard,world", [(4, 1, 2), (2, 1, 4), (3, 2, 4), (1, 3, 4), (2, 4, 4), (2, 2, 8)])
def test_degree_fix_named_resolves_and_keeps_plain_replication(replicate, shard, world):
    """The error always said "set the shard degree to -1": replicate 4 x shard 1 (DDP) on 2 ranks was then refused
    (4 does not divide 2), and replicate 2 x shard 1 on 4 ranks became HSDP 2 x 2 instead of DDP over 4. The degree
    the message names, set to -1, must resolve, and DDP's shard 1 stay DDP."""
    from types import SimpleNamespace

    from dlm_titan.distributed import resolve_parallel_dims

    def degrees(r: int, s: int) -> SimpleNamespace:
        return SimpleNamespace(data_parallel_replicate_degree=r, data_parallel_shard_degree=s)

    with pytest.raises(UserError, match="must equal the world size") as refused:
        resolve_parallel_dims(degrees(replicate, shard), world, 0)
    named = "replicate" if "data_parallel_replicate_degree -1" in str(refused.value) else "shard"
    fixed = degrees(-1, shard) if named == "replicate" else degrees(replicate, -1)
    dims = resolve_parallel_dims(fixed, world, 0)
    assert dims.replicate * dims.shard == world
    if shard == 1:
        assert dims.form == "ddp"


def test_one_node_meets_at_its_own_rendezvous_whatever_rdzv_endpoint_says(tmp_path):
    """NGPU=2 with RDZV_ENDPOINT=localhost:<port> left set (from a multi-node run) while another job used that
    endpoint with the same RDZV_ID: the run joined that job's closed rendezvous and waited, without a word, until
    the other job ended (then a TCPStore crash). One node needs no shared endpoint: a free port of its own."""
    result, calls = launch(tmp_path, NGPU="2", RDZV_ENDPOINT="localhost:29500")
    assert result.returncode == 0 and "--rdzv_endpoint localhost:0 " in calls[-1], calls
    result, calls = launch(tmp_path, NGPU="2", NNODES="2", RDZV_ENDPOINT="node0:29500")
    assert result.returncode == 0 and "--rdzv_endpoint node0:29500 " in calls[-1], calls


def test_resume_under_another_layout_warns_that_validation_reads_other_windows(tmp_path, capfd):
    """validation.steps counts micro-batches per rank: resumed with another local_batch_size (or world size) the
    validation read another number of windows, and its losses jumped at the resume without a word while the
    training losses continued exactly. A warning names both counts and the validation.steps that keeps them."""
    data = tmp_path / "data"
    data.mkdir()
    write_random_shards(data, VOCAB)
    write_shard(data / "valid_x_0000000000.bin", np.random.default_rng(2).integers(0, VOCAB, 4096).astype(np.uint16))
    dump = tmp_path / "dump"

    def args(local_batch: int, val_steps: int, *extra: str) -> list[str]:
        return tiny_run_args(data, dump, VOCAB, 4, 4, local_batch, 0, "--checkpoint.enable", "--validation.enable",
                             "--data.val_prefix", "valid_x", "--validation.steps", str(val_steps),
                             "--validation.freq", "100", "--validation.mc_samples", "1", *extra)

    run_trainer(args(2, 2), stop_after=2)  # saves step 2: 2 micro-batches of 2 on 1 rank = 4 windows
    capfd.readouterr()
    run_trainer(args(1, 2, "--checkpoint.load_step", "2"), stop_after=2)  # 2 of 1: 2 windows
    warnings = [line for line in capfd.readouterr().err.splitlines() if "validation now reads" in line]
    assert len(warnings) == 1 and "reads 2 windows" in warnings[0] and "read 4 (2 x 1 ranks)" in warnings[0]
    assert "--validation.steps 4 covers the same windows" in warnings[0]
    run_trainer(args(1, 4, "--checkpoint.load_step", "2"), stop_after=2)  # the fix it names: no warning
    assert "validation now reads" not in capfd.readouterr().err


def test_resume_of_a_run_without_validation_does_not_warn_of_other_windows(tmp_path, capfd):
    """A checkpoint saved with validation off, resumed with it on under another local_batch_size: no earlier
    validation loss to compare with, yet the resume warned that validation "now reads" other windows than the
    saving run, which read none."""
    data = tmp_path / "data"
    data.mkdir()
    write_random_shards(data, VOCAB)
    write_shard(data / "valid_x_0000000000.bin", np.random.default_rng(2).integers(0, VOCAB, 4096).astype(np.uint16))
    dump = tmp_path / "dump"
    run_trainer(tiny_run_args(data, dump, VOCAB, 4, 4, 2, 0, "--checkpoint.enable"), stop_after=2)
    capfd.readouterr()
    run_trainer(tiny_run_args(data, dump, VOCAB, 4, 4, 1, 0, "--checkpoint.enable", "--validation.enable",
                              "--data.val_prefix", "valid_x", "--validation.steps", "2", "--validation.freq", "100",
                              "--validation.mc_samples", "1"), stop_after=3)
    out, err = capfd.readouterr()
    assert "checkpoint: resumed from" in out and "validation now reads" not in err


# ------------------------------------------------------------------ more processes than GPUs


def test_more_processes_than_gpus_is_one_line_before_any_starts(tmp_path, monkeypatch, capsys):
    """NGPU=2 on a one-GPU node: the second process, once started, printed "local rank 1 has no GPU" while torchrun
    stopped the first (one line per missing GPU on a bigger node). run_train.sh's check now gets the process count
    and refuses it in one line before torchrun starts anything."""
    import torch

    from dlm_titan.train import main

    result, calls = launch(tmp_path, NGPU="2")
    assert calls[0].startswith("lws=2 ") and "DLM_TITAN" not in calls[1] and calls[1].startswith("lws= ")
    data = tmp_path / "data"
    data.mkdir()
    write_random_shards(data, VOCAB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("DLM_TITAN_CHECK_ONLY", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    argv = tiny_run_args(data, tmp_path / "dump", VOCAB, 2, 4, 1, 0)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: NGPU=2 processes on this node, but it sees 1 GPU (CUDA_VISIBLE_DEVICES included); set "
                   "NGPU (torchrun --nproc_per_node) to at most 1"]
    assert not (tmp_path / "dump").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert main(argv) == 0
