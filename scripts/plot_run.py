"""Plot a run's curves from its TensorBoard event files into one PNG.

Four panels: training and validation loss (validation with +-1 standard error bars); validation loss by noise
level t at each evaluation (the MDM-specific view: how hard each masking rate is, and how that changes; left empty,
with a note, for a run of the autoregressive baseline, whose loss is the next-token NLL); throughput (tokens/s per
device, MFU on the right axis when known); learning rate and gradient norm.

    python -m scripts.plot_run outputs/debug                      # writes outputs/debug/curves.png
    python -m scripts.plot_run outputs/debug/tb --out run.png --title "6M debug"

Needs matplotlib (``pip install ".[plot]"``); reading the event files needs only tensorboard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dlm_titan.saved_config import saved_config
from scripts.cli import HelpFormatter

Series = dict[str, list[tuple[int, float]]]


def find_event_folder(path: Path) -> Path:
    """The folder holding the event files: ``path`` itself, or ``path/tb`` for a dump folder."""
    for folder in (path, path / "tb"):
        if folder.is_dir() and any(folder.glob("events.out.tfevents.*")):
            return folder
    raise FileNotFoundError(f"no TensorBoard event files in {path} or {path / 'tb'}: pass the run's dump folder "
                            "or its tb folder (metrics.enable_tensorboard must be on)")


def read_scalars(folder: Path) -> Series:
    """Every scalar tag of the event files in ``folder`` as ``{tag: [(step, value), ...]}`` sorted by step;
    a step written twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    out: Series = {}
    for tag in acc.Tags()["scalars"]:
        by_step = {e.step: e.value for e in acc.Scalars(tag)}
        out[tag] = sorted(by_step.items())
    return out


def run_objective(folder: Path, series: Series) -> str:
    """"ar" or "mdm": the run's ``training.objective`` from the config.toml of its dump folder (the event folder
    itself, else its parent: a dump folder inside another run's holds its events itself only when
    metrics.save_tb_folder is "."), else "ar" when validation logged an exact perplexity (``validation/ppl``; MDM
    logs ``validation/ppl_bound``)."""
    for dump_folder in (folder, folder.parent):
        objective = saved_config(dump_folder).get("training", {}).get("objective")
        if objective in ("mdm", "ar"):
            return objective
    return "ar" if "validation/ppl" in series else "mdm"


def _xy(series: Series, tag: str) -> tuple[list[int], list[float]]:
    points = series.get(tag, [])
    return [s for s, _ in points], [v for _, v in points]


def _t_buckets(series: Series, prefix: str) -> list[tuple[float, str]]:
    """(bin midpoint, tag) of the loss-by-t tags under ``prefix`` ("loss_by_t/validation_t0.0-0.1", ...)."""
    out = []
    for tag in series:
        if tag.startswith(prefix):
            lo, hi = (float(x) for x in tag[len(prefix):].split("-"))
            out.append(((lo + hi) / 2, tag))
    return sorted(out)


def plot(series: Series, out: Path, title: str = "", objective: str = "mdm") -> None:
    """Writes the four-panel PNG of ``series`` (a run of ``objective``, "mdm" or "ar") to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=110)
    _plot_loss(axes[0, 0], series, objective)
    _plot_loss_by_t(axes[0, 1], series, objective)
    _plot_throughput(axes[1, 0], series)
    _plot_optim(axes[1, 1], series)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _plot_loss(ax, series: Series, objective: str) -> None:
    ax.plot(*_xy(series, "loss/train"), label="train", color="tab:blue", lw=1.2)
    steps, loss = _xy(series, "validation/loss")
    if steps:
        err = dict(series.get("validation/stderr", []))
        ax.errorbar(steps, loss, yerr=[err.get(s, 0.0) for s in steps], fmt="o-", color="tab:red", ms=4,
                    capsize=3, label="validation (+-1 s.e.)")
    name = "AR loss (next-token NLL, nats/token)" if objective == "ar" else "MDM loss (ELBO bound, nats/token)"
    ax.set(title=name, xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_loss_by_t(ax, series: Series, objective: str) -> None:
    from matplotlib import colormaps

    if objective == "ar":  # no noise level: every token is predicted from the ones before it
        ax.set(title="loss by noise level t: none (autoregressive run)", xticks=[], yticks=[])
        return

    buckets = _t_buckets(series, "loss_by_t/validation_t")
    name = "validation"
    if not buckets:
        buckets, name = _t_buckets(series, "loss_by_t/train_t"), "train"
    steps = sorted({s for _, tag in buckets for s, _ in series[tag]})
    cmap = colormaps["viridis"]
    for i, step in enumerate(steps):
        points = [(mid, dict(series[tag]).get(step)) for mid, tag in buckets]
        points = [(m, v) for m, v in points if v is not None]
        ax.plot(*zip(*points), "o-", ms=3, color=cmap(i / max(len(steps) - 1, 1)), label=f"step {step}")
    ax.set(title=f"{name} loss by noise level t", xlabel="t (mask probability ~ t)", ylabel="loss")
    ax.grid(alpha=0.3)
    if steps:
        ax.legend(fontsize=7, ncol=2)


def _plot_throughput(ax, series: Series) -> None:
    ax.plot(*_xy(series, "throughput/tokens_per_s_per_device"), color="tab:green", label="tokens/s per device")
    ax.set(title="throughput", xlabel="step", ylabel="tokens/s per device")
    ax.grid(alpha=0.3)
    steps, mfu = _xy(series, "throughput/mfu")
    if steps:
        right = ax.twinx()
        right.plot(steps, [100 * m for m in mfu], color="tab:orange", ls="--", label="MFU")
        right.set_ylabel("MFU (%)")
        right.legend(loc="lower right")
    ax.legend(loc="lower left")


def _plot_optim(ax, series: Series) -> None:
    ax.plot(*_xy(series, "optim/grad_norm"), color="tab:purple", label="grad norm")
    ax.set(title="optimizer", xlabel="step", ylabel="grad norm")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    right.plot(*_xy(series, "optim/lr"), color="tab:gray", ls="--", label="lr")
    right.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    right.legend(loc="center right")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("run", type=Path, help="the run's dump folder or its TensorBoard folder")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: <dump folder>/curves.png)")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    try:
        folder = find_event_folder(args.run)
        import matplotlib  # noqa: F401
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ImportError:
        print('error: plotting needs matplotlib: pip install ".[plot]" (or pip install matplotlib)', file=sys.stderr)
        return 2
    series = read_scalars(folder)
    out = args.out or (folder.parent if folder.name == "tb" else folder) / "curves.png"
    plot(series, out, args.title, run_objective(folder, series))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
