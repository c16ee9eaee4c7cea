"""Sweep machinery shared by the experiments: runs, resumable execution, records, reports.

An experiment is a list of `Run`s, each a YAML config plus `key=value` overrides. `run_sweep`
trains each one in-process with the project's trainer into <root>/<run name>/, evaluates its
final checkpoint on the test split and stores that in the run's result.json:

    a run with a result.json is skipped;
    a run with checkpoints but no result resumes from its latest checkpoint (train does that);
    anything else starts fresh.

Results become flat records (RECORD_KEYS), written with a report as NAME.json and NAME.md.
"""

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import jax
import matplotlib
from tqdm import tqdm

from fwpzoo.config import ConfigError, load
from fwpzoo.layers.feature_maps import feature_dim
from fwpzoo.reports import write_page
from fwpzoo.train import evaluate, make_eval_step, restore_run, train
from fwpzoo.train.metrics import read_metrics

matplotlib.use("Agg")  # files only: no display on the machines that run sweeps

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "experiments"
RESULTS = REPO / "docs" / "results"
RESULT_FILE = "result.json"
RECORD_KEYS = (
    "model",
    "cell",
    "rule",
    "feature_map",
    "phi_dim",
    "beta_range",
    "task",
    "setting",
    "state_size",
    "x",
    "metric",
    "value",
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
    report_only: bool = False  # collect the finished runs, train nothing


def parse_options(name: str, argv: Sequence[str]) -> Options:
    """`[--quick] [--workdir DIR] [--no-progress] [--report-only]`.

    The full sweep runs in runs/experiments/NAME and reports into docs/results; --quick runs in
    runs/experiments-quick/NAME and reports next to its runs, so it never touches docs/results.
    """
    parser = ExperimentArgs(prog=f"fwpzoo experiment {name}")
    parser.add_argument("--quick", action="store_true", help="a seconds-long version")
    parser.add_argument("--workdir", help="where the runs go (default: runs/experiments[-quick])")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--report-only", action="store_true", help="report the finished runs, train nothing"
    )
    args = parser.parse_args(list(argv))
    base = (
        Path(args.workdir) if args.workdir else Path("runs", f"experiments{'-quick' * args.quick}")
    )
    root = base / name
    out = root if args.quick else RESULTS
    return Options(name, args.quick, root, out, not args.no_progress, args.report_only)


@dataclass(frozen=True)
class Run:
    """One training run of a sweep."""

    name: str  # its workdir under the sweep's root
    config: Path
    overrides: tuple[str, ...] = ()
    labels: dict = field(default_factory=dict)  # record fields fixed by the run (model, cell, ...)
    test_batches: int | None = None  # the test evaluation's batches; None: eval.num_batches


def record(**fields) -> dict:
    """A flat record with every key of RECORD_KEYS (None where a key does not apply)."""
    unknown = set(fields) - set(RECORD_KEYS)
    if unknown:
        raise KeyError(f"not record keys: {sorted(unknown)}")
    return {key: fields.get(key) for key in RECORD_KEYS}


def median_throughput(workdir: Path) -> float | None:
    """Median tokens/s over a run's logged rows, the first (it includes compilation) left out."""
    rates = [row["tokens_per_sec"] for row in read_metrics(workdir)[1:] if "tokens_per_sec" in row]
    return statistics.median(rates) if rates else None


def evaluate_checkpoint(workdir: Path, num_batches: int | None = None) -> tuple[dict, int]:
    """(metrics on the test split, at eval.lengths too, parameter count) of a run's latest
    checkpoint, as `fwpzoo eval` computes them; num_batches replaces eval.num_batches."""
    run, step, model_state = restore_run(workdir)
    eval_step = jax.jit(make_eval_step(run.graphdef))
    cfg = run.cfg.eval if num_batches is None else replace(run.cfg.eval, num_batches=num_batches)
    metrics = evaluate(eval_step, model_state, run.task, cfg, run.mesh, "test")
    size = sum(math.prod(x.shape) for x in jax.tree.leaves(model_state["params"]))
    return {"step": step, **metrics}, size


def execute(run: Run, workdir: Path) -> dict:
    """Trains (or resumes) and evaluates one run; its result, also written to result.json."""
    cfg = load(run.config, run.overrides)
    start, cpu_start = time.perf_counter(), time.process_time()
    train(cfg, workdir, progress=False)
    train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    test, size = evaluate_checkpoint(workdir, run.test_batches)
    result = {
        "name": run.name,
        "labels": run.labels,
        "test": test,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "total_seconds": time.perf_counter() - start,
        "tokens_per_sec": median_throughput(workdir),
        "num_params": size,
    }
    partial = workdir / f"{RESULT_FILE}.partial"
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.rename(workdir / RESULT_FILE)  # atomic: a result file is always complete
    return result


