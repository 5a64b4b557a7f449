"""MDM vs AR at equal compute: the frontier fits recover a compute multiplier planted in synthetic runs, and
``scripts.isoflop_sweep --objective mdm,ar`` plans, collects and compares both."""

import argparse
import json

import numpy as np
import pytest
from test_scaling import N_TABLE, sweep, table_rows, write_events

from dlm_titan.config import load_config
from dlm_titan.errors import UserError
from dlm_titan.scaling import TRAIN_LOSS_TAG, VALIDATION_LOSS_TAG, PowerLaw, plan_sweep
from dlm_titan.scaling_compare import compare_objectives, compute_multiplier, frontier

M, ALPHA, A = 16.0, -0.06, 40.0  # planted multiplier; AR's frontier L = A C^ALPHA; MDM's = AR's at C / M
BUDGETS = (1e17, 3e17, 1e18, 3e18)


def n_opt(c):
    return 22e6 * (c / 3e17) ** 0.5


def law_loss(objective, c, n):
    """An isoFLOP parabola in log10 N whose minimum follows the objective's frontier exactly."""
    effective = c / M if objective == "mdm" else c
    return A * effective**ALPHA + 0.2 * np.log10(n / n_opt(c)) ** 2


def synthetic_runs(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    runs = {}
    for objective in ("mdm", "ar"):
        runs[objective] = [(c, n_opt(c) * 10**dx, law_loss(objective, c, n_opt(c) * 10**dx) + rng.normal(0, noise))
                           for c in BUDGETS for dx in (-0.6, -0.3, 0.0, 0.3, 0.6)]
    return runs


def test_fit_recovers_a_planted_multiplier_exactly():
    cmp = compare_objectives(synthetic_runs(), replicates=200)
    assert cmp.multiplier == pytest.approx(M, rel=1e-6)
    for objective, shift in (("ar", 1.0), ("mdm", M**-ALPHA)):
        assert cmp.laws[objective].exponent == pytest.approx(ALPHA, rel=1e-6)
        assert cmp.laws[objective].coefficient == pytest.approx(A * shift, rel=1e-6)
    assert cmp.reference_budget == 3e18 and cmp.reference_loss == pytest.approx(A * (3e18 / M) ** ALPHA, rel=1e-9)
    assert all(p.source == "parabola" for front in cmp.frontiers.values() for p in front)
    lo, hi = cmp.interval  # noise-free runs: the residual bootstrap has nothing to vary
    assert lo == pytest.approx(M, rel=1e-6) and hi == pytest.approx(M, rel=1e-6) and cmp.failed_replicates == 0


def test_fit_recovers_a_planted_multiplier_from_noisy_runs():
    cmp = compare_objectives(synthetic_runs(noise=0.003, seed=1), replicates=400, seed=2)
    lo, hi = cmp.interval
    assert lo < M < hi and hi / lo > 1.01  # the interval is real, and covers the truth
    assert abs(np.log(cmp.multiplier / M)) < np.log(1.3)


def test_multiplier_at_a_loss_when_exponents_differ():
    mdm, ar = PowerLaw(50.0, -0.05), PowerLaw(40.0, -0.06)
    loss = 3.0
    expected = (loss / 50.0) ** (1 / -0.05) / (loss / 40.0) ** (1 / -0.06)
    assert compute_multiplier(mdm, ar, loss) == pytest.approx(expected, rel=1e-12)
    runs = synthetic_runs()
    assert compare_objectives(runs, reference_loss=3.0, replicates=0).multiplier == pytest.approx(M, rel=1e-6)


def test_frontier_uses_the_best_run_without_a_parabola_minimum():
    points = [(1e18, 6e6, 3.5), (1e18, 19e6, 3.2)]  # two sizes: no parabola
    assert [(p.loss, p.source) for p in frontier(points)] == [(3.2, "best run")]
    with pytest.raises(UserError, match="both objectives"):
        compare_objectives({"mdm": synthetic_runs()["mdm"], "ar": []})


def test_plan_sweep_adds_ar_runs_with_the_same_steps_and_no_ssl():
    plans = plan_sweep([1e19], ["170M"], objectives=("mdm", "ar"), ssl_ratio=0.01)
    mdm, ar = plans
    assert (mdm.name, ar.name) == ("1e19-170M", "ar-1e19-170M")
    assert (mdm.ssl_ratio, ar.ssl_ratio, ar.objective) == (0.01, 0.0, "ar")
    assert ar.steps == int(1e19 // (6 * N_TABLE["170M"] * 256 * 2048)) == 18_710


@pytest.mark.multiprocess
def test_sweep_plans_collects_and_compares_both_objectives(tmp_path):
    out = tmp_path / "sweep"
    flavors = ["6M", "19M", "34M", "48M", "66M", "85M"]
    result = sweep("--objective", "mdm,ar", "--budgets", "1e17,3e17,1e18", "--flavors", ",".join(flavors),
                   "--launcher", "run_train", "--bootstrap", "200", "--output_dir", str(out))
    assert result.returncode == 0, result.stderr
    assert set(table_rows(result.stdout)) == {f"{p}{c}-{f}" for p in ("", "ar-") for c in ("1e17", "3e17", "1e18")
                                              for f in flavors}
    cfg = load_config(["--job.config_file", str(out / "configs" / "ar-3e17-34M.toml")])
    assert cfg.training.objective == "ar" and cfg.model.flavor == "34M"
    assert load_config(["--job.config_file", str(out / "configs" / "3e17-34M.toml")]).training.objective == "mdm"

    for row in json.loads((out / "plan.json").read_text())["runs"]:
        loss = law_loss(row["objective"], row["budget"], row["non_embedding_params"])
        write_events(out / row["run_dir"] / "tb", {TRAIN_LOSS_TAG: [(row["steps"], loss + 0.2)],
                                                   VALIDATION_LOSS_TAG: [(row["steps"], loss)]})
    result = sweep("--output_dir", str(out), "--collect_only", "--bootstrap", "200")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "isoflop_fits.json").read_text())
    multiplier = report["comparison"]["compute_multiplier"]
    assert multiplier["value"] == pytest.approx(M, rel=1e-5)
    assert multiplier["interval"] == pytest.approx([M, M], rel=1e-5)  # noise-free losses: no width
    assert report["objectives"]["ar"]["loss_opt_law"]["exponent"] == pytest.approx(ALPHA, rel=1e-6)
    assert len(report["objectives"]["mdm"]["runs"]) == 18 and "compute multiplier" in result.stdout
    for name in ("isoflop_compare.png", "isoflop_mdm.png", "isoflop_ar.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.multiprocess
def test_bad_objective_is_one_line_and_exit_2(tmp_path):
    result = sweep("--objective", "mdm,gpt", "--budgets", "1e18", "--flavors", "6M", "--dry-run")
    assert result.returncode == 2 and "objectives must be distinct names among mdm, ar" in result.stderr
    result = sweep("--budgets", "1e18", "--flavors", "6M", "--dry-run", "--", "--training.objective", "ar")
    assert result.returncode == 2 and "use the sweep option --objective" in result.stderr


def test_objectives_with_spaces_are_the_same_list():
    from scripts.isoflop_sweep import _objectives

    assert _objectives("mdm, ar") == _objectives(" mdm ,ar ") == ["mdm", "ar"]
    with pytest.raises(argparse.ArgumentTypeError):
        _objectives("mdm, mdm")
