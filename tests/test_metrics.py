"""Metrics: MFU by hand, loss-by-t buckets, the console line, W&B sink, throughput window, and a 20-step CPU
run whose TensorBoard event files hold every logged scalar."""

import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from harness import tiny_run_args, write_random_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dlm_titan.config import load_config
from dlm_titan.metrics import (
    LossByTimeBins,
    MetricsLogger,
    ThroughputWindow,
    bucket_means,
    mfu,
    model_flops_per_token,
)
from dlm_titan.metrics import throughput as throughput_mod
from dlm_titan.metrics import train_metrics as train_metrics_mod
from dlm_titan.models import get_model_args

ROOT = Path(__file__).resolve().parents[1]


def test_mfu_of_170m_at_seq_2048_by_hand():
    # 170M: 18 layers, d 768, d_ff 3072, vocab 32000. Parameters without the input embedding: the blocks
    # (18 * (4 * 768^2 + 3 * 768 * 3072 + 2 * 768)), the final norm (768) and the head (32000 * 768).
    blocks = 18 * (4 * 768 * 768 + 3 * 768 * 3072 + 2 * 768) + 768
    params = blocks + 32000 * 768
    assert blocks == 169_897_728
    per_token = 6 * params + 12 * 18 * 768 * 2048  # = 1,506,580,992
    assert model_flops_per_token(get_model_args("170M"), 2048) == per_token == 1_506_580_992
    tokens_per_s = 45_000.0
    expected = tokens_per_s * 1_506_580_992 / 989e12  # H100 SXM dense bf16 peak
    assert mfu(tokens_per_s, per_token, "NVIDIA H100 80GB HBM3") == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.068550, abs=1e-6)
    assert mfu(tokens_per_s, per_token, "NVIDIA A100-SXM4-80GB") == pytest.approx(tokens_per_s * per_token / 312e12)


def test_no_mfu_without_a_known_peak():
    assert mfu(1e5, 1e9, None) is None  # CPU
    assert mfu(1e5, 1e9, "Imaginary GPU 9000") is None


def test_t_buckets_mean_per_bin():
    b = LossByTimeBins(torch.device("cpu"))
    b.add(torch.tensor([0.0, 0.05, 0.0999, 0.1, 0.95, 1.0]), torch.tensor([1.0, 2.0, 3.0, 10.0, 7.0, 9.0]))
    b.add(torch.tensor([0.55]), torch.tensor([4.0]))
    out = b.scalars(prefix="x/")
    assert out == {"x/0.0-0.1": 2.0, "x/0.1-0.2": 10.0, "x/0.5-0.6": 4.0, "x/0.9-1.0": 8.0}
    assert b.scalars(prefix="x/") == {}  # cleared after reading


