"""Scaling-law workflow: plan FLOPs-budgeted runs, read their final losses, fit isoFLOP curves.

The method is SMDM's (after Chinchilla's "approach 2"): for each compute budget C, train several model sizes
for steps = floor(C / (6 N B L)) (N = non-embedding parameters, B x L tokens per step), take each run's final
validation loss, fit a parabola of loss in log10 N per budget, and read off the loss-optimal size N_opt(C)
and loss L_opt(C) at its vertex. Power laws N_opt = k C^b and L_opt = k C^b through those vertices give the
scaling exponents. ``scripts/isoflop_sweep.py`` drives it; this module holds the planning, reading and fitting
so they can be tested on their own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dlm_titan.errors import UserError
from dlm_titan.flops import mean_seq_len, steps_from_budget
from dlm_titan.models import get_model_args
from dlm_titan.optim import resolve_warmup_steps

TRAIN_LOSS_TAG = "loss/train"
"""TensorBoard tag of the training loss (``dlm_titan.metrics.TB_TAGS["loss"]``)."""
VALIDATION_LOSS_TAG = "validation/loss"
"""TensorBoard tag of the validation ELBO, the loss the fits are meant for."""


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class RunPlan:
    """One run of a sweep: a model flavor trained for the steps a FLOPs budget buys, with an objective ("mdm",
    or "ar" for SMDM's autoregressive baseline: same flavors, same 6 N D budget rule)."""

    budget: float
    flavor: str
    non_embedding_params: int
    steps: int
    warmup_steps: int
    global_batch_size: int
    seq_len: int
    ssl_ratio: float = 0.0
    objective: str = "mdm"

    @property
    def name(self) -> str:
        """Folder-safe run name, e.g. ``1e18-19M`` (MDM) or ``ar-1e18-19M``."""
        prefix = "" if self.objective == "mdm" else f"{self.objective}-"
        return f"{prefix}{budget_label(self.budget)}-{self.flavor}"

    @property
    def tokens(self) -> float:
        """Training tokens: steps x batch x the mean sequence length (shorter under ssl_ratio)."""
        return self.steps * self.global_batch_size * mean_seq_len(self.seq_len, self.ssl_ratio)

    @property
    def flops(self) -> float:
        """FLOPs the run spends by the 6 N D rule (at most the budget: steps are rounded down)."""
        return 6.0 * self.non_embedding_params * self.tokens


def budget_label(budget: float) -> str:
    """Shortest exact scientific spelling of a budget: 1e18, 3e18, 1.6e21, 2.5e10."""
    mantissa, exponent = f"{budget:.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def plan_run(
    budget: float,
    flavor: str,
    global_batch_size: int = 256,
    seq_len: int = 2048,
    ssl_ratio: float = 0.0,
    warmup_steps: int = -1,
    objective: str = "mdm",
) -> RunPlan:
    """Plans one run: SMDM's steps for ``budget`` FLOPs and the warmup the trainer will use.

    Args:
        budget: training FLOPs C.
        flavor: SMDM model size ("6M" ... "2121M", or "1B").
        global_batch_size: sequences per optimizer step.
        seq_len: tokens per sequence.
        ssl_ratio: stochastic-sequence-length probability; the step rule then uses the mean length.
        warmup_steps: the config's ``lr_scheduler.warmup_steps`` (-1 = SMDM's max(1% of steps, 100)).
        objective: "mdm" or "ar" (the same steps: SMDM counts 6 N D for both).

    Raises:
        UserError: unknown flavor, or a budget smaller than one step of this model and batch.
    """
    n = get_model_args(flavor).non_embedding_params()
    steps = steps_from_budget(budget, n, global_batch_size, seq_len, ssl_ratio)
    if steps < 1:
        one_step = 6 * n * global_batch_size * mean_seq_len(seq_len, ssl_ratio)
        raise UserError(
            f"budget {budget_label(budget)} buys no step of {flavor} at batch {global_batch_size} x {seq_len} "
            f"(one step costs {one_step:.3g} FLOPs): raise the budget or drop the flavor"
        )
    warmup = resolve_warmup_steps(warmup_steps, steps)  # the trainer's rule
    return RunPlan(budget, flavor, n, steps, warmup, global_batch_size, seq_len, ssl_ratio, objective)


