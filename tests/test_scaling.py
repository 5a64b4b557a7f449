"""Scaling-law workflow: SMDM's step counts from the CLI, fits that recover known laws, TensorBoard reading
(with resumes and the training-loss fallback), sweep configs and launch commands, and a tiny real sweep on the
embedded corpus."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dlm_titan.config import load_config
from dlm_titan.errors import UserError
from dlm_titan.scaling import (
    TRAIN_LOSS_TAG,
    VALIDATION_LOSS_TAG,
    budget_label,
    fit_isoflop,
    fit_parabola,
    fit_power_law,
    plan_run,
    plot_isoflop,
    read_final_loss,
    read_scalars,
)

ROOT = Path(__file__).resolve().parents[1]
# Non-embedding N from DESIGN.md's table (SMDM's model_para_config), not from our code.
N_TABLE = {"6M": 6_294_784, "19M": 18_880_896, "34M": 33_563_136, "48M": 47_786_688, "66M": 65_549_440,
           "85M": 85_214_080, "170M": 169_897_728, "1028M": 1_027_677_952}


def sweep(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "scripts.isoflop_sweep", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "NO_COLOR": "1"})


def table_rows(stdout: str) -> dict[str, list[str]]:
    """Plan table rows by run name, cells split on runs of 2+ spaces."""
    rows = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) == 10 and cells[0] != "run" and not cells[0].startswith("-"):
            rows[cells[0]] = cells
    return rows


# ------------------------------------------------------------------------------------------------ planning


@pytest.mark.multiprocess
def test_dry_run_reproduces_smdm_step_counts(tmp_path):
    out = tmp_path / "sweep"
    result = sweep("--budgets", "1e19,1.6e21", "--flavors", "170M,1028M", "--dry-run", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    # SMDM pretrain/train_mdm.py at batch 256 x 2048: 170M @ 10e18 -> 18,710; 1028M @ 1600e18 -> 494,927.
    assert rows["1e19-170M"][4] == "18,710" and rows["1e19-170M"][7] == "9,809,428,480"
    assert rows["1.6e21-1028M"][4] == "494,927" and rows["1.6e21-1028M"][7] == "259,484,286,976"
    assert rows["1e19-170M"][5] == "187" and rows["1.6e21-1028M"][5] == "4,949"  # max(1%, 100)
    assert rows["1e19-1028M"][5] == "100"
    assert not out.exists(), "a dry run writes nothing"


def test_plan_with_ssl_uses_the_mean_length():
    # SMDM README: 170M at 60e18 with --ssl_ratio 0.01 -> 112,828 steps.
    plan = plan_run(6e19, "170M", 256, 2048, ssl_ratio=0.01)
    assert plan.steps == 112_828
    assert plan.tokens == pytest.approx(112_828 * 256 * (2048 * 0.99 + 0.01 * 2049 / 2))
    assert plan.flops <= 6e19 < 6 * N_TABLE["170M"] * (plan.steps + 1) * 256 * (2048 * 0.99 + 0.01 * 2049 / 2)


@pytest.mark.parametrize("steps_budget, warmup_cfg", [(1e19, -1), (1e17, -1), (3e15, -1), (1e19, 50), (3e15, 5000)])
def test_plan_warmup_matches_the_trainer(steps_budget, warmup_cfg):
    from dlm_titan.optim import resolve_warmup_steps

    plan = plan_run(steps_budget, "170M", 256, 2048, warmup_steps=warmup_cfg)
    assert plan.warmup_steps == resolve_warmup_steps(warmup_cfg, plan.steps)


def test_budget_labels():
    assert [budget_label(c) for c in (1e18, 3e18, 1.6e21, 2.5e10, 7.5e9)] == ["1e18", "3e18", "1.6e21", "2.5e10", "7.5e9"]


@pytest.mark.parametrize("args, message", [
    (["--budgets", "1e9", "--flavors", "170M"], "budget 1e9 buys no step of 170M at batch 256 x 2048"),
    (["--budgets", "1e19", "--flavors", "7M"], "unknown model flavor '7M'"),
    (["--budgets", "1e19", "--flavors", "6M", "--", "--training.seq_len", "64"],
     "--training.seq_len is set by the sweep; use the sweep option --seq_len instead"),
    (["--budgets", "1e19", "--flavors", "6M", "--global_batch_size", "10", "--local_batch_size", "4"],
     "--global_batch_size 10 is not a multiple of --local_batch_size 4"),
    (["--collect_only"], "plan.json not found"),
    (["--flavors", "6M"], "--budgets and --flavors are required (except with --collect_only)"),
    (["--budgets", "1e19,-3", "--flavors", "6M"], "budgets must be positive numbers"),
])
@pytest.mark.multiprocess
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = sweep("--dry-run", "--output_dir", str(tmp_path / "none"), *args)  # after `--` go trainer flags
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


# ------------------------------------------------------------------------------------------------ fitting

# A known isoFLOP law at SMDM's budgets: N_opt = K C^B, L_opt = A C^ALPHA, loss = L_opt + CURV (log10 N/N_opt)^2.
BUDGETS = [6e18, 1e19, 3e19, 6e19, 1e20]
B, ALPHA, CURV = 0.55, -0.048, 0.3
K = 113e6 / 1e19**B
A = 3.18 / 1e19**ALPHA


def law_points(noise: float, seed: int = 0, sizes: int = 9):
    rng = np.random.default_rng(seed)
    points = []
    for c in BUDGETS:
        n_opt, l_opt = K * c**B, A * c**ALPHA
        for n in n_opt * np.logspace(-0.6, 0.6, sizes):
            points.append((c, n, l_opt + CURV * np.log10(n / n_opt) ** 2 + rng.normal(0, noise)))
    return points


def test_fit_parabola_recovers_a_known_parabola():
    rng = np.random.default_rng(1)
    a, b, c = 0.3, -4.8, 22.4  # vertex at log10 N = 8, loss 3.2
    x = np.linspace(7.2, 8.8, 15)
    loss = a * x**2 + b * x + c + rng.normal(0, 1e-4, x.size)
    p = fit_parabola(10.0**x, loss)
    for got, want in ((p.a, a), (p.b, b), (p.c, c), (p.n_opt, 1e8), (p.loss_opt, 3.2)):
        assert got == pytest.approx(want, rel=0.01)
    exact = fit_parabola(10.0**x, a * x**2 + b * x + c)
    assert (exact.a, exact.b, exact.c) == pytest.approx((a, b, c), rel=1e-9)


def test_fit_power_law_recovers_a_known_law():
    c = np.geomspace(1e18, 1e21, 7)
    rng = np.random.default_rng(2)
    y = 2.5e-3 * c**0.5 * np.exp(rng.normal(0, 2e-3, c.size))
    law = fit_power_law(c, y)
    assert law.exponent == pytest.approx(0.5, rel=0.01)
    assert law(c) == pytest.approx(2.5e-3 * c**0.5, rel=0.01)
    exact = fit_power_law(c, 2.5e-3 * c**0.5)
    assert (exact.coefficient, exact.exponent) == pytest.approx((2.5e-3, 0.5), rel=1e-8)


def test_fit_isoflop_recovers_the_scaling_law_exactly():
    fit = fit_isoflop(law_points(noise=0.0))
    assert not fit.notes
    assert fit.n_opt_law.exponent == pytest.approx(B, rel=1e-8)
    assert fit.n_opt_law.coefficient == pytest.approx(K, rel=1e-6)
    assert fit.loss_opt_law.exponent == pytest.approx(ALPHA, rel=1e-8)
    assert fit.loss_opt_law.coefficient == pytest.approx(A, rel=1e-6)
    for bf in fit.budgets:
        assert bf.parabola.a == pytest.approx(CURV, rel=1e-8)
        assert bf.parabola.n_opt == pytest.approx(K * bf.budget**B, rel=1e-8)


def test_fit_isoflop_recovers_the_scaling_law_from_noisy_losses():
    fit = fit_isoflop(law_points(noise=1e-3, seed=3))
    assert fit.n_opt_law.exponent == pytest.approx(B, rel=0.01)
    assert fit.loss_opt_law.exponent == pytest.approx(ALPHA, rel=0.01)
    c = np.asarray(BUDGETS)
    # The coefficient alone is ill-conditioned (it is exp of the intercept at log C = 0, 40 e-folds away), so
    # check what the law predicts over the budgets instead.
    assert fit.n_opt_law(c) == pytest.approx(K * c**B, rel=0.01)
    assert fit.loss_opt_law(c) == pytest.approx(A * c**ALPHA, rel=0.01)
    for bf in fit.budgets:
        assert bf.parabola.n_opt == pytest.approx(K * bf.budget**B, rel=0.01)


def test_fit_isoflop_explains_budgets_without_a_minimum():
    points = [(1e18, n, 3.0) for n in (1e7, 2e7)]  # 2 sizes
    points += [(3e18, n, 3.0 - (np.log10(n) - 7.3) ** 2) for n in (1e7, 2e7, 4e7)]  # concave
    points += [(1e19, n, 3.0 + (np.log10(n) - 9.0) ** 2) for n in (1e7, 2e7, 4e7)]  # vertex at 1e9, extrapolated
    fit = fit_isoflop(points)
    status = {bf.budget: bf.status for bf in fit.budgets}
    assert status == {1e18: "too few sizes", 3e18: "no minimum", 1e19: "ok"}
    assert fit.budgets[2].extrapolated and fit.budgets[2].parabola.n_opt == pytest.approx(1e9, rel=1e-6)
    assert fit.n_opt_law is None and fit.loss_opt_law is None
    assert len(fit.notes) == 4 and "power laws need 2" in fit.notes[-1]
    with pytest.raises(UserError, match="at least 3 model sizes"):
        fit_parabola([1e7, 2e7], [3.0, 3.1])
    with pytest.raises(UserError, match="at least 2 budgets"):
        fit_power_law([1e18, 1e18], [1e7, 2e7])


def test_plot_without_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r'needs matplotlib: pip install "\.\[plot\]"'):
        plot_isoflop(fit_isoflop(law_points(0.0)), tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------------------------ reading


def write_events(tb: Path, tag_values: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb))
    for tag, values in tag_values.items():
        for step, value in values:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_tags_are_the_trainers():
    from dlm_titan.metrics import TB_TAGS
    from dlm_titan.validation import LOSS_TAG

    assert TRAIN_LOSS_TAG == TB_TAGS["loss"] and VALIDATION_LOSS_TAG == LOSS_TAG


def test_final_loss_prefers_validation_and_flags_the_fallback(tmp_path):
    write_events(tmp_path / "a", {TRAIN_LOSS_TAG: [(1, 9.0), (10, 5.5), (20, 4.25)], VALIDATION_LOSS_TAG: [(10, 6.0), (20, 4.5)]})
    final = read_final_loss(tmp_path / "a")
    assert (final.value, final.step, final.tag, final.is_validation) == (4.5, 20, VALIDATION_LOSS_TAG, True)
    write_events(tmp_path / "b", {TRAIN_LOSS_TAG: [(1, 9.0), (10, 5.5), (20, 4.25)]})
    final = read_final_loss(tmp_path / "b")
    assert (final.value, final.step, final.tag, final.is_validation) == (4.25, 20, TRAIN_LOSS_TAG, False)
    assert read_final_loss(tmp_path / "missing") is None


def test_resumed_run_drops_the_abandoned_attempt(tmp_path):
    tb = tmp_path / "tb"
    tb.mkdir()
    write_events(tb, {TRAIN_LOSS_TAG: [(s, float(s)) for s in range(1, 9)]})  # crashed after step 8
    first = next(tb.iterdir())
    # A resume from the step-5 checkpoint writes a newer file from step 6 on (renamed to a later time stamp).
    write_events(tmp_path / "second", {TRAIN_LOSS_TAG: [(6, 60.0), (7, 70.0)]})
    stamp = int(first.name.split(".")[3]) + 5
    (next((tmp_path / "second").iterdir())).rename(tb / f"events.out.tfevents.{stamp}.host.1.0")
    assert read_scalars(tb, TRAIN_LOSS_TAG) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0)]


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.multiprocess
def test_slurm_configs_and_collect_only_fit_a_known_law(tmp_path):
    """Plans a sweep for Slurm (configs, sbatch scripts, plan.json), fills its runs with event files from a
    known isoFLOP law, and checks --collect_only recovers the law, flags a run without validation and leaves
    out an unfinished one."""
    out = tmp_path / "sweep"
    flavors = ["6M", "19M", "34M", "48M", "66M", "85M"]
    result = sweep("--budgets", "1e17,3e17,1e18", "--flavors", ",".join(flavors), "--launcher", "slurm",
                   "--ngpu", "8", "--nnodes", "2", "--output_dir", str(out), "--", "--optimizer.lr", "1e-3",
                   "--validation.steps", "3")
    assert result.returncode == 0, result.stderr
    sbatch_lines = [line for line in result.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(sbatch_lines) == 18
    script = (out / "configs" / "3e17-34M.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert f"NGPU=8 ./run_train.sh --job.config_file {(out / 'configs' / '3e17-34M.toml').resolve()}" in script

    cfg = load_config(["--job.config_file", str(out / "configs" / "3e17-34M.toml")])
    steps = int(3e17 // (6 * N_TABLE["34M"] * 256 * 2048))
    assert (cfg.model.flavor, cfg.training.flops_budget, cfg.training.steps) == ("34M", 3e17, steps)
    assert (cfg.training.global_batch_size, cfg.training.seq_len, cfg.training.local_batch_size) == (256, 2048, 8)
    assert (cfg.validation.enable, cfg.validation.freq, cfg.validation.steps) == (True, steps, 3)
    assert cfg.optimizer.lr == 1e-3 and cfg.job.dump_folder == str((out / "runs" / "3e17-34M").resolve())

    b, k = 0.5, 22e6 / 3e17**0.5
    alpha, a = -0.06, 40.0
    plan = json.loads((out / "plan.json").read_text())["runs"]
    for row in plan:
        n_opt, l_opt = k * row["budget"] ** b, a * row["budget"] ** alpha
        loss = l_opt + 0.2 * np.log10(row["non_embedding_params"] / n_opt) ** 2
        last = row["steps"] - (1 if row["name"] == "1e18-85M" else 0)  # 1e18-85M did not finish
        events = {TRAIN_LOSS_TAG: [(1, 10.0), (last, loss + 0.25)]}
        if row["name"] != "1e17-19M":  # 1e17-19M has no validation: its training loss stands in (= law)
            events[VALIDATION_LOSS_TAG] = [(last, loss)]
        else:
            events[TRAIN_LOSS_TAG][-1] = (last, loss)
        write_events(out / row["run_dir"] / "tb", events)

    result = sweep("--output_dir", str(out), "--collect_only")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "isoflop_fits.json").read_text())
    runs = {r["name"]: r for r in report["runs"]}
    assert runs["1e17-19M"]["loss_tag"] == TRAIN_LOSS_TAG and runs["1e17-19M"]["fallback_to_train_loss"]
    assert runs["1e18-85M"]["complete"] is False
    assert report["loss_source"].startswith("loss/train (fallback)")
    assert any("1e17-19M: no validation/loss" in w for w in report["warnings"])
    assert any("1e18-85M: not finished" in w for w in report["warnings"])
    assert "warning: 1e17-19M: no validation/loss" in result.stdout
    by_budget = {b_["budget"]: b_ for b_ in report["budgets"]}
    assert N_TABLE["85M"] not in by_budget[1e18]["n"] and len(by_budget[1e18]["n"]) == 5
    for c, entry in by_budget.items():
        assert entry["n_opt"] == pytest.approx(k * c**b, rel=1e-6)
        assert entry["loss_opt"] == pytest.approx(a * c**alpha, rel=1e-6)
        assert entry["tokens_opt"] == pytest.approx(c / (6 * k * c**b), rel=1e-6)
    assert report["n_opt_law"]["exponent"] == pytest.approx(b, rel=1e-6)
    assert report["n_opt_law"]["coefficient"] == pytest.approx(k, rel=1e-4)
    assert report["loss_opt_law"]["exponent"] == pytest.approx(alpha, rel=1e-6)
    assert report["loss_opt_law"]["coefficient"] == pytest.approx(a, rel=1e-4)
    png = (out / "isoflop.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.multiprocess
def test_run_train_launcher_prints_one_command_per_run(tmp_path):
    out = tmp_path / "sweep"
    result = sweep("--budgets", "1e18", "--flavors", "6M,19M", "--launcher", "run_train", "--ngpu", "4",
                   "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if "run_train.sh" in line]
    assert commands == [f"cd {ROOT} && NGPU=4 ./run_train.sh --job.config_file {(out / 'configs' / f'1e18-{f}.toml').resolve()}"
                        for f in ("6M", "19M")]
    assert not (out / "runs").exists(), "printing commands trains nothing"


@pytest.mark.multiprocess
def test_tiny_sweep_on_the_embedded_corpus(tmp_path):
    """The whole pipeline for real: 2 budgets x (6M, 19M) at 2 x 32 tokens per step, a few steps each."""
    out = tmp_path / "sweep"
    args = ["--budgets", "7.5e9,1e10", "--flavors", "6M,19M", "--global_batch_size", "2", "--local_batch_size", "2",
            "--seq_len", "32", "--output_dir", str(out), "--", "--data.num_workers", "0", "--job.no_print_config",
            "--metrics.log_freq", "1", "--validation.steps", "1", "--validation.mc_samples", "1"]
    result = sweep(*args)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((out / "isoflop_fits.json").read_text())
    assert len(report["runs"]) == 4 and report["loss_source"] == VALIDATION_LOSS_TAG
    for run in report["runs"]:
        steps = int(run["budget"] // (6 * N_TABLE[run["flavor"]] * 2 * 32))
        log = (out / run["run_dir"] / "train.log").read_text()
        logged_steps = [int(s) for s in re.findall(r"^step: (\d+) ", log, re.M)]
        validation = re.findall(r"^validation at step (\d+) -- loss ([0-9.]+)", log, re.M)
        assert run["steps"] == steps and logged_steps[-1] == steps, run["name"]
        assert run["complete"] and run["loss_tag"] == VALIDATION_LOSS_TAG and run["loss_step"] == steps
        assert validation[-1][0] == str(steps) and run["loss"] == pytest.approx(float(validation[-1][1]), abs=6e-5)
    assert [r["steps"] for r in report["runs"]] == [3, 1, 4, 1]
    assert all(b["status"] == "too few sizes" for b in report["budgets"])  # 2 sizes: points only, no parabola
    assert (out / "isoflop.png").read_bytes()[:4] == b"\x89PNG"
    again = sweep(*args)  # finished runs are not trained again
    assert again.returncode == 0 and again.stdout.count("already finished") == 4, again.stdout