def run_sweep(runs: Sequence[Run], options: Options) -> list[dict]:
    """Every run's result, in order; finished runs are read back, the others trained (or, with
    report_only, left out)."""
    # Identical computations compile once per sweep: the eval step of a run's training and of its
    # test evaluation, and every run again when an interrupted sweep resumes.
    jax.config.update("jax_compilation_cache_dir", str(options.root.parent / ".jax_cache"))
    results = []
    bar = tqdm(runs, unit="run", disable=not options.progress, desc=options.name)
    for run in bar:
        bar.set_postfix_str(run.name)
        workdir = options.root / run.name
        done = workdir / RESULT_FILE
        if done.exists():
            results.append(json.loads(done.read_text()))
        elif not options.report_only:
            results.append(execute(run, workdir))
    if not results:
        raise ConfigError(f"no finished runs in {options.root}")
    return results


def write_records(records: list[dict], path: Path) -> None:
    for rec in records:
        if tuple(rec) != RECORD_KEYS:
            raise ValueError(f"a record with keys {list(rec)}; expected {list(RECORD_KEYS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def wall_time(results: Sequence[dict]) -> str:
    seconds = sum(r["total_seconds"] for r in results)
    return f"{seconds / 60:.1f} min ({len(results)} runs, summed over runs)"


def finish(
    options: Options,
    results: list[dict],
    to_records: Callable[[dict], list[dict]],
    report: Callable[[list[dict], list[dict], Options], str],
    extra_records: Sequence[dict] = (),
) -> list[dict]:
    """Records of all results (and extra ones) -> NAME.json; the experiment's report -> NAME.md
    (its plots beside it)."""
    records = [rec for result in results for rec in to_records(result)] + list(extra_records)
    write_records(records, options.out / f"{options.name}.json")
    write_page(options.out / f"{options.name}.md", report(results, records, options))
    return records


def command(options: Options) -> str:
    return f"fwpzoo experiment {options.name}" + " --quick" * options.quick


# ---------------------------------------------------------------------------------------------
# What a model config is, in record terms

SUM_RULE_CELLS = ("linear_attn", "gated_linear_attn")  # Hebbian writes; the others are delta


def feature_map_label(model) -> str | None:
    """The record spelling of an FWP layer's feature map: dpfp with nu 2 is dpfp2; identity None."""
    if model.feature_map == "identity":
        return None
    return f"dpfp{model.dpfp_nu}" if model.feature_map == "dpfp" else model.feature_map


def state_size(model, mixer: str, seq_len: int) -> int:
    """Numbers a layer keeps to process the next token: the fast weights H K V of an FWP or
    Mamba-2 layer, the keys and values of attention's cache at `seq_len`, an SSM's state."""
    H = model.num_heads
    K = model.key_dim or model.d_model // H
    V = model.value_dim or model.d_model // H
    if mixer == "attention":
        return seq_len * H * (K + V)
    if mixer == "ssm":
        return model.ssm_state_dim * (2 if model.ssm_complex else 1)
    if mixer == "fwp":
        K = feature_dim(model.feature_map, K, nu=model.dpfp_nu, num_features=model.favor_features)
    return H * K * V


def model_labels(cfg, seq_len: int | None = None) -> dict:
    """Record fields of a config's model (named by its first layer's mixer): model, cell, rule,
    feature_map, phi_dim, beta_range, state_size (per layer, at `seq_len` or data.seq_len)."""
    model = cfg.model
    mixer = model.mixers[0]
    size = state_size(model, mixer, seq_len or cfg.data.seq_len)
    if mixer == "attention":
        return {"model": "attention", "feature_map": "softmax", "state_size": size}
    if mixer == "ssm":
        return {"model": "ssm", "state_size": size}
    if mixer == "mamba2":
        H = model.num_heads
        K = model.key_dim or model.d_model // H
        return {
            "model": "mamba2",
            "cell": "gated_linear_attn",
            "rule": "sum",
            "phi_dim": K,
            "state_size": size,
        }
    K = model.key_dim or model.d_model // model.num_heads
    labels = {
        "model": model.cell,
        "cell": model.cell,
        "rule": "sum" if model.cell in SUM_RULE_CELLS else "delta",
        "feature_map": feature_map_label(model),
        "phi_dim": feature_dim(
            model.feature_map, K, nu=model.dpfp_nu, num_features=model.favor_features
        ),
        "state_size": size,
    }
    if model.cell not in SUM_RULE_CELLS:
        labels["beta_range"] = model.beta_range
    return labels
