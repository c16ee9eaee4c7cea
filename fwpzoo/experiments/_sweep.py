"""The sweep engine: an experiment is a grid of points and a report; this module computes,
records and reports them.

    fwpzoo experiment NAME [--quick] [--cpu-devices N]  # every point not yet recorded
    fwpzoo experiment NAME --point POINT                # one point alone; prints its metrics
    fwpzoo experiment NAME --only GLOB                  # only the pending points matching GLOB
    fwpzoo experiment NAME --list                       # the grid, each point done or pending
    fwpzoo experiment NAME --report-only                # the page from the recorded points

computes each point in <workdir>/NAME/<point>/ and, as soon as it finishes, writes its record file
<points>/<point>.json (docs/results/NAME/points/ for the full sweep, so the records are kept in the
repository; beside the runs for --quick). A rerun skips every recorded point, so a sweep continues
across sessions and machines; a point whose training was cut short resumes from its checkpoint.

A record file holds the point's labels, its metrics, and how it was made: seed, steps, stop
reason, seconds, software versions and `command`, the command line that recomputes that point
alone (its last stdout line is the JSON object of the point's metrics). A record is only made
from committed code of main (`refuse_unrecoverable_code`). The flat records (one per metric of a
point: the experiment's own `keys`, then RUN_FIELDS) go to NAME.json, the page to NAME.md: the
engine writes its title, the command, the progress, the cost and the software; the experiment's
report writes what lies between.

Adding an experiment is a module fwpzoo/experiments/NAME.py holding a grid and a report:

    from fwpzoo.config import load
    from fwpzoo.experiments._sweep import CONFIGS, Experiment, model_labels, train_point
    from fwpzoo.reports import group, markdown_table, spread_cell

    NAME, SEEDS = "recall", (0, 1, 2)
    KEYS = ("model", "cell", "state_size", "x", "seed", "metric", "value")

    def grid(options):  # every point, in the order to compute them
        points = []
        for seed in SEEDS:  # seeds outermost: a sweep cut short has every setting once
            for model in ("delta_rule", "linear_attn"):
                path = CONFIGS / NAME / f"{model}.yaml"
                labels = {**model_labels(load(path)), "x": 16}
                metrics = {"accuracy": {}}  # the test metrics that become records
                name = f"{model}-s{seed}"  # fixed once recorded: records are found by it
                points.append(train_point(name, path, (), labels, metrics, seed))
        return points

    def report(records, points, options):  # the page's body, from the flat records
        cells = group(records, ["model"])
        rows = [[model, spread_cell(values, len(SEEDS))] for (model,), values in cells.items()]
        return markdown_table(["model", "accuracy"], rows)

    EXPERIMENT = Experiment(NAME, KEYS, grid, report, title="Recall")

with its configs in configs/experiments/NAME/; `fwpzoo experiment NAME` finds it by its module
name (fwpzoo/experiments/__init__.py). `model_labels` labels a model by what its first layer's
describe() says (mixer, cell, rule, feature dimension, state size), never by restating it; under
--quick a grid's trainer points take QUICK_OVERRIDES, adding only what their task needs (a shorter
sequence, a smaller vocabulary); `_tuning` adds a learning-rate grid; a computation that
is not a trainer run passes `execute=(point, workdir) -> Outcome` (capacity.py); settings kept
elsewhere than configs/experiments/NAME/ pass `source`. A report draws its figures with
fwpzoo.reports (`subplots`, `errorbars`, `save_figure`) into `options.out / f"{NAME}.png"`.
Findings and their reasons go in the page's notes, below its notes marker, where they are kept
when the page is rewritten; not in code comments.
"""

import argparse
import fnmatch
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
from tqdm import tqdm