@pytest.mark.slow
def test_logged_step_is_read_one_step_later_with_its_own_values(tmp_path, monkeypatch):
    """A logged step's metrics are read after the next step is queued (so the GPU never waits for the host's
    logging), yet they are that step's: its loss, grad norm, lr, token count and peak memory (read as the step
    was queued, before the next step allocates). The last step logs at once. The trainer defers on GPUs only
    (CPU work runs as it is issued); here it is told to."""
    from dlm_titan.train import Trainer

    seq, gbs = 32, 4
    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", vocab=512)
    cfg = load_config(tiny_run_args(data, tmp_path / "out", 512, 7, gbs, 2, 0, "--metrics.log_freq", "3"))
    trainer = Trainer(cfg)
    trainer.metrics.defer = True
    events, steps, logged = [], {}, {}
    train_step, log = trainer.train_step, trainer.metrics.log

    def recording_step(step):
        lr = trainer.optimizer.param_groups[0]["lr"]  # what this step's update will use
        out = train_step(step)
        steps[step] = dict(loss=out["loss_sum"].item(), grad_norm=out["grad_norm"].item(), lr=lr, masked=out["masked"])
        events.append(("step", step))
        return out

    def recording_log(step, metrics):
        logged[step] = metrics
        events.append(("log", step))
        log(step, metrics)

    trainer.train_step, trainer.metrics.log = recording_step, recording_log
    take, buckets = trainer.metrics.loss_by_t.take, {}

    def recording_take():  # the loss-by-t sums, as taken at each logged step
        buckets[trainer.step] = take()
        return buckets[trainer.step]

    trainer.metrics.loss_by_t.take = recording_take
    # Stand-in for the allocator's peak counters: the step being trained when they are read.
    monkeypatch.setattr(train_metrics_mod, "device_memory", lambda device: {"memory_gib": float(trainer.step)})
    trainer.train()
    assert events == [("step", 1), ("step", 2), ("log", 1), ("step", 3), ("step", 4), ("log", 3), ("step", 5),
                      ("step", 6), ("step", 7), ("log", 6), ("log", 7)]
    assert all(steps[s]["lr"] != steps[s + 1]["lr"] for s in (1, 3))  # a mix-up of steps would show
    assert steps[1]["lr"] == pytest.approx(cfg.optimizer.lr / 2)  # step 1 of a 2-step linear warmup
    for step, m in logged.items():
        want = steps[step]
        assert m["loss"] == pytest.approx(want["loss"], rel=1e-12)
        assert m["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-12)
        assert m["lr"] == want["lr"]
        assert m["tokens_seen"] == step * gbs * seq
        assert m["masked_fraction"] == want["masked"] / (gbs * seq)
        assert m["memory_gib"] == step
        by_t = {k: v for k, v in m.items() if k.startswith("loss_by_t/")}
        assert by_t and by_t == bucket_means(buckets[step])


@pytest.mark.slow
def test_a_deferred_log_is_still_printed_when_the_next_step_raises(tmp_path, monkeypatch, capsys):
    """on_nonfinite = "raise" on a GPU raises one step late (in the next step); the pending line of the step it
    names is printed first."""
    import dlm_titan.train as train_module

    (tmp_path / "data").mkdir()
    data = write_random_shards(tmp_path / "data", vocab=512)
    trainer = train_module.Trainer(load_config(tiny_run_args(data, tmp_path / "out", 512, 7, 4, 2, 0,
                                                             "--metrics.log_freq", "3")))
    trainer.metrics.defer = True
    trainer.nonfinite.defer_raise = True  # as on a GPU
    clip = train_module.clip_grad_norm

    def nan_at_step_3(params, max_norm, optimizer):
        norm, scale = clip(params, max_norm, optimizer)
        return (norm * float("nan") if trainer.step == 3 else norm), scale

    monkeypatch.setattr(train_module, "clip_grad_norm", nan_at_step_3)
    logged = []
    log = trainer.metrics.log
    trainer.metrics.log = lambda step, metrics: (logged.append(step), log(step, metrics))
    with pytest.raises(FloatingPointError, match="step 3"):
        trainer.train()
    assert logged == [1, 3]
    assert "warning: non-finite grad norm at step 3" in capsys.readouterr().out


def test_console_line_format_and_no_colour_off_a_tty(capsys):
    logger = MetricsLogger(None, rank=0, enable_tensorboard=False)
    logger.log(5, {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5, "tokens_per_s": 12345.6, "mfu": 0.4123,
                   "memory_gib": 3.5, "step_time_s": 0.25, "data_wait_fraction": 0.01, "masked_fraction": 0.5})
    logger.log_validation(5, {"validation/loss": 2.0}, "loss 2.0000 +- 0.1000")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("step: 5  loss: 1.2346  lr: 2.000e-04  grad_norm: 0.500  tokens/s: 12,346  mfu: 41.23%")
    assert "\033[" not in out[0]
    # the validation line must never be taken for a training line by `^step: N` / `loss: X` parsers
    assert out[1] == "validation at step 5 -- loss 2.0000 +- 0.1000"
    assert not re.search(r"step: |loss: ", out[1])


def test_other_ranks_print_nothing(capsys):
    MetricsLogger(None, rank=1, enable_tensorboard=True).log(3, {"loss": 1.0})
    assert capsys.readouterr().out == ""


def test_wandb_receives_the_scalars(monkeypatch, tmp_path):
    calls = []
    fake = types.SimpleNamespace(
        init=lambda **kw: calls.append(("init", kw)),
        log=lambda scalars, step: calls.append(("log", scalars, step)),
        finish=lambda: calls.append(("finish",)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = MetricsLogger(tmp_path / "tb", 0, False, enable_wandb=True, wandb_config={"job": {"description": "d"}})
    logger.log(7, {"loss": 1.5, "mfu": None, "loss_by_t/train_t0.0-0.1": 3.0})
    logger.log_validation(7, {"validation/loss": 2.5}, "x")
    logger.close()
    assert calls[0][0] == "init" and calls[0][1]["name"] == "d" and calls[0][1]["dir"] == str(tmp_path)
    assert calls[1] == ("log", {"loss/train": 1.5, "loss_by_t/train_t0.0-0.1": 3.0}, 7)
    assert calls[2] == ("log", {"validation/loss": 2.5}, 7)
    assert calls[3] == ("finish",)


def test_missing_wandb_warns_and_continues(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    logger = MetricsLogger(None, 0, False, enable_wandb=True)
    logger.log(1, {"loss": 1.0})
    out = capsys.readouterr().out
    assert "wandb is not installed" in out and "step: 1  loss: 1.0000" in out


def test_throughput_window(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(throughput_mod.time, "perf_counter", lambda: now[0])
    w = ThroughputWindow()
    for _ in range(4):
        w.add(tokens=1000, data_time=0.5)
    now[0] += 13.0
    w.exclude(3.0)  # e.g. a validation run inside the window
    rates = w.read(world_size=2)
    assert rates == {"tokens_per_s": 400.0, "tokens_per_s_per_device": 200.0, "step_time_s": 2.5,
                     "data_time_s": 0.5, "data_wait_fraction": 0.2}
    now[0] += 2.0
    w.add(tokens=10, data_time=0.0)
    assert w.read(world_size=1)["tokens_per_s"] == 5.0  # the window restarted at the last read


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


@pytest.mark.multiprocess
def test_twenty_step_cpu_run_writes_every_scalar(tmp_path):
    seq, gbs = 32, 4
    out = tmp_path / "out"
    args = ["--training.steps", "20", "--training.seq_len", str(seq), "--training.global_batch_size", str(gbs),
            "--training.local_batch_size", "2", "--metrics.log_freq", "10", "--job.no_print_config",
            "--data.num_workers", "0", "--validation.enable", "--validation.freq", "10", "--validation.steps", "2",
            "--validation.mc_samples", "2", "--profiling.enable_profiling", "--profiling.profile_freq", "10",
            "--job.dump_folder", str(out)]
    result = subprocess.run([sys.executable, "-m", "dlm_titan.train", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=900, env={**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    scalars = _scalars(out / "tb")
    logged = {"loss/train", "optim/lr", "optim/grad_norm", "throughput/tokens_per_s",
              "throughput/tokens_per_s_per_device", "progress/tokens_seen", "diffusion/masked_fraction",
              "time/step_s", "time/data_wait_s", "time/data_wait_fraction", "memory/max_rss_gib"}
    for tag in logged:
        assert sorted(scalars.get(tag, {})) == [1, 10, 20], tag
    for tag in ("validation/loss", "validation/ppl_bound", "validation/stderr", "validation/time_s"):
        assert sorted(scalars.get(tag, {})) == [10, 20], tag
    assert "throughput/mfu" not in scalars  # CPU: no known peak, so no MFU rather than a wrong one
    assert "memory/max_active_gib" not in scalars  # CUDA-only readings
    train_t = [tag for tag in scalars if tag.startswith("loss_by_t/train_t")]
    val_t = [tag for tag in scalars if tag.startswith("loss_by_t/validation_t")]
    assert train_t and val_t

    # the event files agree with the console and with each other
    lines = {int(m[1]): float(m[2]) for m in re.finditer(r"^step: (\d+)  loss: (\S+)", result.stdout, re.M)}
    assert sorted(lines) == [1, 10, 20]
    for step, loss in lines.items():
        assert scalars["loss/train"][step] == pytest.approx(loss, abs=6e-5)
        assert scalars["progress/tokens_seen"][step] == step * gbs * seq
        assert 0.0 < scalars["diffusion/masked_fraction"][step] < 1.0
    for step in (10, 20):
        v = {k: scalars[f"validation/{k}"][step] for k in ("loss", "ppl_bound", "stderr")}
        assert v["ppl_bound"] == pytest.approx(math.exp(v["loss"]), rel=1e-5) and 0 < v["stderr"] < v["loss"]
    assert scalars["validation/loss"][20] < scalars["validation/loss"][10]  # it learns, and validation sees it
    assert "validation at step 10 -- loss " in result.stdout
    assert scalars["throughput/tokens_per_s"][20] == pytest.approx(scalars["throughput/tokens_per_s_per_device"][20])

    for step in (10, 20):
        trace = out / "profile_traces" / f"iteration_{step}" / "rank0_trace.json"
        assert json.loads(trace.read_text())["traceEvents"], trace
    assert sorted(p.name for p in (out / "profile_traces").iterdir()) == ["iteration_10", "iteration_20"]
