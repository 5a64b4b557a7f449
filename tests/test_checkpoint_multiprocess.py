"""Multi-process checkpoint tests (torchrun, 2 processes, gloo FSDP2 or DDP on CPU): a checkpoint saved by 2 ranks
resumes on 1, one saved by 1 resumes on 2, one saved under DDP resumes under FSDP, continuing the uninterrupted run's losses (same samples, same
noise) to within float summation order. Model, optimizer and data loader are all resharded.

Runs: the 6M model with a 256-token vocabulary on random shards, seq_len 32, global batch 8 of micro-batches
of 2 (4 per step on 1 rank, 2 per rank on 2), fp32, 8 steps, checkpoint after step 4. torchrun launches this
file (see the ``__main__`` block), which trains with the real Trainer and writes the exact logged losses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness import read_losses, run_trainer, tiny_run_args, torchrun_failure, write_random_shards

from dlm_titan.checkpoint.export import load_model

VOCAB = 256
STEPS = 8
SAVED = 4
TOL = 1e-6  # relative: 2 ranks sum gradients in another order than 1 rank's accumulation
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def train_args(data: Path, dump: Path, *extra: str) -> list[str]:
    checkpoints = ("--checkpoint.enable", "--checkpoint.interval", str(SAVED))
    return tiny_run_args(data, dump, VOCAB, STEPS, 8, 2, 1, *checkpoints, *extra)


def torchrun(argv: list[str], stop_after: int | None = None) -> dict[int, float]:
    """A 2-process launch of this file; returns rank 0's losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    if stop_after is not None:
        env["DLM_TEST_STOP_AFTER"] = str(stop_after)
    dump = Path(argv[argv.index("--job.dump_folder") + 1])
    logs = dump / "torchrun_logs"  # each rank's output, kept for the failure message
    cmd = [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           "localhost:0", "--log-dir", str(logs), "--tee", "3", __file__, *argv]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, torchrun_failure(result.stdout + result.stderr, logs)
    return read_losses(dump)


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    for step in steps:
        assert abs(got[step] - want[step]) <= TOL * abs(want[step]), f"step {step}: {got[step]!r} vs {want[step]!r}"
    # the steps differ from each other, or agreement would say nothing about training
    assert len({round(want[s], 4) for s in steps}) == len(steps)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_random_shards(tmp_path_factory.mktemp("shards"), VOCAB)