from fwpzoo.config import ConfigError, flatten, from_data, load, to_dict
from fwpzoo.config_file import apply_overrides, read_config_file
from fwpzoo.layers import describe
from fwpzoo.reports import (
    TRACKED_INPUTS,
    checkout_state,
    git,
    git_commit,
    versions_line,
    write_page,
)
from fwpzoo.train import (
    TrainingDiverged,
    evaluate,
    initial_run,
    make_eval_step,
    restore_run,
    train,
    training_time,
)
from fwpzoo.train.checkpoint import saved_steps
from fwpzoo.train.metrics import read_metrics
from fwpzoo.train.sharding import split_cpu
from fwpzoo.train.workdir import CHECKPOINT_DIR, stored_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiments"
RESULTS = REPO / "docs" / "results"
# How a record was made; every record carries these after its experiment's own keys.
RUN_FIELDS = ("point", "seed", "steps", "stop_reason", "seconds", "versions", "command")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
# What --quick does to every trainer point: two steps, one warmup step, both checkpointed and
# evaluated on one batch; an experiment's QUICK_OVERRIDES add what its task needs on top.
QUICK_OVERRIDES = (
    "train.steps=2",
    "train.warmup_steps=1",
    "checkpoint.every=2",
    "eval.every=2",
    "eval.num_batches=1",
)


