"""Byte-level language modelling on the NLTK Gutenberg corpus, every architecture side by side.

Each architecture (configs/experiments/charlm/<model>.yaml, all about the same parameter count)
gets the same training time: a short probe run measures its steps per second, and the real run's
train.steps is set to fill TIME_BUDGET_S (the probe's answer is kept in the run's steps.json, so a
resumed sweep trains the same number of steps). The metric is bits per byte (bpc) on the test
split (each book's last 5%), beside gzip -9, bz2 -9 and xz -9e on the same test bytes.
"""

import bz2
import gzip
import json
import lzma
import math
import shutil
from dataclasses import replace
from pathlib import Path

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
    median_throughput,
    model_labels,
    parse_options,
    record,
    run_sweep,
    wall_time,
)
from fwpzoo.train import train
from fwpzoo.train.metrics import read_metrics

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
TIME_BUDGET_S = 120.0
PROBE_STEPS = 30
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
QUICK_BUDGET_S, QUICK_PROBE_STEPS = 0.5, 3
COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def probe_steps_per_second(config: Path, overrides: tuple[str, ...], workdir: Path, steps: int):
    """Steps per second of a short training run, compilation left out (first logged row)."""
    log_every = max(steps // 3, 1)
    cfg = load(config, (*overrides, f"train.steps={steps}", f"train.log_every={log_every}"))
    cfg = replace(cfg, checkpoint=replace(cfg.checkpoint, every=steps, async_save=False))
    shutil.rmtree(workdir, ignore_errors=True)
    train(cfg, workdir, progress=False)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    rate = median_throughput(workdir) / tokens_per_step
    shutil.rmtree(workdir)
    return rate


def budgeted_steps(model: str, overrides: tuple[str, ...], options: Options) -> int:
    """train.steps that fill the time budget for `model`, probed once and kept in steps.json."""
    stored = options.root / model / "steps.json"
    if stored.exists():
        return json.loads(stored.read_text())["steps"]
    budget, probe = (
        (QUICK_BUDGET_S, QUICK_PROBE_STEPS) if options.quick else (TIME_BUDGET_S, PROBE_STEPS)
    )
    rate = probe_steps_per_second(
        CONFIGS / NAME / f"{model}.yaml", overrides, options.root / "_probe" / model, probe
    )
    steps = max(int(budget * rate), 2)
    stored.parent.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps({"steps": steps, "probed_steps_per_sec": rate}) + "\n")
    return steps


def make_runs(options: Options) -> list[Run]:
    runs = []
    base = QUICK_OVERRIDES if options.quick else ()
    for model in tqdm(
        QUICK_MODELS if options.quick else MODELS,
        desc="probe",
        unit="model",
        disable=not options.progress,
    ):
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


def training_seconds(rows: list[dict], tokens_per_step: int) -> list[float]:
    """Cumulative seconds of training at each logged row, from the rows' measured throughput
    (evaluation and checkpointing time left out, as the loop leaves them out)."""
    seconds, previous, clock = [], 0, 0.0
    for row in rows:
        clock += (row["step"] - previous) * tokens_per_step / row["tokens_per_sec"]
        seconds.append(clock)
        previous = row["step"]
    return seconds


def plot_curves(results: list[dict], root: Path, path: Path) -> None:
    """Training bpc (lines) and validation bpc (dots) against seconds of training."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in results:
        workdir = root / result["name"]
        cfg = json.loads((workdir / "config.json").read_text())
        rows = read_metrics(workdir)
        seconds = training_seconds(rows, cfg["train"]["batch_size"] * cfg["data"]["seq_len"])
        (line,) = ax.plot(seconds, [r["loss"] / LN2 for r in rows], label=result["name"])
        valid = [
            (t, r["valid_bpc"]) for t, r in zip(seconds, rows, strict=True) if "valid_bpc" in r
        ]
        ax.plot(*zip(*valid, strict=True), "o", color=line.get_color())
    ax.set(xlabel="training seconds", ylabel="bits per byte", title="train (lines), valid (dots)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], records: list[dict], options: Options) -> str:
    plot_curves(results, options.root, options.out / f"{NAME}.png")
    rows = [
        [
            r["name"],
            r["num_params"],
            r["labels"]["state_size"],
            r["test"]["step"],
            r["train_seconds"],
            r["tokens_per_sec"],
            r["test"]["bpc"],
        ]
        for r in results
    ]
    rows += [
        [rec["model"], None, None, None, None, None, rec["value"]]
        for rec in records
        if rec["model"] in COMPRESSORS
    ]
    header = ["model", "parameters", "state size", "steps", "train s", "tokens/s", "test bpc"]
    return f"""# Byte-level language modelling on Gutenberg

Command: `{command(options)}` (configs: `configs/experiments/{NAME}/*.yaml`).
Wall time here: {wall_time(results)}.
Each model trains for about {TIME_BUDGET_S if not options.quick else QUICK_BUDGET_S:.0f} s
(steps set by a {PROBE_STEPS if not options.quick else QUICK_PROBE_STEPS}-step throughput probe);
tokens/s is the median over the run's logged intervals; state size is per layer.

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
