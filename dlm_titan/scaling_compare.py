"""MDM against its autoregressive baseline at equal compute: both loss frontiers and the compute multiplier.

SMDM's comparison (its isoFLOP figures, the "x16" arrow): for each objective, the frontier is the lowest loss a
budget C reaches over model sizes, L(C), read per budget from the isoFLOP parabola's minimum
(:func:`dlm_titan.scaling.fit_isoflop`), or from the best run trained when that budget's parabola has no
minimum inside the sizes trained. A power law L = k C^b through each frontier gives the compute an objective
needs to reach a loss, C(L) = (L / k)^(1 / b), and the compute multiplier at loss L is C_mdm(L) / C_ar(L): how
many times AR's compute MDM needs for the same loss. It is constant when the two exponents are equal, and is
otherwise reported at a reference loss: by default MDM's frontier loss at the largest budget both objectives
share, where MDM's law is interpolated and AR's is interpolated as long as the multiplier is within the budgets'
span.

Uncertainty: a residual bootstrap. Each objective's runs are split into their budget's fitted isoFLOP parabola
and a residual; the residuals of all its parabolas are pooled (scaled by sqrt(runs / degrees of freedom), each
parabola using 3). Each replicate adds residuals drawn with replacement from the pool to the fitted losses of every
run, refits the frontiers and both laws, and recomputes the multiplier at the same reference loss; the interval is
the replicates' central percentile range. Resampling the runs themselves would not do: a budget's runs are
different sizes, so a resample drops sizes and swaps the parabola's minimum for the best run left, which widens
the interval by as much as the data's noise even for noise-free runs. Without residual degrees of freedom (every
budget of an objective trained at 3 sizes or fewer) the runs say nothing about their noise, and there is no
interval (NaN, with a note). Replicates whose fit fails are dropped and counted. A multiplier read where a law is
extrapolated beyond its objective's budgets (e.g. frontiers that do not overlap in loss) is flagged in the notes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dlm_titan.errors import UserError
from dlm_titan.scaling import PowerLaw, budget_label, fit_isoflop, fit_power_law, new_figure

Point = tuple[float, float, float]  # (budget C, non-embedding N, final loss)


@dataclass(frozen=True)
class FrontierPoint:
    """The lowest loss of one budget: the parabola's minimum ("parabola") or the best run ("best run")."""

    budget: float
    loss: float
    source: str


def frontier(points: Iterable[Point]) -> list[FrontierPoint]:
    """One point per budget: the isoFLOP parabola's minimum when it lies within the sizes trained, else the
    lowest loss trained at that budget (fewer than 3 sizes, no minimum, or an extrapolated vertex)."""
    points = list(points)
    fit = fit_isoflop(points)
    out = []
    for bf in fit.budgets:
        if bf.has_minimum and not bf.extrapolated:
            out.append(FrontierPoint(bf.budget, bf.parabola.loss_opt, "parabola"))
        else:
            out.append(FrontierPoint(bf.budget, min(bf.loss), "best run"))
    return out


def fit_frontier(points: Iterable[Point]) -> tuple[list[FrontierPoint], PowerLaw]:
    """The frontier of ``points`` and its power law L = k C^b (UserError with fewer than 2 budgets)."""
    front = frontier(points)
    return front, fit_power_law([p.budget for p in front], [p.loss for p in front])


def compute_at_loss(law: PowerLaw, loss: float) -> float:
    """The compute C at which ``law`` reaches ``loss``: (loss / k)^(1 / b)."""
    if law.exponent == 0:
        raise UserError("a frontier whose loss does not change with compute has no compute for a given loss")
    return float((loss / law.coefficient) ** (1.0 / law.exponent))


def compute_multiplier(mdm: PowerLaw, ar: PowerLaw, loss: float) -> float:
    """C_mdm(loss) / C_ar(loss): the times AR's compute that MDM needs to reach ``loss``."""
    return compute_at_loss(mdm, loss) / compute_at_loss(ar, loss)


@dataclass
class Comparison:
    """Both frontiers, their laws, and the multiplier at ``reference_loss`` with its bootstrap interval."""

    frontiers: dict[str, list[FrontierPoint]]
    laws: dict[str, PowerLaw]
    reference_loss: float
    reference_budget: float | None
    multiplier: float
    interval: tuple[float, float]
    confidence: float
    replicates: int
    failed_replicates: int
    notes: list[str] = field(default_factory=list)


def _multiplier_of(runs: Mapping[str, list[Point]], loss: float) -> float:
    mdm, ar = (fit_frontier(runs[o])[1] for o in ("mdm", "ar"))
    return compute_multiplier(mdm, ar, loss)


