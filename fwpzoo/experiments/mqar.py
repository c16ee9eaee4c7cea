"""Multi-query associative recall (Arora et al. 2024, "Zoology") across the architectures.

Two-layer models of each mixer are trained on MQAR with x key-value pairs per sequence and a
model width d_model; the metric is the accuracy at the query positions of held-out (test-split)
sequences, recorded with the layer's state size. Configs: configs/experiments/mqar/<model>.yaml.
"""

import matplotlib.pyplot as plt

from fwpzoo.config import load
from fwpzoo.experiments._common import (
    CONFIGS,
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

NAME = "mqar"
MODELS = ("attention", "delta_rule", "gated_delta_rule", "linear_attn", "mamba2", "ssm")
# (d_model, pairs): pairs swept at widths 16 and 32, width swept at 8 pairs; in this order,
# models innermost, so a sweep cut short still compares every model at the points it reached
POINTS = ((16, 2), (16, 8), (32, 8), (32, 4))
QUICK_MODELS, QUICK_POINTS = ("attention", "delta_rule"), ((16, 4),)
QUICK_OVERRIDES = ("train.steps=2", "train.warmup_steps=1", "eval.num_batches=1")


def make_runs(quick: bool) -> list[Run]:
    models = QUICK_MODELS if quick else MODELS
    points = QUICK_POINTS if quick else POINTS
    grid = [(model, pairs, width) for width, pairs in points for model in models]
    runs = []
    for model, pairs, width in grid:
        path = CONFIGS / NAME / f"{model}.yaml"
        overrides = (f"data.num_pairs={pairs}", f"model.d_model={width}")
        if model == "ssm":  # its state grows with the width too: 2 d_model numbers (complex)
            overrides += (f"model.ssm_state_dim={width}",)
        overrides += QUICK_OVERRIDES if quick else ()
        labels = {**model_labels(load(path, overrides)), "task": "mqar", "x": pairs}
        runs.append(Run(f"{model}-d{width}-n{pairs}", path, overrides, {**labels, "width": width}))
    return runs


def to_records(result: dict) -> list[dict]:
    labels = {k: v for k, v in result["labels"].items() if k != "width"}
    return [record(**labels, metric="accuracy", value=result["test"]["accuracy"])]


def curve(results: list[dict], x_key: str) -> tuple[list, list]:
    """(xs, accuracies) of some results, sorted by the label x_key."""
    points = sorted((r["labels"][x_key], r["test"]["accuracy"]) for r in results)
    return [p[0] for p in points], [p[1] for p in points]


def plot(results: list[dict], path) -> None:
    """Accuracy against pairs, a panel per width; then against state size at the most pairs."""
    widths = sorted({r["labels"]["width"] for r in results})
    most_pairs = max(r["labels"]["x"] for r in results)
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(3.6 * (len(widths) + 1), 3.4))
    for ax, width in zip(axes, widths, strict=False):
        pairs = sorted({r["labels"]["x"] for r in results if r["labels"]["width"] == width})
        ax.set(title=f"d_model {width}", xlabel="key-value pairs", ylabel="test accuracy")
        ax.set_xticks(pairs)
    for model in dict.fromkeys(r["labels"]["model"] for r in results):
        mine = [r for r in results if r["labels"]["model"] == model]
        for ax, width in zip(axes, widths, strict=False):
            ax.plot(*curve([r for r in mine if r["labels"]["width"] == width], "x"), "o-")
        hardest = [r for r in mine if r["labels"]["x"] == most_pairs]
        axes[-1].plot(*curve(hardest, "state_size"), "o-", label=model)
    axes[-1].set(xscale="log", title=f"{most_pairs} pairs", xlabel="state size per layer")
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], records: list[dict], options) -> str:
    del records
    plot(results, options.out / f"{NAME}.png")
    models = list(dict.fromkeys(r["labels"]["model"] for r in results))
    by_key = {(r["labels"]["model"], r["labels"]["width"], r["labels"]["x"]): r for r in results}
    sections = []
    for width in sorted({r["labels"]["width"] for r in results}):
        pairs = sorted({r["labels"]["x"] for r in results if r["labels"]["width"] == width})
        rows = []
        for model in models:
            row_results = [by_key.get((model, width, n)) for n in pairs]
            done = [r for r in row_results if r]
            if done:
                accuracies = [r["test"]["accuracy"] if r else None for r in row_results]
                rows.append([model, done[0]["labels"]["state_size"], *accuracies])
        header = ["model", "state size", *(f"{n} pairs" for n in pairs)]
        sections.append(f"### d_model {width}\n\n{markdown_table(header, rows)}")
    first = results[0]
    return f"""# MQAR: multi-query associative recall

Command: `{command(options)}` (configs: `configs/experiments/{NAME}/*.yaml`).
Wall time here: {wall_time(results)}.
Test accuracy at the query positions, {first["test"]["step"]} training steps per run; state size
is per layer (attention: its key-value cache at the training length).

![accuracy]({NAME}.png)

{chr(10).join(s + chr(10) for s in sections)}
"""


def main(argv) -> int:
    options = parse_options(NAME, argv)
    results = run_sweep(make_runs(options.quick), options)
    finish(options, results, to_records, report)
    return 0
