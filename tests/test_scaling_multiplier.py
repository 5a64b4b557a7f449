"""The compute multiplier as text (scaling_compare.format_multiplier): the sweep's console line and the plot's
label, with the bootstrap interval or, without one, a pointer to where the reason is given."""

import math

from test_ar_review import planted_runs

from dlm_titan.scaling_compare import compare_objectives, format_multiplier


def test_multiplier_text_with_an_interval():
    cmp = compare_objectives(planted_runs(noise=0.02), replicates=50, seed=0)
    lo, hi = cmp.interval
    assert format_multiplier(cmp) == (
        f"compute multiplier at L = {cmp.reference_loss:.4f}: MDM needs {cmp.multiplier:.3g}x AR's compute "
        f"(95% bootstrap interval {lo:.3g}-{hi:.3g}, 50 replicates)")
    assert format_multiplier(cmp, compact=True) == f"x{cmp.multiplier:.3g}\n(95% CI {lo:.3g}-{hi:.3g})"


def test_multiplier_text_without_an_interval():
    # three sizes per budget: no residual degrees of freedom, so no interval (NaN) and a note says why
    cmp = compare_objectives(planted_runs(offsets=(-0.3, 0.0, 0.3)), replicates=50, seed=0)
    assert all(map(math.isnan, cmp.interval)) and any(n.startswith("no bootstrap interval") for n in cmp.notes)
    assert format_multiplier(cmp) == (f"compute multiplier at L = {cmp.reference_loss:.4f}: MDM needs "
                                      f"{cmp.multiplier:.3g}x AR's compute (no bootstrap interval: see the warnings)")
    assert format_multiplier(cmp, compact=True) == f"x{cmp.multiplier:.3g}\n(no CI: see the notes)"
