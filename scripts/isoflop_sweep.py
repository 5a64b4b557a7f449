"""IsoFLOP sweep: plan, train and fit one run per (FLOPs budget, model flavor), SMDM style.

Usage::

    python -m scripts.isoflop_sweep --budgets 1e18,3e18 --flavors 19M,34M,48M --dry-run
    python -m scripts.isoflop_sweep --budgets 1e18,3e18 --flavors 19M,34M,48M --output_dir outputs/isoflop \\
        --config_file train_configs/170m.toml -- --data.path /data/slim_star_combined
    python -m scripts.isoflop_sweep --output_dir outputs/isoflop --collect_only
    python -m scripts.isoflop_sweep --objective mdm,ar --budgets 1e18,3e18 --flavors 19M,34M,48M ...

Each run trains for steps = floor(C / (6 N B L)) (N = non-embedding parameters) with validation at its last
step. The sweep writes ``{output_dir}/configs/<run>.toml`` (a complete trainer config) and ``plan.json``; the
``local`` launcher trains the runs one after another into ``{output_dir}/runs/<run>/`` (skipping finished
ones), ``run_train`` prints ``./run_train.sh`` commands and ``slurm`` writes an sbatch script per run and
prints the ``sbatch`` commands. Then (or later with ``--collect_only``) it reads each run's final
``validation/loss`` from its TensorBoard events (falling back to the last ``loss/train``, flagged), fits a
parabola of loss in log10 N per budget and power laws N_opt(C), L_opt(C), and writes ``isoflop_fits.json``
and ``isoflop.png`` (needs matplotlib: ``pip install ".[plot]"``).

``--objective mdm,ar`` sweeps SMDM's autoregressive baseline beside MDM (same flavors, budgets and steps; AR runs
are named ``ar-<budget>-<flavor>`` and never use ssl_ratio, so with it their steps are fewer than MDM's; overrides of
diffusion.eps / t_sampling after ``--`` apply to the MDM runs only), fits each objective's isoFLOP curves
(``isoflop_mdm.png``, ``isoflop_ar.png``) and compares them (:mod:`dlm_titan.scaling_compare`): both loss
frontiers against compute and the compute multiplier C_mdm / C_ar at equal loss with a bootstrap interval, in
``isoflop_fits.json`` and ``isoflop_compare.png``.

Arguments after ``--`` are trainer overrides applied to every run (``--section.key value``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dlm_titan.errors import EXIT_USER_ERROR, UserError, report

ROOT = Path(__file__).resolve().parents[1]
PLAN_FILE = "plan.json"
FITS_FILE = "isoflop_fits.json"
FIGURE_FILE = "isoflop.png"
# Fields the sweep sets per run; overriding them after `--` would silently break the plan.
OWNED = {
    "--model.flavor": "--flavors", "--training.flops_budget": "--budgets", "--training.steps": "--budgets",
    "--training.global_batch_size": "--global_batch_size", "--training.seq_len": "--seq_len",
    "--training.local_batch_size": "--local_batch_size", "--diffusion.ssl_ratio": "--ssl_ratio",
    "--job.dump_folder": "--output_dir", "--job.config_file": "--config_file", "--training.objective": "--objective",
}
OBJECTIVES = ("mdm", "ar")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Splits ``argv`` at ``--`` into sweep options and trainer overrides."""
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter, epilog="Arguments after -- go to every run's trainer.")

    def add(name: str, **kwargs) -> None:
        p.add_argument(f"--{name}", *([f"--{name.replace('_', '-')}"] if "_" in name else []), dest=name, **kwargs)

    add("budgets", type=_floats, help="comma-separated training FLOPs, e.g. 1e18,3e18")
    add("objective", type=_objectives, default=None,
        help="comma-separated objectives: mdm, ar (SMDM's autoregressive baseline) or mdm,ar to compare them; "
             "unset: mdm, or with --collect_only the plan's")
    add("reference_loss", type=float, default=None,
        help="loss at which --objective mdm,ar compares compute (default: MDM's frontier at the largest budget)")
    add("bootstrap", type=int, default=1000, help="bootstrap replicates for the compute multiplier's interval")
    add("flavors", type=lambda s: [f for f in s.split(",") if f], help="comma-separated SMDM flavors, e.g. 19M,34M,48M")
    add("global_batch_size", type=int, default=256, help="sequences per optimizer step (SMDM: 256)")
    add("seq_len", type=int, default=2048, help="tokens per sequence (SMDM: 2048)")
    add("local_batch_size", type=int, default=8, help="micro-batch per rank")
    add("ssl_ratio", type=float, default=0.0, help="stochastic sequence length probability (SMDM: 0.01)")
    add("config_file", default=None, help="base trainer TOML the runs start from (default: trainer defaults)")
    add("output_dir", default="./outputs/isoflop", help="sweep folder: plan.json, configs/, runs/, fits, figure")
    add("launcher", choices=("local", "run_train", "slurm"), default="local",
        help="local: train here one run after another; run_train/slurm: print the commands to launch them")
    add("ngpu", type=int, default=1, help="GPUs per node for each run (run_train.sh NGPU)")
    add("nnodes", type=int, default=1, help="nodes per run (slurm launcher)")
    add("dry_run", action="store_true", help="print the plan table only")
    add("collect_only", action="store_true", help="train nothing: collect and fit the runs of output_dir/plan.json")
    add("rerun", action="store_true", help="train runs again even when they already finished")
    add("no_plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(own)
    if not args.collect_only and (not args.budgets or not args.flavors):
        p.error("--budgets and --flavors are required (except with --collect_only)")
    if args.objective is None and not args.collect_only:
        args.objective = ["mdm"]
    return args, train_args


def _objectives(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in OBJECTIVES]
    if not values or unknown or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"objectives must be distinct names among {', '.join(OBJECTIVES)}, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"budgets must be positive numbers, got {text!r}")
    return values


def base_config(args: argparse.Namespace, train_args: list[str]):
    """The config every run starts from: defaults < --config_file < trainer overrides."""
    from dlm_titan.config import load_config

    for arg in train_args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED:
            raise UserError(f"{flag} is set by the sweep; use the sweep option {OWNED[flag]} instead")
    # An AR-only sweep checks its overrides as AR runs (diffusion.eps / t_sampling are refused there); with MDM in
    # the sweep they apply to the MDM runs, and run_config gives the AR runs the defaults.
    objective = ["--training.objective", "ar"] if args.objective == ["ar"] else []
    return load_config(([] if args.config_file is None else ["--job.config_file", args.config_file]) + train_args
                       + objective)


def run_config(base, plan, dump_folder: Path, local_batch_size: int):
    """A complete trainer config for one planned run, with validation at its last step."""
    cfg = copy.deepcopy(base)
    cfg.job.config_file = None
    cfg.job.dump_folder = str(dump_folder)
    cfg.job.description = f"isoFLOP sweep: {plan.objective} {plan.flavor} at {plan.budget:.4g} FLOPs"
    cfg.training.objective = plan.objective
    cfg.model.flavor = plan.flavor
    cfg.training.flops_budget = plan.budget
    cfg.training.steps = plan.steps  # what the budget gives; the trainer recomputes it from flops_budget
    cfg.training.global_batch_size = plan.global_batch_size
    cfg.training.local_batch_size = local_batch_size
    cfg.training.seq_len = plan.seq_len
    cfg.diffusion.ssl_ratio = plan.ssl_ratio
    if plan.objective == "ar":  # it draws no masking noise, and the trainer refuses these off their defaults
        defaults = type(cfg.diffusion)()
        cfg.diffusion.eps, cfg.diffusion.t_sampling = defaults.eps, defaults.t_sampling
    # Random lengths would record new CUDA graphs at every new length (the trainer refuses the pair).
    cfg.compile.cudagraphs = cfg.compile.cudagraphs and plan.ssl_ratio == 0
    cfg.validation.enable = True
    cfg.validation.freq = plan.steps
    return cfg


def write_sweep(args, train_args, plans, base) -> list[dict]:
    """Writes configs/<run>.toml per run and plan.json; returns the plan.json rows."""
    from dlm_titan.config import to_toml

    out = Path(args.output_dir)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    rows = []
    for plan in plans:
        config_path = out / "configs" / f"{plan.name}.toml"
        # Absolute: run_train.sh changes into the repository before training.
        cfg = run_config(base, plan, (out / "runs" / plan.name).resolve(), args.local_batch_size)
        config_path.write_text(to_toml(cfg))
        rows.append({"name": plan.name, "objective": plan.objective, "budget": plan.budget, "flavor": plan.flavor,
                     "non_embedding_params": plan.non_embedding_params, "steps": plan.steps,
                     "warmup_steps": plan.warmup_steps, "global_batch_size": plan.global_batch_size,
                     "seq_len": plan.seq_len, "ssl_ratio": plan.ssl_ratio, "tokens": plan.tokens,
                     "config": f"configs/{plan.name}.toml", "run_dir": f"runs/{plan.name}",
                     "tb_folder": cfg.metrics.save_tb_folder})
    (out / PLAN_FILE).write_text(json.dumps({"trainer_overrides": train_args, "runs": rows}, indent=2) + "\n")
    return rows


def read_plan(output_dir: Path) -> list[dict]:
    path = output_dir / PLAN_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: run the sweep (without --collect_only) first, or fix --output_dir")
    return json.loads(path.read_text())["runs"]


def check_planned_objectives(rows: list[dict], objectives: list[str] | None, output_dir: Path) -> None:
    """UserError when --objective, given with --collect_only, names other objectives than the plan's runs have:
    the fit follows the plan, so the option would be ignored (no comparison where one was asked for)."""
    planned = sorted({r.get("objective", "mdm") for r in rows}, key=OBJECTIVES.index)
    if objectives is not None and sorted(objectives, key=OBJECTIVES.index) != planned:
        raise UserError(f"--objective {','.join(objectives)} but the plan in {output_dir} has runs of "
                        f"{','.join(planned)} only, which --collect_only fits: drop --objective, or plan and train "
                        f"the sweep with it (without --collect_only)")


def train_locally(rows: list[dict], output_dir: Path, ngpu: int, rerun: bool) -> None:
    """Trains each run in turn, its console output in runs/<run>/train.log; stops at the first failure."""
    from dlm_titan.scaling import last_train_step

    for i, row in enumerate(rows, 1):
        run_dir = output_dir / row["run_dir"]
        head = f"[{i}/{len(rows)}] {row['name']}: {row['steps']:,} steps"
        if not rerun and last_train_step(run_dir / row["tb_folder"]) >= row["steps"]:
            print(f"{head}: already finished, skipped (--rerun trains it again)", flush=True)
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        config = str((output_dir / row["config"]).resolve())
        if ngpu == 1:
            command, env = [sys.executable, "-m", "dlm_titan.train", "--job.config_file", config], dict(os.environ)
        else:
            command = ["bash", str(ROOT / "run_train.sh"), "--job.config_file", config]
            env = {**os.environ, "NGPU": str(ngpu), "PYTHON": sys.executable}
        print(f"{head} ...", flush=True)
        start = time.perf_counter()
        with open(run_dir / "train.log", "w") as log:
            # The user's working directory, so relative paths in their base config mean what they meant.
            rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise UserError(f"run {row['name']} failed with exit code {rc}: see {run_dir / 'train.log'}")
        print(f"{head} done in {time.perf_counter() - start:.0f} s", flush=True)


def launch_commands(rows: list[dict], output_dir: Path, launcher: str, ngpu: int, nnodes: int) -> list[str]:
    """Shell commands that launch every run (run_train.sh lines, or sbatch of a script written per run)."""
    commands = []
    for row in rows:
        config = shlex.quote(str((output_dir / row["config"]).resolve()))
        train = f"NGPU={ngpu} ./run_train.sh --job.config_file {config}"
        if launcher == "run_train":
            commands.append(f"cd {shlex.quote(str(ROOT))} && {train}")
            continue
        script = (output_dir / "configs" / f"{row['name']}.sbatch").resolve()
        script.write_text(_sbatch(row["name"], (output_dir / row["run_dir"]).resolve(), train, ngpu, nnodes))
        commands.append(f"sbatch {shlex.quote(str(script))}")
    return commands


def _sbatch(name: str, run_dir: Path, train: str, ngpu: int, nnodes: int) -> str:
    # One task per node; run_train.sh starts torchrun there, the first node of the job hosts the rendezvous.
    return "\n".join([
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=isoflop-{name}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={ngpu}",
        f"#SBATCH --output={run_dir}/slurm-%j.out",
        "set -euo pipefail",
        f"mkdir -p {shlex.quote(str(run_dir))}",
        f"cd {shlex.quote(str(ROOT))}",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun bash -c \"NNODES={nnodes} RDZV_ENDPOINT=$head_node:29500 RDZV_ID=$SLURM_JOB_ID {train}\"",
        "",
    ])


def collect(rows: list[dict], output_dir: Path) -> tuple[list[dict], list[str]]:
    """Each run's final loss (validation, else training, flagged) and whether it reached its last step."""
    from dlm_titan.scaling import last_train_step, read_final_loss

    results, warnings = [], []
    for row in rows:
        tb = output_dir / row["run_dir"] / row["tb_folder"]
        final = read_final_loss(tb)
        complete = last_train_step(tb) >= row["steps"]
        entry = {**row, "complete": complete, "loss": None, "loss_tag": None, "loss_step": None}
        if final is not None:
            entry |= {"loss": final.value, "loss_tag": final.tag, "loss_step": final.step,
                      "fallback_to_train_loss": not final.is_validation}
        if final is None or not complete:
            warnings.append(f"{row['name']}: not finished (no loss at step {row['steps']}), left out of the fits")
        elif not final.is_validation:
            warnings.append(f"{row['name']}: no validation/loss in its events; using the last loss/train "
                            f"(step {final.step}), a noisy single-batch estimate")
        results.append(entry)
    return results, warnings


def fit_objective(results: list[dict], warnings: list[str], output_dir: Path, plot: bool, objective: str = "mdm",
                  figure: str = FIGURE_FILE) -> dict:
    """Fits one objective's runs (isoFLOP parabolas and power laws), prints them and draws ``figure``; returns
    the report (``isoflop_fits.json``'s content for a one-objective sweep)."""
    from dlm_titan.scaling import budget_label, fit_isoflop, fit_to_dict, plot_isoflop

    usable = [r for r in results if r["complete"] and r["loss"] is not None]
    fit = fit_isoflop((r["budget"], r["non_embedding_params"], r["loss"]) for r in usable)
    all_validation = all(r["loss_tag"] == "validation/loss" for r in usable)
    report = {"objective": objective,
              "loss_source": "validation/loss" if all_validation else "loss/train (fallback) for some runs",
              **fit_to_dict(fit), "warnings": warnings, "runs": results}
    for w in warnings + fit.notes:
        print(f"warning: {objective}: {w}" if objective != "mdm" else f"warning: {w}")
    print(f"{'run':<20}{'N':>15}{'loss':>10}  source")
    for r in results:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        print(f"{r['name']:<20}{r['non_embedding_params']:>15,}{loss:>10}  {r['loss_tag'] or '-'}")
    for bf in fit.budgets:
        if bf.has_minimum:
            print(f"{objective} C = {budget_label(bf.budget)}: N_opt = {bf.parabola.n_opt:.4g}, "
                  f"L_opt = {bf.parabola.loss_opt:.4f}")
    if fit.n_opt_law is not None:
        print(f"{objective}: N_opt = {fit.n_opt_law.coefficient:.4g} * C^{fit.n_opt_law.exponent:.4f}; "
              f"L_opt = {fit.loss_opt_law.coefficient:.4g} * C^{fit.loss_opt_law.exponent:.4f}")
    if plot:
        kind = "exact NLL" if objective == "ar" else "ELBO"
        label = f"validation loss ({kind})" if all_validation else "final loss (training loss where no validation)"
        plot_isoflop(fit, output_dir / figure, loss_label=label)
        print(f"wrote {output_dir / figure}")
    return report


def fit_and_report(results: list[dict], warnings: list[str], output_dir: Path, plot: bool) -> dict:
    """A one-objective sweep: its fits in isoflop_fits.json and isoflop.png."""
    report = fit_objective(results, warnings, output_dir, plot, results[0].get("objective", "mdm") if results else "mdm")
    (output_dir / FITS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output_dir / FITS_FILE}")
    return report


def compare_and_report(results: list[dict], warnings: list[str], output_dir: Path, args) -> dict:
    """An MDM + AR sweep: each objective's fits (isoflop_<objective>.png), both frontiers and the compute
    multiplier at equal loss (isoflop_compare.png), all in isoflop_fits.json."""
    from dlm_titan.scaling_compare import (
        compare_objectives,
        comparison_to_dict,
        format_multiplier,
        plot_comparison,
    )

    plot = not args.no_plot
    report = {"objectives": {}}
    runs = {}
    for objective in OBJECTIVES:
        mine = [r for r in results if r.get("objective", "mdm") == objective]
        names = {r["name"] for r in mine}
        own_warnings = [w for w in warnings if w.split(":", 1)[0] in names]
        report["objectives"][objective] = fit_objective(mine, own_warnings, output_dir, plot, objective,
                                                        f"isoflop_{objective}.png")
        runs[objective] = [(r["budget"], r["non_embedding_params"], r["loss"]) for r in mine
                           if r["complete"] and r["loss"] is not None]
    unfinished = [o for o in OBJECTIVES if not runs[o]]
    if unfinished:  # the plan has both objectives: what is missing is finished runs, not an --objective
        raise UserError(f"cannot compare MDM and AR yet: no {' or '.join(unfinished)} run of {output_dir} has "
                        "finished; train them (rerunning the sweep's command skips finished runs) or wait for the "
                        "launched ones, then rerun with --collect_only")
    cmp = compare_objectives(runs, args.reference_loss, replicates=args.bootstrap)
    report["comparison"] = comparison_to_dict(cmp)
    for note in cmp.notes:
        print(f"warning: {note}")
    print(format_multiplier(cmp))
    (output_dir / FITS_FILE).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output_dir / FITS_FILE}")
    if plot:
        plot_comparison(cmp, runs, output_dir / "isoflop_compare.png")
        print(f"wrote {output_dir / 'isoflop_compare.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point: bad input prints one line and returns 2."""
    args, train_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    output_dir = Path(args.output_dir)
    try:
        if args.collect_only:
            rows = read_plan(output_dir)
            check_planned_objectives(rows, args.objective, output_dir)
        else:
            from dlm_titan.scaling import format_plan, plan_sweep

            if args.global_batch_size % args.local_batch_size:
                raise UserError(f"--global_batch_size {args.global_batch_size} is not a multiple of "
                                f"--local_batch_size {args.local_batch_size}")
            if args.ssl_ratio > 0 and "mdm" not in args.objective:  # AR runs never crop: it would do nothing
                raise UserError(f"--ssl_ratio {args.ssl_ratio} applies to MDM runs only, and --objective "
                                f"{','.join(args.objective)} plans none: drop --ssl_ratio, or add mdm to --objective")
            base = base_config(args, train_args)
            plans = plan_sweep(args.budgets, args.flavors, global_batch_size=args.global_batch_size,
                               seq_len=args.seq_len, ssl_ratio=args.ssl_ratio,
                               warmup_steps=base.lr_scheduler.warmup_steps, objectives=args.objective)
            print(format_plan(plans), flush=True)
            if args.dry_run:
                return 0
            rows = write_sweep(args, train_args, plans, base)
            if args.launcher != "local":
                print("\n".join(launch_commands(rows, output_dir, args.launcher, args.ngpu, args.nnodes)))
                print(f"# then: python -m scripts.isoflop_sweep --output_dir {output_dir} --collect_only")
                return 0
            train_locally(rows, output_dir, args.ngpu, args.rerun)
        results, warnings = collect(rows, output_dir)
        if len({r.get("objective", "mdm") for r in rows}) == 1:
            fit_and_report(results, warnings, output_dir, plot=not args.no_plot)
        else:
            compare_and_report(results, warnings, output_dir, args)
    except UserError as e:
        return report(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
