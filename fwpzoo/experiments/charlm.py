"""Byte-level language modelling on the NLTK Gutenberg corpus, every architecture side by side.

Each architecture (configs/experiments/charlm/<model>.yaml, all about the same parameter count)
gets the same training time, counted in CPU seconds of the training process: a probe measures its
CPU seconds per step, and the run's train.steps is set to fill BUDGET_S (the answer is kept in
the run's steps.json, so a resumed sweep trains the same number of steps). The metric is bits per
byte (bpc) on the test split (each book's last 5%), beside gzip -9, bz2 -9 and xz -9e on the same
test bytes.
"""

import bz2
import gzip
import json
import lzma
import math
import time
from pathlib import Path

import jax
import matplotlib.pyplot as plt
from tqdm import tqdm

from fwpzoo.config import load
from fwpzoo.data.corpora import load_corpus
from fwpzoo.experiments._common import (
    CONFIGS,
    Options,
    Run,
    command,
    finish,
    markdown_table,
    model_labels,
    parse_options,
    record,
    run_sweep,
    wall_time,
)
from fwpzoo.train import make_train_step, prepare
from fwpzoo.train.metrics import read_metrics
from fwpzoo.train.sharding import shard_batch
from fwpzoo.train.state import init_train_state

NAME = "charlm"
MODELS = (
    "attention",
    "linear_attn",
    "gated_linear_attn",
    "delta_rule",
    "gated_delta_rule",
    "delta_product",
    "mamba2",
    "ssm",
)
LN2 = math.log(2)
BUDGET_S = 40.0  # CPU seconds of training per model
PROBE_STEPS = 5
WHOLE_SPLIT = 10**9  # more batches than any split has: text evaluation stops at the split's end
QUICK_MODELS = ("delta_rule", "attention")
QUICK_OVERRIDES = (
    "data.corpus=fixture",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.log_every=1",
    "eval.batch_size=4",
    "eval.num_batches=1",
)
QUICK_BUDGET_S, QUICK_PROBE_STEPS = 0.2, 2
COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def cpu_seconds_per_step(config: Path, overrides: tuple[str, ...], steps: int) -> float:
    """Process CPU seconds per training step, measured over `steps` steps after compilation.

    CPU time rather than wall time: on a machine shared with other jobs, wall time measures the
    neighbours as much as the model.
    """
    cfg = load(config, overrides)
    run = prepare(cfg)
    state = init_train_state(cfg, run.task.vocab_size, run.optimizer, run.mesh)
    train_step = jax.jit(make_train_step(run.graphdef, run.optimizer, grad_accum=1))
    batches = [
        shard_batch(run.task.train_batch(i, cfg.train.batch_size), run.mesh)
        for i in range(steps + 1)
    ]
    state, _ = jax.block_until_ready(train_step(state, batches[0]))  # compiles
    start = time.process_time()
    for batch in batches[1:]:
        state, _ = train_step(state, batch)
    jax.block_until_ready(state)
    return (time.process_time() - start) / steps


def budget_and_probe(options: Options) -> tuple[float, int]:
    """(CPU seconds of training per model, steps timed by the probe)."""
    return (QUICK_BUDGET_S, QUICK_PROBE_STEPS) if options.quick else (BUDGET_S, PROBE_STEPS)


def budgeted_steps(model: str, overrides: tuple[str, ...], options: Options) -> int:
    """train.steps that fill the CPU-time budget for `model`; the probe's measurement is kept in
    steps.json, so a resumed sweep trains the same number of steps without probing again."""
    budget, probe = budget_and_probe(options)
    stored = options.root / model / "steps.json"
    if not stored.exists():
        per_step = cpu_seconds_per_step(CONFIGS / NAME / f"{model}.yaml", overrides, probe)
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_text(json.dumps({"cpu_seconds_per_step": per_step}) + "\n")
    per_step = json.loads(stored.read_text())["cpu_seconds_per_step"]
    return max(int(budget / per_step), 2)


