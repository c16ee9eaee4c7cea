"""State tracking and length generalisation (Grazzi et al. 2025; Siems et al. 2025).

One-layer models (d_model 16, 4 heads, short conv) trained on sequences of lengths 3..40 and tested
at longer lengths (x): parity and arithmetic mod 3 without brackets for DeltaNet with beta in
(0, 1) and in (0, 2) and for a Mamba-2-style layer; the S3 word problem for DeltaProduct with
N = 1 and N = 2 Householder steps per token. Configs: configs/experiments/state_tracking/.
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

NAME = "state_tracking"
# config file -> (task label, model label)
RUNS = {
    "parity-delta_rule-beta01": ("parity", "delta_rule"),
    "parity-delta_rule-beta02": ("parity", "delta_rule"),
    "parity-mamba2": ("parity", "mamba2"),
    "mod3-delta_rule-beta01": ("mod3", "delta_rule"),
    "mod3-delta_rule-beta02": ("mod3", "delta_rule"),
    "mod3-mamba2": ("mod3", "mamba2"),
    "s3-delta_product-n1": ("s3", "delta_product_n1"),
    "s3-delta_product-n2": ("s3", "delta_product_n2"),
}
SEEDS = (0,)
CHANCE = {"parity": 1 / 2, "mod3": 1 / 3, "s3": 1 / 6}  # accuracy of a uniform guess
QUICK_RUNS, QUICK_SEEDS = ("parity-delta_rule-beta02", "s3-delta_product-n2"), (0,)
QUICK_OVERRIDES = (
    "train.steps=2",
    "train.warmup_steps=1",
    "eval.num_batches=1",
    "eval.lengths=[48]",
)


def make_runs(quick: bool) -> list[Run]:
    runs = []
    # seeds outermost, so a sweep cut short has every config at least once
    for seed in QUICK_SEEDS if quick else SEEDS:
        for name in QUICK_RUNS if quick else RUNS:
            task, model = RUNS[name]
            path = CONFIGS / NAME / f"{name}.yaml"
            overrides = (f"train.seed={seed}", *(QUICK_OVERRIDES if quick else ()))
            labels = {**model_labels(load(path, overrides)), "model": model, "task": task}
            runs.append(Run(f"{name}-seed{seed}", path, overrides, {**labels, "seed": seed}))
    return runs


def lengths(result: dict) -> list[int]:
    """The test lengths of a result: its "accuracy@L" metrics."""
    return sorted(int(key.split("@")[1]) for key in result["test"] if key.startswith("accuracy@"))


def to_records(result: dict) -> list[dict]:
    labels = {k: v for k, v in result["labels"].items() if k != "seed"}
    return [
        record(**labels, x=length, metric="accuracy", value=result["test"][f"accuracy@{length}"])
        for length in lengths(result)
    ]


def variant(result: dict) -> str:
    """How a run is named in tables and legends: its config's name without the task."""
    return result["name"].split("-", 1)[1].rsplit("-seed", 1)[0]


def plot(results: list[dict], path) -> None:
    tasks = list(dict.fromkeys(r["labels"]["task"] for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for result in (r for r in results if r["labels"]["task"] == task):
            xs = lengths(result)
            ys = [result["test"][f"accuracy@{x}"] for x in xs]
            ax.plot(xs, ys, "o-", label=f"{variant(result)} s{result['labels']['seed']}")
        ax.axvline(40, color="grey", lw=0.8, ls=":")  # the longest training length
        ax.axhline(CHANCE[task], color="grey", lw=0.8, ls="--")
        ax.set(title=task, xlabel="test length", ylabel="test accuracy", ylim=(0, 1.02))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: list[dict], records: list[dict], options) -> str:
    del records
    plot(results, options.out / f"{NAME}.png")
    xs = lengths(results[0])
    cfg = load(CONFIGS / NAME / f"{next(iter(RUNS))}.yaml")
    num_sequences = cfg.eval.batch_size * cfg.eval.num_batches
    rows = [
        [
            r["labels"]["task"],
            variant(r),
            r["labels"].get("beta_range"),
            r["labels"]["seed"],
            r["test"]["step"],
            r["test"]["accuracy"],
            *(r["test"][f"accuracy@{x}"] for x in xs),
        ]
        for r in results
    ]
    header = [
        "task",
        "model",
        "beta",
        "seed",
        "steps",
        "train lengths",
        *(f"length {x}" for x in xs),
    ]
    return f"""# State tracking: parity, arithmetic mod 3, S3

Command: `{command(options)}` (configs: `configs/experiments/{NAME}/*.yaml`).
Wall time here: {wall_time(results)}.
Test accuracy at the scored positions (parity and mod 3: the answer at the last token; S3: the
running product at every token) of {num_sequences} fresh sequences of the training lengths 3..40
and of exactly each length L.

{markdown_table(header, rows)}

![accuracy against length]({NAME}.png)

Dotted: the longest training length; dashed: chance (a uniform guess).
"""


def main(argv) -> int:
    options = parse_options(NAME, argv)
    results = run_sweep(make_runs(options.quick), options)
    finish(options, results, to_records, report)
    return 0
