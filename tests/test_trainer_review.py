"""Review of the training loop's edges: a failing W&B sink must not end a run, a profiler resumed one step
before a multiple of profile_freq still traces that step, and a stop signal pending before validation saves
without validating first."""

import os
import signal
import sys
import types

import numpy as np
import torch
from harness import single_torch_thread, tiny_run_args, write_random_shards

from dlm_titan import distributed as dist_utils
from dlm_titan.config import load_config
from dlm_titan.data.shards import write_shard
from dlm_titan.metrics import MetricsLogger
from dlm_titan.profiling import Profiler
from dlm_titan.train import Trainer


def _failing_wandb(calls: list, fail_init: bool = False):
    def init(**kw):
        if fail_init:
            raise RuntimeError("api_key not configured (no-tty)")
        calls.append("init")

    def log(scalars, step):
        calls.append(("log", step))
        raise BrokenPipeError("The wandb backend process has shutdown")

    return types.SimpleNamespace(init=init, log=log, finish=lambda: calls.append("finish"))


def test_a_failing_wandb_log_warns_once_and_training_logging_goes_on(monkeypatch, capsys):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _failing_wandb(calls))
    logger = MetricsLogger(None, 0, False, enable_wandb=True)
    logger.log(1, {"loss": 1.0})  # raised out of the training loop before
    logger.log(2, {"loss": 0.5})
    logger.log_validation(2, {"validation/loss": 2.0}, "x")
    logger.close()
    captured = capsys.readouterr()
    assert "step: 1  loss: 1.0000" in captured.out and "step: 2  loss: 0.5000" in captured.out
    assert captured.err.count("W&B logging stopped") == 1
    assert calls == ["init", ("log", 1)]  # no further log (nor a finish of the broken run)


def test_a_failing_wandb_init_warns_and_the_console_keeps_logging(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", _failing_wandb([], fail_init=True))
    logger = MetricsLogger(None, 0, False, enable_wandb=True)
    logger.log(1, {"loss": 1.0})
    logger.close()
    captured = capsys.readouterr()
    assert "step: 1  loss: 1.0000" in captured.out and "api_key not configured" in captured.err


def _profiling(tmp_path, freq: int):
    return types.SimpleNamespace(profile_freq=freq, save_traces_folder="traces", save_memory_snapshot_folder="mem",
                                 enable_profiling=True, enable_memory_snapshot=False)


def test_profiler_resumed_just_before_a_multiple_of_freq_traces_it(tmp_path):
    # Resumed at step 9 with profile_freq 10: step 10 is due (as in a fresh run, steps N % freq == 0).
    with Profiler(_profiling(tmp_path, 10), tmp_path, 0, torch.device("cpu"), start_step=9, log=lambda *a: None) as p:
        for _ in range(2):  # steps 10 and 11
            torch.ones(4).sum()
            p.step()
    assert sorted(x.name for x in (tmp_path / "traces").iterdir()) == ["iteration_10"]


def test_a_stop_signal_pending_before_validation_saves_without_validating(tmp_path):
    # SIGTERM arrives while step 2 trains; step 2 is a validation step. Slurm's grace period is short, so the
    # trainer must save and stop rather than validate first (a validation can take minutes).
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", vocab=256)
    write_shard(data / "validation_0000000000.bin", np.random.default_rng(1).integers(0, 256, 2048).astype(np.uint16))
    args = tiny_run_args(data, tmp_path / "out", 256, 4, 4, 2, 0, "--checkpoint.enable", "--checkpoint.interval",
                         "100", "--validation.enable", "--validation.freq", "2", "--validation.steps", "1",
                         "--validation.mc_samples", "1")
    validated: list[int] = []
    try:
        with single_torch_thread():
            trainer = Trainer(load_config(args))
            run, step = trainer.validator.run, trainer.train_step

            def validate():
                validated.append(trainer.step)
                return run()

            def train_step(n):
                out = step(n)
                if n == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                return out

            trainer.validator.run, trainer.train_step = validate, train_step
            trainer.train()
    finally:
        dist_utils.shutdown()
    assert trainer.step == 2 and validated == []
    assert trainer.checkpointer.step_folder(2).is_dir()


def test_a_run_that_fails_gives_the_stop_signal_handlers_back(tmp_path):
    # The trainer records SIGTERM instead of dying on it; when a run fails (a bad shard mid-run, a bug), a process
    # that lives on (a sweep driver, a notebook, pytest) must die on SIGTERM again, not swallow it forever.
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", vocab=256)
    args = tiny_run_args(data, tmp_path / "out", 256, 4, 4, 2, 0, "--checkpoint.enable")
    before = signal.getsignal(signal.SIGTERM)
    try:
        with single_torch_thread():
            trainer = Trainer(load_config(args))
            assert signal.getsignal(signal.SIGTERM) is not before  # installed

            def broken_step(n):
                raise RuntimeError("a bug at step 1")

            trainer.train_step = broken_step
            try:
                trainer.train()
            except RuntimeError:
                pass
    finally:
        dist_utils.shutdown()
    assert signal.getsignal(signal.SIGTERM) is before