@pytest.fixture(scope="module")
def two_ranks(data, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted 2-process run (it also saves step 4, which changes nothing)."""
    return torchrun(train_args(data, tmp_path_factory.mktemp("two")))


@pytest.mark.multiprocess
def test_multiprocess_two_rank_checkpoint_resumes_on_one_rank(data, two_ranks, tmp_path, capsys):
    first = torchrun(train_args(data, tmp_path), stop_after=SAVED)
    assert first == {s: two_ranks[s] for s in range(1, SAVED + 1)}  # same launch, same numbers
    marker = json.loads((tmp_path / "checkpoint" / f"step-{SAVED}" / "complete.json").read_text())
    assert marker["world_size"] == 2
    rest = run_trainer(train_args(data, tmp_path))
    assert "data loader repositioned at step 4 (saved by 2 ranks" in capsys.readouterr().out
    assert_close(rest, two_ranks, range(SAVED + 1, STEPS + 1))


@pytest.mark.multiprocess
def test_multiprocess_one_rank_checkpoint_resumes_on_two_ranks(data, two_ranks, tmp_path):
    first = run_trainer(train_args(data, tmp_path), stop_after=SAVED)
    assert_close(first, two_ranks, range(1, SAVED + 1))
    rest = torchrun(train_args(data, tmp_path))
    assert_close(rest, two_ranks, range(SAVED + 1, STEPS + 1))
    # the final export, gathered from the 2 FSDP shards, holds the step-8 checkpoint's weights in bf16
    exported = load_model(tmp_path / "export")
    saved = load_model(tmp_path / "checkpoint" / f"step-{STEPS}", dtype="bfloat16")
    assert exported.config["step"] == STEPS
    for (name, p), q in zip(exported.named_parameters(), saved.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q), name


@pytest.mark.multiprocess
def test_multiprocess_ddp_checkpoints_and_exports_across_forms(data, two_ranks, tmp_path):
    """Plain replication (DDP: whole parameters, saved once by DCP) for 4 steps, then FSDP from its checkpoint,
    and FSDP for 4 steps, then DDP from its checkpoint: all continue the uninterrupted FSDP run, and the final
    export written under DDP holds the step-8 checkpoint's weights."""
    ddp = ("--parallelism.data_parallel_replicate_degree", "-1", "--parallelism.data_parallel_shard_degree", "1")
    first = torchrun(train_args(data, tmp_path / "a", *ddp), stop_after=SAVED)
    assert_close(first, two_ranks, range(1, SAVED + 1))
    assert_close(torchrun(train_args(data, tmp_path / "a")), two_ranks, range(SAVED + 1, STEPS + 1))

    torchrun(train_args(data, tmp_path / "b"), stop_after=SAVED)
    assert_close(torchrun(train_args(data, tmp_path / "b", *ddp)), two_ranks, range(SAVED + 1, STEPS + 1))
    exported = load_model(tmp_path / "b" / "export")
    saved = load_model(tmp_path / "b" / "checkpoint" / f"step-{STEPS}", dtype="bfloat16")
    for (name, p), q in zip(exported.named_parameters(), saved.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("launcher, sig", [("torchrun", signal.SIGTERM), ("run_train.sh", signal.SIGUSR1)])
@pytest.mark.multiprocess
def test_multiprocess_stop_signal_to_the_launcher_saves_on_both_ranks_and_resumes(data, two_ranks, tmp_path,
                                                                                 launcher, sig):
    """SIGTERM to the torchrun agent, or SIGUSR1 (Slurm's usual warning) to run_train.sh's: it forwards the
    signal to both trainers, which agree on the step to stop at (the flag is all-reduced) and save a complete
    checkpoint; a 1-process rerun continues."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "NGPU": "2", "PYTHON": sys.executable}
    env.pop("WORLD_SIZE", None)
    args = train_args(data, tmp_path, "--checkpoint.interval", "100")
    if launcher == "torchrun":
        cmd = [*TORCHRUN, "--nnodes", "1", "--nproc_per_node", "2", "--rdzv_backend", "c10d", "--rdzv_endpoint",
               "localhost:0", "-m", "dlm_titan.train", *args]
    else:  # the script execs torchrun after its config check, so the signal reaches the agent
        (tmp_path / "empty.toml").write_text("")  # defaults, as the other runs (else it adds debug.toml)
        cmd = ["bash", str(Path(__file__).resolve().parents[1] / "run_train.sh"), "--job.config_file",
               str(tmp_path / "empty.toml"), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step: 2 "):
            proc.send_signal(sig)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    # (the agent itself then exits 1 with torchrun's SignalException: its behaviour, documented in README)
    saved = [p for p in (tmp_path / "checkpoint").glob("step-*") if (p / "complete.json").is_file()]
    assert len(saved) == 1, out[-4000:]
    step = int(saved[0].name.split("-")[1])
    assert 2 <= step < STEPS and f"stopping at step {step} on signal {sig.name}" in out
    assert json.loads((saved[0] / "complete.json").read_text())["world_size"] == 2
    rest = run_trainer(train_args(data, tmp_path, "--checkpoint.interval", "100"))
    assert_close(rest, two_ranks, range(step + 1, STEPS + 1))


if __name__ == "__main__":  # a torchrun worker: train with the given CLI arguments
    stop = os.environ.get("DLM_TEST_STOP_AFTER")
    run_trainer(sys.argv[1:], int(stop) if stop else None)
