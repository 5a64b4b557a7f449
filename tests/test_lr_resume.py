"""The schedule follows the config: the lr is a pure function of (step, this run's config), and betas, eps and
weight decay are this run's, also after a resume from a checkpoint saved under other values.

References are computed here from the documented formula (linear warmup to the peak over ``warmup`` steps,
``warmup`` = max(1% of steps, 100) capped at the run for -1; then cosine from the peak to min_lr ending at the last
step), not from dlm_titan.optim.
"""

import math
import re

import pytest
import torch
from harness import tiny_run_args, write_random_shards

from dlm_titan.config import LRScheduler, load_config
from dlm_titan.optim import LRSchedule

VOCAB = 256
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_lr(step: int, steps: int, peak: float, warmup_cfg: int = -1, min_lr: float = 2e-5) -> float:
    warmup = min(max(steps // 100, 100) if warmup_cfg == -1 else warmup_cfg, steps)
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / (steps - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_random_shards(tmp_path_factory.mktemp("shards"), VOCAB)


def train(shards, dump, steps: int, *extra: str):
    """Runs the real Trainer; returns it, the hyper-parameters each optimizer update used (in order) and the lr
    each console line logged, by step."""
    from dlm_titan.train import Trainer

    args = tiny_run_args(shards, dump, VOCAB, steps, 4, 2, 0, "--checkpoint.enable", "--checkpoint.interval", "100",
                         "--lr_scheduler.warmup_steps", "-1", "--optimizer.lr", "1e-3", *extra)
    trainer = Trainer(load_config(args))
    used = []
    keys = ("lr", "betas", "eps", "weight_decay")
    trainer.optimizer.register_step_pre_hook(
        lambda opt, *_: used.append({k: opt.param_groups[0][k] for k in keys}))
    trainer.train()
    return trainer, used


def logged_lrs(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step:\s*(\d+)\b.*?\blr:\s*([-+0-9.e]+)", stdout, re.M)}


@pytest.mark.slow
def test_extending_a_run_on_resume_follows_the_new_schedule(shards, tmp_path, capsys):
    """A 4-step run (warmup -1 -> 4 steps) saved at step 4, resumed with --training.steps 6: steps 5 and 6 run at
    the 6-step schedule's lr (step 5: 5/6 of the peak = 8.33e-4), not at the old schedule's floor."""
    dump = tmp_path / "run"
    _, first = train(shards, dump, 4)
    assert [u["lr"] for u in first] == pytest.approx([reference_lr(s, 4, 1e-3) for s in (1, 2, 3, 4)], rel=1e-12)
    assert "resumed with this run's config" not in capsys.readouterr().out  # a fresh run has nothing to say
    trainer, resumed = train(shards, dump, 6)
    out = capsys.readouterr().out
    assert trainer.step == 6 and len(resumed) == 2
    assert resumed[0]["lr"] == pytest.approx(reference_lr(5, 6, 1e-3), rel=1e-12)
    assert reference_lr(5, 6, 1e-3) == pytest.approx(8.333e-4, rel=1e-4)  # the example
    assert resumed[1]["lr"] == pytest.approx(reference_lr(6, 6, 1e-3), rel=1e-12)
    logged = logged_lrs(out)
    assert logged[5] == pytest.approx(reference_lr(5, 6, 1e-3), rel=1e-3), out  # the console prints 4 digits
    assert logged[6] == pytest.approx(reference_lr(6, 6, 1e-3), rel=1e-3), out
    notes = " ".join(trainer.lr_scheduler.resume_notes)
    assert "training.steps 6 (checkpoint: 4)" in notes and "lr_scheduler.warmup_steps 6 (checkpoint: 4)" in notes
    printed = [line for line in out.splitlines() if line.startswith("resumed with this run's config")]
    assert len(printed) == 1 and "training.steps 6 (checkpoint: 4)" in printed[0], out  # said at start


@pytest.mark.slow
def test_new_hyperparameters_on_resume_take_effect(shards, tmp_path):
    """Resumed with another peak lr, warmup, length, weight decay, betas and eps: every update after the resume
    uses this run's values (the optimizer's groups restored from the checkpoint held the old ones)."""
    dump = tmp_path / "run"
    train(shards, dump, 4, "--optimizer.weight_decay", "0.1", "--optimizer.betas", "0.9", "0.95")
    trainer, resumed = train(shards, dump, 8, "--optimizer.lr", "2e-3", "--lr_scheduler.warmup_steps", "2",
                             "--optimizer.weight_decay", "0.05", "--optimizer.betas", "0.8", "0.9",
                             "--optimizer.eps", "1e-6")
    assert [u["lr"] for u in resumed] == pytest.approx(
        [reference_lr(s, 8, 2e-3, warmup_cfg=2) for s in (5, 6, 7, 8)], rel=1e-12)
    for u in resumed:
        assert (u["weight_decay"], tuple(u["betas"]), u["eps"]) == (0.05, (0.8, 0.9), 1e-6)
    notes = " ".join(trainer.lr_scheduler.resume_notes)
    for change in ("optimizer.lr 0.002 (checkpoint: 0.001)", "optimizer.weight_decay 0.05 (checkpoint: 0.1)",
                   "optimizer.betas [0.8, 0.9] (checkpoint: [0.9, 0.95])", "optimizer.eps 1e-06 (checkpoint: 1e-08)"):
        assert change in notes, notes


def _optimizer(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8):
    params = [torch.nn.Parameter(torch.ones(3))]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False)


def test_schedule_is_a_pure_function_of_step_and_config():
    opt = _optimizer()
    sched = LRSchedule(opt, LRScheduler(warmup_steps=3, min_lr=1e-4), peak_lr=1e-3, total_steps=10)
    seen = []
    for _ in range(12):
        seen.append(sched.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == seen[-1]
        sched.step()
    expected = [reference_lr(s, 10, 1e-3, warmup_cfg=3, min_lr=1e-4) for s in range(1, 11)] + [1e-4, 1e-4]
    assert seen == pytest.approx(expected, rel=1e-12)


def test_state_is_the_step_count_and_this_configs_values_win():
    """Only the step count is restored: after the optimizer's own load has put the saved groups back, loading the
    schedule's state puts this run's lr, betas, eps and weight decay into them and notes each change."""
    old_opt = _optimizer()
    old = LRSchedule(old_opt, LRScheduler(warmup_steps=2), peak_lr=1e-3, total_steps=4)
    for _ in range(4):
        old.step()
    opt = _optimizer(lr=5e-4, weight_decay=0.0, betas=(0.8, 0.99), eps=1e-7)
    new = LRSchedule(opt, LRScheduler(warmup_steps=2), peak_lr=5e-4, total_steps=6)
    opt.load_state_dict(old_opt.state_dict())  # as a resume does: the saved groups come back first
    assert opt.param_groups[0]["weight_decay"] == 0.1
    new.load_state_dict(old.state_dict())
    group = opt.param_groups[0]
    assert new.last_epoch == 4
    assert group["lr"] == pytest.approx(reference_lr(5, 6, 5e-4, warmup_cfg=2), rel=1e-12)
    assert (group["weight_decay"], tuple(group["betas"]), group["eps"]) == (0.0, (0.8, 0.99), 1e-7)
    assert len(new.resume_notes) == 1 and "optimizer.lr 0.0005 (checkpoint: 0.001)" in new.resume_notes[0]


def test_checkpoints_of_torchs_lambdalr_still_load():
    """Checkpoints written before this schedule hold torch's LambdaLR state: its step count is read, its saved
    base lr is only reported."""
    old_opt = _optimizer()
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(old_opt, lambda i: 0.5)
    for _ in range(3):
        old_opt.step()
        lambda_lr.step()
    opt = _optimizer(lr=2e-3)
    new = LRSchedule(opt, LRScheduler(warmup_steps=1), peak_lr=2e-3, total_steps=5)
    opt.load_state_dict(old_opt.state_dict())
    new.load_state_dict(lambda_lr.state_dict())
    assert new.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(reference_lr(4, 5, 2e-3, warmup_cfg=1), rel=1e-12)
    assert "optimizer.lr 0.002 (checkpoint: 0.001)" in new.resume_notes[0]


def test_an_unchanged_config_notes_nothing():
    opt = _optimizer()
    sched = LRSchedule(opt, LRScheduler(), peak_lr=1e-3, total_steps=5)
    sched.step()
    again = LRSchedule(_optimizer(), LRScheduler(), peak_lr=1e-3, total_steps=5)
    again.load_state_dict(sched.state_dict())
    assert again.resume_notes == [] and again.last_epoch == 1