def make_runs(options: Options) -> list[Run]:
    runs = []
    base = QUICK_OVERRIDES if options.quick else ()
    for model in tqdm(
        QUICK_MODELS if options.quick else MODELS,
        desc="probe",
        unit="model",
        disable=not options.progress,
    ):
        if options.report_only and not (options.root / model / "steps.json").exists():
            continue  # never probed, so never trained
        path = CONFIGS / NAME / f"{model}.yaml"
        overrides = (*base, f"train.steps={budgeted_steps(model, base, options)}")
        labels = {**model_labels(load(path, overrides)), "model": model}
        runs.append(Run(model, path, overrides, labels, test_batches=WHOLE_SPLIT))
    return runs


def compressor_bpc(corpus: str, data_dir: str) -> dict[str, float]:
    """Bits per byte of each compressor on the corpus's test split."""
    test = load_corpus(corpus, data_dir)["test"].tobytes()
    return {name: 8 * len(compress(test)) / len(test) for name, compress in COMPRESSORS.items()}


def to_records(result: dict) -> list[dict]:
    labels = {**result["labels"], "task": "text"}
    return [record(**labels, metric="bpc", value=result["test"]["bpc"])]


def plot_curves(results: list[dict], root: Path, path: Path) -> None:
    """Training bpc (lines) and validation bpc (dots) against CPU seconds of training: the
    probed CPU seconds per step times the step, the axis on which the budgets are equal."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in results:
        workdir = root / result["name"]
        per_step = json.loads((workdir / "steps.json").read_text())["cpu_seconds_per_step"]
        rows = read_metrics(workdir)
        seconds = [row["step"] * per_step for row in rows]
        (line,) = ax.plot(seconds, [r["loss"] / LN2 for r in rows], label=result["name"])
        valid = [
            (t, r["valid_bpc"]) for t, r in zip(seconds, rows, strict=True) if "valid_bpc" in r
        ]
        ax.plot(*zip(*valid, strict=True), "o", color=line.get_color())
    ax.set(
        xlabel="training CPU seconds (probed per step)",
        ylabel="bits per byte",
        title="train (lines), valid (dots)",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], records: list[dict], options: Options) -> str:
    plot_curves(results, options.root, options.out / f"{NAME}.png")
    budget, probe = budget_and_probe(options)
    rows = [
        [
            r["name"],
            r["num_params"],
            r["labels"]["state_size"],
            r["test"]["step"],
            round(r["train_cpu_seconds"]),
            round(r["train_seconds"]),
            None if r["tokens_per_sec"] is None else round(r["tokens_per_sec"]),
            r["test"]["bpc"],
        ]
        for r in results
    ]
    rows += [
        [rec["model"], None, None, None, None, None, None, rec["value"]]
        for rec in records
        if rec["model"] in COMPRESSORS
    ]
    header = [
        "model",
        "parameters",
        "state size",
        "steps",
        "train CPU s",
        "train wall s",
        "tokens/s",
        "test bpc",
    ]
    return f"""# Byte-level language modelling on Gutenberg

Command: `{command(options)}` (configs: `configs/experiments/{NAME}/*.yaml`).
Wall time here: {wall_time(results)}.
Each model gets the same training time: {budget:g} CPU seconds of the training process, as
steps from a probe that times {probe} steps after compilation (CPU time, since this machine is
shared and wall time also measures the neighbours). "train CPU s" and "train wall s" are what
the whole run then took, compilation and checkpoints included; tokens/s is the median over the
run's logged intervals in wall time. State size is per layer.

{markdown_table(header, rows)}

![loss curves]({NAME}.png)
"""


def main(argv) -> int:
    options = parse_options(NAME, argv)
    runs = make_runs(options)
    results = run_sweep(runs, options)
    cfg = load(runs[0].config, runs[0].overrides)
    compressors = [
        record(model=name, task="text", metric="bpc", value=value)
        for name, value in compressor_bpc(cfg.data.corpus, cfg.data.data_dir).items()
    ]
    finish(options, results, to_records, report, extra_records=compressors)
    return 0