def residual_model(points: Iterable[Point]) -> tuple[list[Point], np.ndarray]:
    """The runs with each loss replaced by its budget's fitted isoFLOP parabola (kept as is where a budget has
    fewer than 3 sizes), and the pooled residuals scaled to the noise's variance: sqrt(runs / degrees of freedom), a
    parabola using 3. No degrees of freedom (3 sizes or fewer everywhere): an empty pool."""
    fitted: list[Point] = []
    residuals: list[float] = []
    dof = 0
    for bf in fit_isoflop(points).budgets:
        if bf.parabola is None:  # too few sizes for a parabola
            fitted += [(bf.budget, n, loss) for n, loss in zip(bf.n, bf.loss, strict=True)]
            continue
        predicted = bf.parabola(np.log10(np.asarray(bf.n, dtype=np.float64)))
        fitted += [(bf.budget, n, float(f)) for n, f in zip(bf.n, predicted, strict=True)]
        residuals += (np.asarray(bf.loss) - predicted).tolist()
        dof += len(bf.n) - 3
    if dof == 0:
        return fitted, np.zeros(0)
    return fitted, np.asarray(residuals) * math.sqrt(len(residuals) / dof)


def bootstrap_multiplier(runs: Mapping[str, list[Point]], loss: float, replicates: int = 1000, seed: int = 0
                         ) -> tuple[np.ndarray, int]:
    """Multipliers at ``loss`` of ``replicates`` residual-bootstrap replicates of the runs, and how many failed.
    No replicates (an empty array) when an objective has no residual degrees of freedom."""
    models = {o: residual_model(runs[o]) for o in ("mdm", "ar")}
    if any(len(pool) == 0 for _, pool in models.values()):
        return np.zeros(0), 0
    rng = np.random.default_rng(seed)
    values, failed = [], 0
    for _ in range(replicates):
        resampled = {o: [(b, n, f + e) for (b, n, f), e in zip(fitted, rng.choice(pool, len(fitted)), strict=True)]
                     for o, (fitted, pool) in models.items()}
        try:
            value = _multiplier_of(resampled, loss)
        except (UserError, FloatingPointError, ZeroDivisionError, OverflowError):
            failed += 1
            continue
        if np.isfinite(value) and value > 0:
            values.append(value)
        else:
            failed += 1
    return np.asarray(values), failed


def _extrapolation_notes(fits: Mapping[str, tuple[list[FrontierPoint], PowerLaw]], loss: float) -> list[str]:
    """A note per objective whose law reaches ``loss`` outside the budgets it was fitted on."""
    notes = []
    for objective, (front, law) in fits.items():
        budgets = [p.budget for p in front]
        compute = compute_at_loss(law, loss)
        if not min(budgets) * (1 - 1e-9) <= compute <= max(budgets) * (1 + 1e-9):  # the edges are inside
            notes.append(f"{objective}: its frontier reaches L = {loss:.4g} at C = {compute:.3g}, outside its budgets "
                         f"{budget_label(min(budgets))}-{budget_label(max(budgets))}: the multiplier extrapolates its "
                         "power law (frontiers that barely overlap in loss); train budgets that bracket it")
    return notes


def compare_objectives(runs: Mapping[str, list[Point]], reference_loss: float | None = None, replicates: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> Comparison:
    """Fits both frontiers of ``runs`` ({"mdm": points, "ar": points}) and the compute multiplier.

    Args:
        runs: each objective's (budget, N, final loss) runs.
        reference_loss: the loss at which to compare; default MDM's frontier law at the largest budget both
            objectives trained.
        replicates: bootstrap resamples for the interval (0 = none).
        confidence: the interval's coverage.
        seed: the bootstrap's generator seed.

    Raises:
        UserError: an objective is missing or has fewer than 2 budgets.
    """
    missing = [o for o in ("mdm", "ar") if not runs.get(o)]
    if missing:
        raise UserError(f"the comparison needs finished runs of both objectives; none of {', '.join(missing)}: "
                        "run the sweep with --objective mdm,ar")
    fits = {o: fit_frontier(runs[o]) for o in ("mdm", "ar")}
    laws = {o: law for o, (_, law) in fits.items()}
    shared = sorted({p[0] for p in runs["mdm"]} & {p[0] for p in runs["ar"]})
    reference_budget = None
    if reference_loss is None:
        reference_budget = shared[-1] if shared else max(p[0] for p in runs["mdm"])
        reference_loss = float(laws["mdm"](reference_budget))
    multiplier = compute_multiplier(laws["mdm"], laws["ar"], reference_loss)
    values, failed = bootstrap_multiplier(runs, reference_loss, replicates, seed) if replicates else (np.array([]), 0)
    tail = (1 - confidence) / 2 * 100
    interval = (float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))) if len(values) else (
        float("nan"), float("nan"))
    notes = [f"{o}: budget {budget_label(p.budget)} frontier point is its best run (no parabola minimum within "
             f"the sizes trained)" for o, (front, _) in fits.items() for p in front if p.source != "parabola"]
    notes += _extrapolation_notes(fits, reference_loss)
    if replicates and not len(values) and not failed:  # the bootstrap found no residual degrees of freedom: name whose
        no_dof = [o for o in ("mdm", "ar") if len(residual_model(runs[o])[1]) == 0]
        notes.append(f"no bootstrap interval: {', '.join(no_dof)} trained at most 3 sizes per budget, so its runs "
                     "give no estimate of their noise (each parabola passes through them); train 4 or more sizes")
    if replicates and failed:
        notes.append(f"{failed} of {replicates} bootstrap replicates could not be fitted and were left out")
    return Comparison({o: front for o, (front, _) in fits.items()}, laws, reference_loss, reference_budget, multiplier,
                      interval, confidence, replicates, failed, notes)


