"""The trainer from the outside: bad input exits 2 with one line, --help lists every option, a short run
through run_train.sh trains, logs and saves its config."""

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from dlm_titan.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--training.seq_len", "32", "--training.global_batch_size", "4", "--training.local_batch_size", "2",
        "--metrics.log_freq", "1", "--job.no_print_config", "--data.num_workers", "0"]


def run(args, tmp_path, launcher=(sys.executable, "-m", "dlm_titan.train"), env=None):
    return subprocess.run(
        [*launcher, *args, "--job.dump_folder", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--job.config_file", "missing.toml"], "config file not found: missing.toml"),
        (["--training.stepz", "3"], "unknown option --training.stepz; did you mean --training.steps?"),
        (["--model.flavor", "7M"], "unknown model flavor '7M'"),
        (["--training.global_batch_size", "10", "--training.local_batch_size", "4"], "must be a multiple of local_batch_size"),
    ],
)
@pytest.mark.multiprocess
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = run(args, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.mark.multiprocess
def test_unknown_toml_key_exit_2(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[training]\nsteps = 3\n[optimizer]\nlearning_rate = 0.1\n")
    result = run(["--job.config_file", str(config)], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key [optimizer].learning_rate; valid keys: lr, betas, eps, weight_decay, implementation"


@pytest.mark.multiprocess
def test_help_lists_every_option(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dlm_titan.train", "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0
    for section, cls in typing.get_type_hints(JobConfig).items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}" in result.stdout, f"--{section}.{f.name}"


@pytest.mark.multiprocess
def test_run_train_sh_trains_logs_and_saves_config(tmp_path):
    result = run(["--training.steps", "3", *TINY], tmp_path, launcher=("./run_train.sh",), env={"PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step: ")]
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert all("loss: " in line and "lr: " in line and "tokens/s: " in line for line in lines)
    saved = (tmp_path / "out" / "config.toml").read_text()
    assert "flavor = \"6M\"" in saved and "seq_len = 32" in saved
    assert list((tmp_path / "out" / "tb").glob("events.out.tfevents.*"))


@pytest.mark.multiprocess
def test_flops_budget_sets_steps(tmp_path):
    # 6M: N = 6,294,784; batch 4 x 32 -> 6 N 128 = 4.834e9 FLOPs/step; 1.5e10 -> 3 steps.
    result = run(["--training.flops_budget", "1.5e10", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training: 3 steps, 384 tokens, warmup 3 steps" in result.stdout
    assert "step: 3 " in result.stdout and "step: 4 " not in result.stdout


@pytest.mark.multiprocess
def test_run_train_sh_two_processes_prints_plain_step_lines(tmp_path):
    """NGPU=2 goes through torchrun (gloo on CPU); rank 0's lines keep the `step: N  loss: X` form."""
    env = {"PYTHON": sys.executable, "NGPU": "2", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = run(["--training.steps", "2", *TINY, "--checkpoint.no_enable"], tmp_path, launcher=("./run_train.sh",), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line.split()[1] for line in result.stdout.splitlines() if line.startswith("step: ")] == ["1", "2"]
    assert "2 ranks x 1 micro-batches x 2" in result.stdout


@pytest.mark.multiprocess
def test_run_train_sh_checks_config_before_starting_processes(tmp_path):
    env = {"PYTHON": sys.executable, "NGPU": "2"}
    result = run(["--training.global_batch_size", "6", "--training.local_batch_size", "4"], tmp_path,
                 launcher=("./run_train.sh",), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: training.global_batch_size=6 must be a multiple of local_batch_size x data-parallel ranks = 4 x 2 = 8; "
        "set training.global_batch_size to 8 (or change local_batch_size)"
    ]
