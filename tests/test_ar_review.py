"""Review of the MDM-vs-AR compute comparison's uncertainty: the bootstrap interval measures the runs' noise (none
for noise-free runs, proportional to the noise otherwise, none at all where the runs cannot estimate it), and a
multiplier read off an extrapolated frontier is flagged."""

import math

import numpy as np
import pytest
from test_isoflop_ar import BUDGETS, M, law_loss, n_opt

from dlm_titan.scaling_compare import compare_objectives, comparison_to_dict

FIVE_SIZES = (-0.6, -0.3, 0.0, 0.3, 0.6)


def planted_runs(offsets=FIVE_SIZES, noise=0.0, seed=0):
    """Runs on the planted parabolas of test_isoflop_ar (multiplier M), one per (budget, size offset)."""
    rng = np.random.default_rng(seed)
    return {o: [(c, n_opt(c) * 10**dx, law_loss(o, c, n_opt(c) * 10**dx) + rng.normal(0, noise))
                for c in BUDGETS for dx in offsets] for o in ("mdm", "ar")}


def log_width(cmp) -> float:
    lo, hi = cmp.interval
    return math.log(hi / lo)


def test_noise_free_runs_give_an_interval_of_no_width():
    # Resampling runs within a budget drops sizes and swaps parabola minima for best runs: +-6% here, from nothing.
    cmp = compare_objectives(planted_runs(), replicates=200, seed=0)
    assert cmp.multiplier == pytest.approx(M, rel=1e-9)
    assert cmp.interval == pytest.approx((M, M), rel=1e-6)


def test_interval_width_is_proportional_to_the_noise():
    # Same draws, noise scaled: a noise-driven interval scales with it (to first order in small noise).
    small, large = (compare_objectives(planted_runs(noise=sigma, seed=3), replicates=400, seed=4)
                    for sigma in (0.001, 0.002))
    assert 1.7 < log_width(large) / log_width(small) < 2.3
    assert 0 < log_width(small) < math.log(1.05)


def test_interval_covers_the_planted_multiplier_most_of_the_time():
    hits = 0
    for s in range(20):
        lo, hi = compare_objectives(planted_runs(noise=0.003, seed=100 + s), replicates=100, seed=s).interval
        hits += lo <= M <= hi
    assert hits >= 15  # nominal 95%; percentile bootstraps on 8 residual degrees of freedom run a little narrow


@pytest.mark.parametrize("offsets", [(-0.3, 0.0, 0.3), (-0.3, 0.3), (0.0,)], ids=["3 sizes", "2 sizes", "1 size"])
def test_runs_without_residual_degrees_of_freedom_give_no_interval(offsets):
    # A parabola through 3 sizes (or a best run) fits its runs exactly: the runs say nothing about their noise.
    cmp = compare_objectives(planted_runs(offsets, noise=0.003, seed=5), replicates=100)
    assert all(math.isnan(v) for v in cmp.interval)
    assert any(n.startswith("no bootstrap interval: mdm, ar trained at most 3 sizes") for n in cmp.notes)
    assert comparison_to_dict(cmp)["compute_multiplier"]["interval"] == [None, None]  # valid JSON, no NaN


def test_frontiers_that_do_not_overlap_in_loss_are_flagged_as_extrapolated():
    runs = planted_runs()
    runs["ar"] = [(c, n, loss - 2.0) for c, n, loss in runs["ar"]]  # AR far better: its law reaches MDM's loss far left
    cmp = compare_objectives(runs, replicates=0)
    assert cmp.multiplier > 1e3  # the arithmetic still runs, far outside the 30x span of budgets trained
    assert [n.split(":")[0] for n in cmp.notes if "extrapolates" in n] == ["ar"]
    assert not any("extrapolates" in n for n in compare_objectives(planted_runs(), replicates=0).notes)