def format_multiplier(cmp: Comparison, compact: bool = False) -> str:
    """The compute multiplier at the reference loss with its bootstrap interval, as text.

    Args:
        cmp: the comparison.
        compact: the plot's two-line label instead of the sweep's console line.

    Returns:
        the text; without an interval (NaN: no residual degrees of freedom, or no replicates) it points to where
        the reason is given (the comparison's notes, which the sweep prints as warnings).
    """
    lo, hi = cmp.interval
    none = math.isnan(lo)  # both ends are NaN together
    if compact:
        band = "no CI: see the notes" if none else f"{cmp.confidence:.0%} CI {lo:.3g}-{hi:.3g}"
        return f"x{cmp.multiplier:.3g}\n({band})"
    band = ("no bootstrap interval: see the warnings" if none else
            f"{cmp.confidence:.0%} bootstrap interval {lo:.3g}-{hi:.3g}, {cmp.replicates} replicates")
    return f"compute multiplier at L = {cmp.reference_loss:.4f}: MDM needs {cmp.multiplier:.3g}x AR's compute ({band})"


def comparison_to_dict(cmp: Comparison) -> dict:
    """JSON-ready summary of a comparison."""
    return {
        "frontiers": {o: [vars(p) for p in front] for o, front in cmp.frontiers.items()},
        "laws": {o: {"formula": "L = coefficient * C ** exponent", "coefficient": law.coefficient,
                     "exponent": law.exponent} for o, law in cmp.laws.items()},
        "reference_loss": cmp.reference_loss, "reference_budget": cmp.reference_budget,
        "compute_multiplier": {"definition": "C_mdm(L) / C_ar(L) at L = reference_loss", "value": cmp.multiplier,
                               "interval": [v if math.isfinite(v) else None for v in cmp.interval],
                               "confidence": cmp.confidence,
                               "method": "residual bootstrap of the isoFLOP parabolas (pooled per objective)",
                               "replicates": cmp.replicates, "failed_replicates": cmp.failed_replicates},
        "notes": cmp.notes,
    }


COLORS = {"mdm": "tab:blue", "ar": "tab:orange"}


def plot_comparison(cmp: Comparison, runs: Mapping[str, list[Point]], path: Path) -> None:
    """Writes the comparison figure: every run's loss against its budget, both frontiers and their laws, and the
    multiplier at the reference loss as an arrow from AR's compute to MDM's.

    Raises:
        UserError: matplotlib is not installed.
    """
    figure = new_figure("the comparison figure", (7.5, 5))
    axis = figure.subplots()
    c_ar, c_mdm = (compute_at_loss(cmp.laws[o], cmp.reference_loss) for o in ("ar", "mdm"))
    budgets = [p[0] for points in runs.values() for p in points] + [c_ar, c_mdm]
    grid = np.geomspace(min(budgets) / 1.5, max(budgets) * 1.5, 200)
    for objective in ("mdm", "ar"):
        color, law = COLORS[objective], cmp.laws[objective]
        axis.scatter([p[0] for p in runs[objective]], [p[2] for p in runs[objective]], color=color, alpha=0.3, s=14)
        front = cmp.frontiers[objective]
        axis.scatter([p.budget for p in front], [p.loss for p in front], color=color, marker="*", s=160,
                     edgecolors="black", linewidths=0.5, zorder=3)
        axis.plot(grid, law(grid), color=color,
                  label=f"{objective.upper()}: L = {law.coefficient:.3g} C^{law.exponent:.4f}")
    axis.annotate("", xy=(c_mdm, cmp.reference_loss), xytext=(c_ar, cmp.reference_loss),
                  arrowprops={"arrowstyle": "->", "color": "black"})
    axis.text((c_ar * c_mdm) ** 0.5, cmp.reference_loss, format_multiplier(cmp, compact=True), ha="center",
              va="bottom", fontsize=9)
    axis.set(xscale="log", xlabel="training FLOPs C (6 N D)", ylabel="final validation loss (nats/token)",
             title=f"Compute frontiers: MDM needs x{cmp.multiplier:.3g} AR's compute at L = {cmp.reference_loss:.3f}")
    axis.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