def plan_sweep(budgets: Sequence[float], flavors: Sequence[str], objectives: Sequence[str] = ("mdm",), **kwargs
               ) -> list[RunPlan]:
    """One :func:`plan_run` per (objective, budget, flavor), objectives outer, then budgets, in the order given.
    AR runs never use stochastic sequence length (SMDM's train_ar.py has none)."""
    plans = []
    for objective in objectives:
        options = kwargs if objective == "mdm" else {**kwargs, "ssl_ratio": 0.0}
        plans += [plan_run(budget, flavor, objective=objective, **options) for budget in budgets for flavor in flavors]
    return plans


def format_plan(plans: Sequence[RunPlan]) -> str:
    """The plan as a fixed-width table, one row per run."""
    header = ("run", "budget", "flavor", "N (non-emb)", "steps", "warmup", "batch", "tokens", "tokens/N", "FLOPs used")
    rows = [header]
    for p in plans:
        rows.append((
            p.name, budget_label(p.budget), p.flavor, f"{p.non_embedding_params:,}", f"{p.steps:,}",
            f"{p.warmup_steps:,}", f"{p.global_batch_size} x {p.seq_len}", f"{p.tokens:,.0f}",
            f"{p.tokens / p.non_embedding_params:.3g}", f"{p.flops:.4g}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i > 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FinalLoss:
    """The loss a run ended with and where it came from."""

    value: float
    step: int
    tag: str

    @property
    def is_validation(self) -> bool:
        return self.tag == VALIDATION_LOSS_TAG


def read_scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every event of ``tag`` in a TensorBoard folder, in step order.

    A resumed run writes a new event file that starts again from its checkpoint's step: events of earlier
    files at or after that step belong to the abandoned attempt and are dropped (TensorBoard's own orphan
    purge does not do this across files).
    """
    history: dict[int, float] = {}
    for file in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=_event_file_order):
        first, events = _file_scalars(file, tag)
        if first is not None:
            history = {step: value for step, value in history.items() if step < first}
            history.update(events)
    return sorted(history.items())


def _event_file_order(file: Path) -> tuple[int, str]:
    # events.out.tfevents.<unix time>.<host>.<pid>.<n>: creation time first, the name breaks ties.
    parts = file.name.split(".")
    return (int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0, file.name)


def _file_scalars(file: Path, tag: str) -> tuple[int | None, list[tuple[int, float]]]:
    """The first step of any scalar in the file (where this attempt started; None if it has none) and the
    (step, value) events of ``tag`` in it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = [e.step for t in tags.get("scalars", []) for e in acc.Scalars(t)]
    steps += [e.step for t in tags.get("tensors", []) for e in acc.Tensors(t)]
    if tag in tags.get("scalars", []):
        events = [(e.step, float(e.value)) for e in acc.Scalars(tag)]
    elif tag in tags.get("tensors", []):  # SummaryWriter(new_style=True) stores scalars as tensors
        from tensorboard.util.tensor_util import make_ndarray

        events = [(e.step, float(make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    else:
        events = []
    return (min(steps) if steps else None), events


def read_final_loss(tb_dir: Path) -> FinalLoss | None:
    """The run's final validation loss, else its last logged training loss (flagged by ``tag``), else None."""
    for tag in (VALIDATION_LOSS_TAG, TRAIN_LOSS_TAG):
        scalars = read_scalars(tb_dir, tag)
        if scalars:
            step, value = scalars[-1]
            return FinalLoss(value, step, tag)
    return None


def last_train_step(tb_dir: Path) -> int:
    """Last step with a logged training loss (the trainer always logs its final step); 0 if none."""
    scalars = read_scalars(tb_dir, TRAIN_LOSS_TAG)
    return scalars[-1][0] if scalars else 0


# ---------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True)
class Parabola:
    """loss = a x^2 + b x + c with x = log10 N."""

    a: float
    b: float
    c: float

    def __call__(self, x):
        return self.a * np.square(x) + self.b * x + self.c

    @property
    def vertex(self) -> float:
        """log10 of the loss-optimal N (a minimum only when a > 0)."""
        return -self.b / (2 * self.a)

    @property
    def n_opt(self) -> float:
        return 10.0**self.vertex

    @property
    def loss_opt(self) -> float:
        return self.c - self.b * self.b / (4 * self.a)


@dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent, fitted by least squares in log-log space."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.power(x, self.exponent)


def fit_parabola(n: Sequence[float], loss: Sequence[float]) -> Parabola:
    """Least-squares parabola of loss in log10 N.

    Raises:
        UserError: fewer than 3 distinct sizes (a parabola needs 3).
    """
    x = np.log10(np.asarray(n, dtype=np.float64))
    if len(np.unique(x)) < 3:
        raise UserError(f"a parabola needs at least 3 model sizes per budget, got {len(np.unique(x))}: add flavors")
    a, b, c = np.polyfit(x, np.asarray(loss, dtype=np.float64), 2)
    return Parabola(float(a), float(b), float(c))


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Least-squares line through (log x, log y).

    Raises:
        UserError: fewer than 2 distinct x, or a value <= 0 (no logarithm).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.any(x <= 0) or np.any(y <= 0):
        raise UserError("a power law needs positive values on both axes")
    if len(np.unique(x)) < 2:
        raise UserError(f"a power law needs at least 2 budgets with a minimum, got {len(np.unique(x))}: add budgets")
    exponent, log_coefficient = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(math.exp(log_coefficient)), float(exponent))


@dataclass
class BudgetFit:
    """The isoFLOP curve of one budget: its (N, loss) points and, when it has a minimum, the vertex."""

    budget: float
    n: list[float]
    loss: list[float]
    parabola: Parabola | None = None
    status: str = "ok"

    @property
    def has_minimum(self) -> bool:
        return self.parabola is not None and self.parabola.a > 0

    @property
    def extrapolated(self) -> bool:
        """The vertex lies outside the sizes trained, so N_opt is an extrapolation."""
        return self.has_minimum and not min(self.n) <= self.parabola.n_opt <= max(self.n)


@dataclass
class IsoflopFit:
    """Per-budget parabolas and the power laws through their minima."""

    budgets: list[BudgetFit]
    n_opt_law: PowerLaw | None = None
    loss_opt_law: PowerLaw | None = None
    notes: list[str] = field(default_factory=list)


def fit_isoflop(points: Iterable[tuple[float, float, float]]) -> IsoflopFit:
    """Fits (budget, N, loss) points: a parabola per budget, then N_opt(C) and L_opt(C) power laws.

    Budgets with fewer than 3 sizes or a concave curve (no minimum) keep their points but no vertex, and are
    left out of the power laws; each such case is explained in ``notes``.
    """
    by_budget: dict[float, list[tuple[float, float]]] = {}
    for budget, n, loss in points:
        by_budget.setdefault(float(budget), []).append((float(n), float(loss)))
    fit = IsoflopFit(budgets=[])
    for budget in sorted(by_budget):
        pairs = sorted(by_budget[budget])
        bf = BudgetFit(budget, [n for n, _ in pairs], [loss for _, loss in pairs])
        label = budget_label(budget)
        if len({n for n, _ in pairs}) < 3:
            bf.status = "too few sizes"
            fit.notes.append(f"budget {label}: {len(pairs)} sizes, a parabola needs 3")
        else:
            bf.parabola = fit_parabola(bf.n, bf.loss)
            if not bf.has_minimum:
                bf.status = "no minimum"
                fit.notes.append(f"budget {label}: loss is concave in log N (no minimum): widen the size range")
            elif bf.extrapolated:
                fit.notes.append(f"budget {label}: N_opt {bf.parabola.n_opt:.3g} lies outside the sizes trained")
        fit.budgets.append(bf)
    minima = [bf for bf in fit.budgets if bf.has_minimum]
    if len(minima) >= 2:
        budgets = [bf.budget for bf in minima]
        fit.n_opt_law = fit_power_law(budgets, [bf.parabola.n_opt for bf in minima])
        fit.loss_opt_law = fit_power_law(budgets, [bf.parabola.loss_opt for bf in minima])
    else:
        fit.notes.append(f"{len(minima)} budget(s) with a minimum: power laws need 2")
    return fit


def fit_to_dict(fit: IsoflopFit) -> dict:
    """JSON-ready summary of a fit (the runs' own rows are added by the caller)."""

    def law(p: PowerLaw | None, name: str) -> dict | None:
        return None if p is None else {"formula": f"{name} = coefficient * C ** exponent", **asdict(p)}

    budgets = []
    for bf in fit.budgets:
        entry = {"budget": bf.budget, "status": bf.status, "n": bf.n, "loss": bf.loss}
        if bf.parabola is not None:
            entry["parabola"] = {"x": "log10 N", **asdict(bf.parabola)}
        if bf.has_minimum:
            p = bf.parabola
            entry |= {"n_opt": p.n_opt, "loss_opt": p.loss_opt, "tokens_opt": bf.budget / (6 * p.n_opt),
                      "extrapolated": bf.extrapolated}
        budgets.append(entry)
    return {"budgets": budgets, "n_opt_law": law(fit.n_opt_law, "N_opt"),
            "loss_opt_law": law(fit.loss_opt_law, "L_opt"), "notes": fit.notes}


# ---------------------------------------------------------------------------------------------- plotting


def new_figure(what: str, figsize: tuple[float, float]):
    """An empty matplotlib Figure (constrained layout) for ``what``.

    Raises:
        UserError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f'{what} needs matplotlib: pip install ".[plot]" (or pass --no_plot)') from None
    return Figure(figsize=figsize, layout="constrained")


def plot_isoflop(fit: IsoflopFit, path: Path, loss_label: str = "validation loss (ELBO)") -> None:
    """Writes SMDM's isoFLOP figure as a PNG: loss vs N per budget with the parabolas and their minima;
    N_opt vs C; L_opt vs C, each with its power law.

    Raises:
        UserError: matplotlib is not installed.
    """
    figure = new_figure("the isoFLOP figure", (15, 4.6))
    curves, n_axis, loss_axis = figure.subplots(1, 3)
    colors = _colors(len(fit.budgets))
    for bf, color in zip(fit.budgets, colors):
        label = f"C = {budget_label(bf.budget)}"
        curves.scatter(bf.n, bf.loss, color=color, label=label, zorder=3)
        if bf.parabola is not None:
            lo, hi = math.log10(min(bf.n)) - 0.15, math.log10(max(bf.n)) + 0.15
            x = np.linspace(lo, hi, 200)
            curves.plot(10.0**x, bf.parabola(x), color=color, linewidth=1.5)
        if bf.has_minimum:
            curves.scatter([bf.parabola.n_opt], [bf.parabola.loss_opt], color=color, marker="*", s=220,
                           edgecolors="black", linewidths=0.6, zorder=4)
    curves.set(xscale="log", xlabel="non-embedding parameters N", ylabel=loss_label, title="IsoFLOP curves")
    curves.legend(fontsize=8)
    minima = [bf for bf in fit.budgets if bf.has_minimum]
    _law_panel(n_axis, minima, [bf.parabola.n_opt for bf in minima], fit.n_opt_law, "N_opt", "loss-optimal N")
    _law_panel(loss_axis, minima, [bf.parabola.loss_opt for bf in minima], fit.loss_opt_law, "L_opt",
               f"minimum {loss_label}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def _law_panel(axis, minima: list[BudgetFit], values: list[float], law: PowerLaw | None, name: str, ylabel: str) -> None:
    axis.set(xlabel="training FLOPs C", ylabel=ylabel, title=f"{name}(C)")
    if not minima:  # log axes of nothing cannot be drawn
        axis.text(0.5, 0.5, "no budget with a minimum", ha="center", va="center", transform=axis.transAxes)
        return
    budgets = [bf.budget for bf in minima]
    axis.scatter(budgets, values, color="black", zorder=3)
    if law is not None:
        c = np.geomspace(min(budgets) / 2, max(budgets) * 2, 100)
        axis.plot(c, law(c), color="tab:red", label=f"{name} = {law.coefficient:.3g} C^{law.exponent:.3f}")
        axis.legend(fontsize=8)
    axis.set(xscale="log", yscale="log")
    if name == "L_opt":  # losses span a few percent: print them as numbers, not as 3.1 x 10^0
        from matplotlib.ticker import FormatStrFormatter

        axis.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
        axis.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]
