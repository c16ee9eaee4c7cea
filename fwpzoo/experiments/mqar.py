"""Multi-query associative recall (Arora et al. 2024, "Zoology") across the architectures.

Two-layer models of each mixer are trained on MQAR with x key-value pairs per sequence and a
model width d_model; the metric is the accuracy at the query positions of held-out (test-split)
sequences, recorded with the layer's state size. Configs: configs/experiments/mqar/<model>.yaml.
"""

import matplotlib.pyplot as plt

from fwpzoo.config import load
from fwpzoo.experiments import _common
from fwpzoo.experiments._common import (
    CONFIGS,
    Experiment,
    compute_seconds,
    errorbars,
    group,
    markdown_table,
    model_labels,
    progress_note,
    spread_cell,
    sweep_command,
    train_point,
    versions_line,
)

NAME = "mqar"
KEYS = (
    "model",
    "cell",
    "rule",
    "beta_range",
    "task",
    "setting",
    "d_model",
    "num_heads",
    "vocab_size",
    "state_size",
    "x",
    "seed",
    "metric",
    "value",
)
MODELS = ("attention", "delta_rule", "gated_delta_rule", "linear_attn", "mamba2", "ssm")
# (d_model, pairs): pairs swept at widths 16 and 32, width swept at 8 pairs; in this order,
# models innermost, so a sweep cut short still compares every model at the points it reached
POINTS = ((16, 2), (16, 8), (32, 8), (32, 4))
SEEDS = (0, 1, 2)
QUICK_MODELS, QUICK_POINTS, QUICK_SEEDS = ("attention", "delta_rule"), ((16, 4),), (0,)
QUICK_OVERRIDES = ("train.steps=2", "train.warmup_steps=1", "eval.num_batches=1")


def make_points(options) -> list:
    models = QUICK_MODELS if options.quick else MODELS
    grid = QUICK_POINTS if options.quick else POINTS
    points = []
    for seed in QUICK_SEEDS if options.quick else SEEDS:
        for width, pairs in grid:
            for model in models:
                path = CONFIGS / NAME / f"{model}.yaml"
                overrides = (f"data.num_pairs={pairs}", f"model.d_model={width}")
                if model == "ssm":  # its state grows with the width too: 2 d_model numbers
                    overrides += (f"model.ssm_state_dim={width}",)
                overrides += QUICK_OVERRIDES if options.quick else ()
                cfg = load(path, overrides)
                labels = {
                    **model_labels(cfg),
                    "task": "mqar",
                    "d_model": width,
                    "num_heads": cfg.model.num_heads,
                    "vocab_size": cfg.data.vocab_size,
                    "x": pairs,
                }
                name = f"{model}-d{width}-n{pairs}-s{seed}"
                points.append(train_point(name, path, overrides, labels, {"accuracy": {}}, seed))
    return points


def plot(records: list[dict], path) -> None:
    """Accuracy against pairs, a panel per width; then against state size at the most pairs;
    medians over seeds with bars to the min and max."""
    widths = sorted({r["d_model"] for r in records})
    most_pairs = max(r["x"] for r in records)
    fig, axes = plt.subplots(1, len(widths) + 1, figsize=(3.6 * (len(widths) + 1), 3.4))
    for ax, width in zip(axes, widths, strict=False):
        pairs = sorted({r["x"] for r in records if r["d_model"] == width})
        ax.set(title=f"d_model {width}", xlabel="key-value pairs", ylabel="test accuracy")
        ax.set_xticks(pairs)
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        for ax, width in zip(axes, widths, strict=False):
            curve = group([r for r in mine if r["d_model"] == width], ["x"])
            errorbars(ax, {x: v for (x,), v in curve.items()})
        hardest = group([r for r in mine if r["x"] == most_pairs], ["state_size"])
        errorbars(axes[-1], {s: v for (s,), v in hardest.items()}, label=model)
    axes[-1].set(xscale="log", title=f"{most_pairs} pairs", xlabel="state size per layer")
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(records: list[dict], points: list, options) -> str:
    plot(records, options.out / f"{NAME}.png")
    seeds = len(QUICK_SEEDS if options.quick else SEEDS)
    cells = group(records, ["model", "d_model", "x"])
    sizes = {(r["model"], r["d_model"]): r["state_size"] for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    sections = []
    for width in sorted({r["d_model"] for r in records}):
        pairs = sorted({r["x"] for r in records if r["d_model"] == width})
        rows = [
            [
                model,
                sizes[model, width],
                *(spread_cell(cells.get((model, width, n)), seeds) for n in pairs),
            ]
            for model in models
            if (model, width) in sizes
        ]
        header = ["model", "state size", *(f"{n} pairs" for n in pairs)]
        sections.append(f"### d_model {width}\n\n{markdown_table(header, rows)}")
    steps = sorted({r["steps"] for r in records})
    return f"""# MQAR: multi-query associative recall

Command: `{sweep_command(options)}` (configs: `configs/experiments/{NAME}/*.yaml`); each record in
`{NAME}.json` names the command that recomputes its point alone.
{progress_note(points, records, options)}
Compute here: {compute_seconds(records)}.
Test accuracy at the query positions after {", ".join(map(str, steps))} training steps: the
median over {seeds} seeds (min-max in brackets); state size is per layer (attention: its
key-value cache at the training length).

![accuracy]({NAME}.png)

{chr(10).join(s + chr(10) for s in sections)}
Software: {versions_line(records)}.
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report)


def main(argv) -> int:
    return _common.main(EXPERIMENT, argv)