class ExperimentArgs(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (the CLI prints them, exit code 2)."""

    def error(self, message):
        raise ConfigError(message)


@dataclass(frozen=True)
class Options:
    name: str
    quick: bool
    root: Path  # run workdirs
    out: Path  # NAME.json, NAME.md and plots
    progress: bool
    report_only: bool = False  # collect the recorded points, compute nothing
    point: str | None = None  # compute this point alone and print its metrics
    list_points: bool = False
    cpu_devices: int | None = None
    only: str | None = None  # compute only the pending points whose names match this glob
    allow_dirty: bool = False  # record points from a tree with uncommitted changes, marked

    @property
    def records(self) -> bool:
        """Whether this run computes points and writes their records into the repository."""
        return not (self.quick or self.report_only or self.point or self.list_points)

    @property
    def points_dir(self) -> Path:
        return self.out / self.name / "points" if not self.quick else self.root / "points"


def parse_options(name: str, argv: Sequence[str]) -> Options:
    """`[--quick] [--workdir DIR] [--cpu-devices N] [--allow-dirty]
    [--point P | --list | --report-only | --only GLOB] [--no-progress]`.

    The full sweep runs in runs/experiments/NAME and records into docs/results; --quick runs in
    runs/experiments-quick/NAME and records next to its runs, so it never touches docs/results.
    Both folders are in the checkout this code comes from (REPO), wherever the command is run.
    """
    parser = ExperimentArgs(prog=f"fwpzoo experiment {name}")
    parser.add_argument("--quick", action="store_true", help="a seconds-long version")
    parser.add_argument("--workdir", help="where the runs go (default: runs/experiments[-quick])")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--cpu-devices", type=int, help="split the host CPU into N devices")
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="record points although fwpzoo/ or configs/ differ from the commit; each record "
        "lists the uncommitted paths",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--report-only", action="store_true", help="report the recorded points")
    what.add_argument("--point", help="compute one point alone; last stdout line: its metrics")
    what.add_argument("--list", action="store_true", help="the points, each done or pending")
    what.add_argument(
        "--only",
        metavar="GLOB",
        help="compute and record only the pending points whose names match GLOB (e.g. '*-s1'); "
        "the page reports every recorded point",
    )
    args = parser.parse_args(list(argv))
    runs = REPO / "runs" / f"experiments{'-quick' * args.quick}"
    base = Path(args.workdir) if args.workdir else runs
    root = base / name
    out = root if args.quick else RESULTS
    return Options(
        name,
        args.quick,
        root,
        out,
        not args.no_progress,
        args.report_only,
        args.point,
        args.list,
        args.cpu_devices,
        args.only,
        args.allow_dirty,
    )


# XLA:CPU aborts a process whose devices wait more than 40 s for each other in a collective.
# Sweeps run at low priority on shared machines, where one device's thread can be descheduled
# that long (a state_tracking sweep with --cpu-devices 2 under nice 19 at load ~30 died in a
# gradient all-reduce), so they wait longer; but not forever: with jaxlib 0.10.2, two CPU
# devices on two cores can also deadlock for good (a state_tracking run sat in a collective with
# every thread asleep at load 0), and an abort after 30 minutes lets a rerun resume the point
# from its last checkpoint instead of hanging. (A deadlock with no collective pending is left to
# train.stall_timeout.)
PATIENT_COLLECTIVES = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
    "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
)


def use_cpu_devices(count: int | None) -> None:
    """Splits the host CPU into `count` devices with patient collectives, or checks that JAX
    already has that many (a point recomputed inside a process that ran the sweep)."""
    if count is None:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in PATIENT_COLLECTIVES if flag.split("=")[0] not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()  # read when JAX starts
    try:
        split_cpu(count)
    except ConfigError:
        if jax.device_count() != count:
            raise


# ---------------------------------------------------------------------------------------------
# Points and what a point's computation returns


@dataclass(frozen=True)
class Point:
    """One seed of one setting of a sweep."""

    name: str  # unique in its experiment: the record file's name and --point's argument
    labels: dict  # record fields the point fixes (model, task, x, seed, ...); may hold more
    metrics: dict  # {name of a metric it computes: record fields of that metric's record}
    spec: dict  # what it computes: a record made from another spec is stale
    config: Path | None = None  # a run of the project's trainer: its config and overrides
    overrides: tuple[str, ...] = ()
    test_batches: int | None = None  # the test evaluation's batches; None: eval.num_batches


@dataclass(frozen=True)
class Outcome:
    metrics: dict  # {name: value}: what `--point` prints
    steps: int
    # "steps" (the planned length), "reached_stop_metric", "diverged", or capacity's own
    stop_reason: str
    labels: dict = field(default_factory=dict)  # record fields known once computed (num_params)
    details: dict = field(default_factory=dict)  # what the report reads besides the records
    earlier_seconds: float = 0.0  # wall seconds earlier processes spent on it (a resumed run)
    earlier_cpu_seconds: float = 0.0  # and their CPU seconds


def train_point(
    name: str,
    config: Path,
    overrides: Sequence[str],
    labels: dict,
    metrics: dict,
    seed: int,
    test_batches: int | None = None,
) -> Point:
    """A point that trains `config` with `overrides` and train.seed=`seed`, then evaluates its
    final checkpoint on the test split. Its spec holds the settings the file and the overrides
    give, so a record goes stale when its config file is edited (the code's defaults are not
    included: a new setting with a default that keeps the old behaviour leaves records valid)."""
    overrides = (*overrides, f"train.seed={seed}")
    data = read_config_file(config)
    given = flatten(apply_overrides(data, overrides))  # the keys set, their values as written
    typed = flatten(to_dict(from_data(data, overrides)))
    settings = {key: typed[key] for key in given}
    spec = {
        "config": repo_path(config),
        "overrides": list(overrides),
        "settings": settings,
        "test_batches": test_batches,
    }
    labels = {**labels, "seed": seed}
    return Point(name, labels, metrics, spec, Path(config), overrides, test_batches)


def repo_path(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def median_throughput(workdir: Path) -> float | None:
    """Median tokens/s over a run's logged rows, the first (it includes compilation) left out."""
    rates = [row["tokens_per_sec"] for row in read_metrics(workdir)[1:] if "tokens_per_sec" in row]
    return statistics.median(rates) if rates else None


def evaluate_checkpoint(
    workdir: Path, num_batches: int | None = None, *, initial: bool = False
) -> tuple[dict, int]:
    """(metrics on the test split, at eval.lengths too, parameter count) of a run's latest
    checkpoint, as `fwpzoo eval` computes them; num_batches replaces eval.num_batches.
    initial: the model at its initialisation instead (a run that diverged before its first save)."""
    run, step, model_state = (
        initial_run(stored_config(workdir)) if initial else restore_run(workdir)
    )
    eval_step = jax.jit(make_eval_step(run.graphdef))
    cfg = run.cfg.eval if num_batches is None else replace(run.cfg.eval, num_batches=num_batches)
    metrics = evaluate(eval_step, model_state, run.task, cfg, run.mesh, "test")
    size = sum(math.prod(x.shape) for x in jax.tree.leaves(model_state["params"]))
    return {"step": step, **metrics}, size


def refuse_other_run(workdir: Path, cfg) -> None:
    """ConfigError if `workdir` holds a run of a config other than `cfg`, run length included:
    `fwpzoo train` may extend a run, but a point resumed under a longer schedule would not be
    the point its command recomputes from the first step."""
    stored = stored_config(workdir)
    if stored is None or stored == cfg:
        return
    changes = spec_changes(flatten(to_dict(stored)), flatten(to_dict(cfg)))
    raise ConfigError(
        f"{workdir} holds a run of another config ({changes}); "
        "remove it to recompute the point from its first step"
    )


def run_training(point: Point, workdir: Path) -> Outcome:
    """Trains (or resumes) a train_point in `workdir` and evaluates its last checkpoint."""
    cfg = load(point.config, point.overrides)
    refuse_other_run(workdir, cfg)
    start, cpu_start = time.perf_counter(), time.process_time()
    stop_reason = "steps"
    try:
        train(cfg, workdir, progress=False)
    except TrainingDiverged:
        stop_reason = "diverged"  # evaluated at the last good checkpoint, or step 0 if none
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    initial = stop_reason == "diverged" and not saved_steps(workdir / CHECKPOINT_DIR)
    test, size = evaluate_checkpoint(workdir, point.test_batches, initial=initial)
    # the run's own count covers the segments before a resume; this process's, older checkpoints
    spent = {"train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds}
    earlier_segments = {} if initial else training_time(workdir, test["step"])
    every_segment = {**spent, **earlier_segments}
    details = {
        "test": test,
        **every_segment,
        "tokens_per_sec": median_throughput(workdir),
        "curve": [[row["step"], row["loss"]] for row in read_metrics(workdir)],  # training loss
    }
    if stop_reason == "steps" and test["step"] < cfg.train.steps:
        stop_reason = "reached_stop_metric"  # train.stop_metric met at an eval before the budget
    metrics = {name: test[name] for name in point.metrics}
    earlier = every_segment["train_seconds"] - train_seconds
    earlier_cpu = every_segment["train_cpu_seconds"] - train_cpu_seconds
    return Outcome(
        metrics, test["step"], stop_reason, {"num_params": size}, details, earlier, earlier_cpu
    )


def recorded_metric(options: Options, point: str, metric: str) -> float | None:
    """A recorded point's metric, None while the point is pending."""
    path = options.points_dir / f"{point}.json"
    return json.loads(path.read_text())["metrics"][metric] if path.exists() else None


# ---------------------------------------------------------------------------------------------
# Provenance and records


def versions() -> dict:
    """The software a point was computed with, and on what."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    found["fwpzoo"] = git_commit()
    devices = jax.devices()
    found["devices"] = f"{len(devices)} x {devices[0].device_kind}"
    return found


MAIN_BRANCH = "main"


def in_main_history(commit: str) -> bool:
    """Whether `commit` is reachable from the main branch (True where there is no such branch,
    as in a checkout made from an archive of one commit)."""
    try:
        git("rev-parse", "--verify", "--quiet", f"refs/heads/{MAIN_BRANCH}")
    except (OSError, subprocess.CalledProcessError):
        return True
    try:
        git("merge-base", "--is-ancestor", commit, MAIN_BRANCH)
    except subprocess.CalledProcessError:
        return False
    return True


def refuse_unrecoverable_code(options: Options) -> None:
    """ConfigError, before any point is computed, where a record would name code that cannot be
    checked out again: no git checkout, a commit outside main's history, or uncommitted changes
    to the code or configs (unless --allow-dirty, which lists them in each record)."""
    state = checkout_state()
    if state is None:
        raise ConfigError(f"{REPO} is not a git checkout: records name the commit they ran")
    head, changed = state
    if not in_main_history(head):
        raise ConfigError(
            f"HEAD {head[:12]} is not in {MAIN_BRANCH}'s history: records must name a commit of "
            f"{MAIN_BRANCH} (sweep from a checkout of it)"
        )
    if changed and not options.allow_dirty:
        shown = ", ".join(changed[:3]) + ", ..." * (len(changed) > 3)
        raise ConfigError(
            f"uncommitted changes in {len(changed)} file(s) under "
            f"{'/, '.join(TRACKED_INPUTS)}/ ({shown}): commit them, sweep from a clean checkout, "
            "or pass --allow-dirty to record points marked as made from an uncommitted tree"
        )


def point_command(options: Options, point: Point) -> str:
    """The command line that recomputes `point` alone, on as many CPU devices as this run."""
    parts = ["fwpzoo", "experiment", options.name]
    if options.quick:
        parts.append("--quick")
    if jax.devices()[0].platform == "cpu":
        parts += ["--cpu-devices", str(jax.device_count())]
    return shlex.join([*parts, "--point", point.name])


def records_of(stored: dict, keys: Sequence[str]) -> list[dict]:
    """A point's flat records, one per metric, with the fields `keys` (None where one does not
    apply)."""
    run = {name: stored[name] for name in RUN_FIELDS}
    records = []
    for metric, extra in stored["metric_fields"].items():
        value = stored["metrics"][metric]
        # a metric's fields may name it (several "accuracy" records told apart by x)
        fields = {**stored["labels"], "metric": metric, **extra, "value": value, **run}
        records.append({key: fields.get(key) for key in keys})
    return records


def compute_point(point: Point, workdir: Path, options: Options, execute) -> dict:
    """Computes one point; what its record file holds."""
    start, cpu_start = time.perf_counter(), time.process_time()
    outcome = execute(point, workdir)
    missing = set(point.metrics) - set(outcome.metrics)
    if missing:
        raise ValueError(f"point {point.name} did not compute {sorted(missing)}")
    return {
        "point": point.name,
        "spec": point.spec,
        "labels": {**point.labels, **outcome.labels},
        "metric_fields": point.metrics,
        "metrics": outcome.metrics,
        "seed": point.labels.get("seed"),
        "steps": outcome.steps,
        "stop_reason": outcome.stop_reason,
        "seconds": time.perf_counter() - start + outcome.earlier_seconds,  # over every process
        # this process's CPU time (every thread), plus a resumed run's earlier training
        "cpu_seconds": time.process_time() - cpu_start + outcome.earlier_cpu_seconds,
        "versions": versions(),
        "command": point_command(options, point),
        **uncommitted_mark(),
        "details": outcome.details,
    }


def uncommitted_mark() -> dict:
    """{"uncommitted": paths} for a record made from a tree that differs from its commit
    (--allow-dirty), else nothing."""
    state = checkout_state()
    return {"uncommitted": list(state[1])} if state and state[1] else {}


def read_point(path: Path, point: Point) -> dict | None:
    """A point's record, None if it has none; ConfigError if it was made from another spec."""
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    if stored["spec"] != point.spec:
        raise ConfigError(
            f"{path} was computed from another spec ({spec_changes(stored['spec'], point.spec)}); "
            "remove it to recompute the point"
        )
    return stored


def spec_changes(old: dict, new: dict) -> str:
    """What differs between two specs, or two flat configs, one `key: old -> new` per change
    (a spec's settings by name)."""
    old_flat = {**old, **{f"settings {k}": v for k, v in old.get("settings", {}).items()}}
    new_flat = {**new, **{f"settings {k}": v for k, v in new.get("settings", {}).items()}}
    keys = [k for k in dict.fromkeys([*old_flat, *new_flat]) if k != "settings"]
    missing = "(none)"
    return ", ".join(
        f"{k}: {old_flat.get(k, missing)} -> {new_flat.get(k, missing)}"
        for k in keys
        if old_flat.get(k, missing) != new_flat.get(k, missing)
    )


def read_details(options: Options, point: str) -> dict:
    """The details a recorded point kept beside its records (curves, timings)."""
    return json.loads((options.points_dir / f"{point}.json").read_text())["details"]


def write_json(path: Path, data) -> None:
    """Atomically: a record file is always complete, even if the sweep is killed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1) + "\n")
    partial.rename(path)


# ---------------------------------------------------------------------------------------------
# The sweep


def default_source(name: str) -> str:
    return f"configs: `configs/experiments/{name}/*.yaml`"


@dataclass(frozen=True)
class Experiment:
    """A grid and a report; the engine does the rest."""

    name: str
    keys: tuple[str, ...]  # the fields of its records, in order (RUN_FIELDS are appended)
    points: Callable[[Options], list[Point]]  # its grid, in the order to compute it
    # (records, grid, options) -> the page's body, between the engine's header and software line
    report: Callable[[list[dict], list[Point], Options], str]
    execute: Callable[[Point, Path], Outcome] = run_training
    title: str = ""  # the page's title (default: the name)
    # where the settings are, for the page's command line (default: its configs folder)
    source: Callable[[Options], str] | None = None
    cost_note: str = ""  # said after the cost (on what machine it was paid)


def run_points(experiment: Experiment, points: Sequence[Point], options: Options) -> list[dict]:
    """The stored record of every point that has one, computing the others first (unless
    report_only; with `only`, those whose names match it), each written as soon as it is done."""
    stored = []
    bar = tqdm(points, unit="point", disable=not options.progress, desc=options.name)
    for point in bar:
        bar.set_postfix_str(point.name)
        path = options.points_dir / f"{point.name}.json"
        done = read_point(path, point)
        if done is None and not options.report_only and selected(point, options):
            done = compute_point(point, options.root / point.name, options, experiment.execute)
            write_json(path, done)
        if done is not None:
            stored.append(done)
    return stored


def selected(point: Point, options: Options) -> bool:
    return options.only is None or fnmatch.fnmatchcase(point.name, options.only)


def recompute_point(experiment: Experiment, points: Sequence[Point], options: Options) -> int:
    """`--point NAME`: computes it alone in a fresh workdir (nothing recorded); prints metrics."""
    by_name = {p.name: p for p in points}
    if options.point not in by_name:
        raise ConfigError(
            f"unknown point {options.point!r} of {options.name}; `--list` shows the points"
        )
    with tempfile.TemporaryDirectory(prefix=f"fwpzoo-{options.name}-") as workdir:
        outcome = experiment.execute(by_name[options.point], Path(workdir) / options.point)
    print(json.dumps(outcome.metrics))
    return 0


def list_points(points: Sequence[Point], options: Options) -> int:
    for point in points:
        done = (options.points_dir / f"{point.name}.json").exists()
        print(f"{'done   ' if done else 'pending'} {point.name}")
    return 0


def refuse_another_checkout() -> None:
    """ConfigError where the command runs inside another checkout than the one this code comes
    from: its records would land in REPO, not in the checkout the user is in."""
    try:
        here = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return  # not in a checkout: nothing to confuse REPO with
    if Path(here).resolve() != REPO:
        raise ConfigError(
            f"this fwpzoo is the one in {REPO}, whose docs/results and runs/ its experiments "
            f"write; run it there, or install the checkout here first (pip install -e {here})"
        )


def main(experiment: Experiment, argv: Sequence[str]) -> int:
    """The `fwpzoo experiment NAME` entry point of an experiment."""
    options = parse_options(experiment.name, argv)
    refuse_another_checkout()
    checkout_state()  # the code this process runs, before anything can change the checkout
    if options.records:
        refuse_unrecoverable_code(options)
    use_cpu_devices(options.cpu_devices)
    # Identical computations compile once: every seed of a setting, and a resumed sweep.
    jax.config.update("jax_compilation_cache_dir", str(options.root.parent / ".jax_cache"))
    points = experiment.points(options)
    if options.only is not None and not any(selected(p, options) for p in points):
        raise ConfigError(
            f"no point of {options.name} matches --only {options.only!r}; `--list` shows the points"
        )
    if options.point is not None:
        return recompute_point(experiment, points, options)
    if options.list_points:
        return list_points(points, options)
    write_report(experiment, points, run_points(experiment, points, options), options)
    return 0


def flat_records(experiment: Experiment, stored: Sequence[dict]) -> list[dict]:
    """The flat records of stored points: one per metric, the experiment's keys then RUN_FIELDS."""
    keys = (*experiment.keys, *(k for k in RUN_FIELDS if k not in experiment.keys))
    return [rec for s in stored for rec in records_of(s, keys)]


def write_report(
    experiment: Experiment, points: Sequence[Point], stored: Sequence[dict], options: Options
) -> None:
    """NAME.json (the flat records) and NAME.md (the page) of the stored points; with none
    stored (only with --report-only), a page that says so rather than a stale one."""
    records = flat_records(experiment, stored)
    write_json(options.out / f"{options.name}.json", records)
    page = page_header(experiment, points, records, options)
    if records:
        body = experiment.report(records, points, options).rstrip()
        page += f"{body}\n\nSoftware: {versions_line(records)}.\n"
    write_page(options.out / f"{options.name}.md", page)


# ---------------------------------------------------------------------------------------------
# The page's parts that every experiment shares


def page_header(
    experiment: Experiment, points: Sequence[Point], records: Sequence[dict], options: Options
) -> str:
    """Title, the command that continues the sweep, what is recorded and what it cost."""
    title = experiment.title or options.name
    if not records:
        return f"# {title}\n\n{progress_note(points, records, options)}\n"
    source = (experiment.source or (lambda _: default_source(options.name)))(options)
    return (
        f"# {title}\n\n"
        f"Command: `{sweep_command(options)}` ({source}); each record in `{options.name}.json` "
        "names the command that recomputes its point alone.\n"
        f"{progress_note(points, records, options)}\n"
        f"Cost: {compute_cost(points, options)}{experiment.cost_note}.\n"
    )


def progress_note(points: Sequence[Point], records: Sequence[dict], options: Options) -> str:
    """Which points are recorded and which pending, and the command that continues the sweep."""
    done = {rec["point"] for rec in records if rec.get("point")}
    pending = [p.name for p in points if p.name not in done]
    text = f"Recorded: {len(points) - len(pending)} of {len(points)} points"
    if not pending:
        return text + "."
    shown = ", ".join(pending[:12]) + (f", ... ({len(pending) - 12} more)" * (len(pending) > 12))
    return (
        f"{text}; pending: {shown}. `{sweep_command(options)}` computes the pending points "
        "(each is recorded as it finishes; `--list` shows which)."
    )


def sweep_command(options: Options) -> str:
    devices = f" --cpu-devices {options.cpu_devices}" if options.cpu_devices else ""
    return f"fwpzoo experiment {options.name}" + " --quick" * options.quick + devices


def compute_cost(points: Sequence[Point], options: Options) -> str:
    """What the recorded points of the grid cost: wall hours, and CPU hours (process time over
    every thread) where a record holds it: `cpu_seconds` of the whole point, or, in records made
    before that field, `train_cpu_seconds` of its training."""
    wall = cpu = 0.0
    recorded = with_cpu = 0
    for point in points:
        path = options.points_dir / f"{point.name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        recorded += 1
        wall += record["seconds"]
        seconds = record.get("cpu_seconds", record["details"].get("train_cpu_seconds"))
        if seconds is not None:
            cpu += seconds
            with_cpu += 1
    return (
        f"{cpu / 3600:.2f} CPU-hours over the {with_cpu} of {recorded} recorded points that"
        f" record their CPU time; {wall / 3600:.1f} wall-hours over all {recorded}"
    )


# ---------------------------------------------------------------------------------------------
# What a model config is, in record terms: its first layer's own description

SUM_RULE_CELLS = ("linear_attn", "gated_linear_attn")  # Hebbian writes; the others are delta


def feature_map_label(model) -> str | None:
    """The record spelling of an FWP layer's feature map: dpfp with nu 2 is dpfp2; identity None."""
    if model.feature_map == "identity":
        return None
    return f"dpfp{model.dpfp_nu}" if model.feature_map == "dpfp" else model.feature_map


def model_labels(cfg, seq_len: int | None = None) -> dict:
    """Record fields of a config's model, named by its first layer, from the layer's describe():
    mixer; model (an FWP layer's cell, else the mixer); cell and rule (sum or delta) of a layer
    whose state a cell writes; feature_map, phi_dim (the key axis after the feature map) and
    beta_range of an FWP layer; state_size, the numbers the layer keeps at `seq_len` tokens
    (data.seq_len by default): attention's key-value cache, every other layer's state."""
    layer = cfg.model.layers()[0]
    described = describe(layer)
    mixer, cell = described.mixer, described.rule
    labels = {"mixer": mixer, "model": mixer}
    labels["state_size"] = described.size_at(seq_len or cfg.data.seq_len)
    if mixer == "attention":
        return {**labels, "feature_map": "softmax"}
    if mixer not in ("fwp", "mamba2"):  # no cell writes the state: nothing more to say
        return labels
    labels |= {"cell": cell, "rule": "sum" if cell in SUM_RULE_CELLS else "delta"}
    labels["phi_dim"] = described.feature_dim
    if mixer == "fwp":
        labels |= {"model": cell, "feature_map": feature_map_label(layer)}
        if cell not in SUM_RULE_CELLS:
            labels["beta_range"] = layer.beta_range
    return labels
