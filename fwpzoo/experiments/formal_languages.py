"""Formal-language recognition: linear transformers, DeltaNet, the Recurrent DeltaNet and the SRWM
(Irie, Csordas & Schmidhuber, EMNLP 2023) beside softmax attention and a diagonal SSM.

Eight languages in the character-prediction setup of Bhattamishra, Ahuja & Goyal (EMNLP 2020)
(fwpzoo.data.formal_languages): trained on strings of lengths 1..50 (bin 0) until a validation
set of lengths 51..100 (bin 1) is recognised without error or the step budget is spent, then
tested on fresh bin-0 and bin-1 sets. The metric is the fraction of strings whose every position
is predicted right (`sequence_accuracy`). Config: configs/experiments/formal_languages/base.yaml.
"""

from itertools import product

import matplotlib.pyplot as plt
import numpy as np

from fwpzoo.config import load
from fwpzoo.experiments import _common
from fwpzoo.experiments._common import (
    CONFIGS,
    Experiment,
    compute_seconds,
    group,
    markdown_table,
    progress_note,
    spread,
    spread_cell,
    sweep_command,
    train_point,
    versions_line,
)

NAME = "formal_languages"
TITLE = "Formal languages: recurrent and self-referential FWPs against linear transformers"
CONFIG = CONFIGS / NAME / "base.yaml"
# computed in this order, every seed of a pair before the next pair: the paper's headline
# findings (parity, (aa)*, then reset Dyck-1) first, so a sweep cut short has them
TASK_PAIRS = (
    ("parity", "aa_star"),
    ("reset_dyck_1", "dyck_1"),
    ("abab_star", "counter_2"),
    ("counter_3", "shuffle_2"),
)
TASKS = tuple(task for pair in TASK_PAIRS for task in pair)
FWP = ("model.mixers=[fwp]",)
# variant -> (record labels, overrides of the base config); the programmers and the linear
# transformer first within each task, the paper's headline comparison
MODELS = {
    "rdn": ({"model": "rdn"}, ("model.mixers=[rdn]",)),
    "srwm": ({"model": "srwm"}, ("model.mixers=[srwm]",)),
    "linear_attn": (
        {"model": "fwp", "cell": "linear_attn"},
        (*FWP, "model.cell=linear_attn", "model.feature_map=elu1", "model.qk_norm=sum"),
    ),
    "delta_rule-beta02": (
        {"model": "fwp", "cell": "delta_rule", "beta_range": "0,2"},
        (
            *FWP,
            "model.cell=delta_rule",
            "model.beta_range=0,2",
            "model.feature_map=identity",
            "model.qk_norm=l2",
        ),
    ),
    "delta_rule-beta01": (
        {"model": "fwp", "cell": "delta_rule", "beta_range": "0,1"},
        (
            *FWP,
            "model.cell=delta_rule",
            "model.beta_range=0,1",
            "model.feature_map=identity",
            "model.qk_norm=l2",
        ),
    ),
    "attention": ({"model": "attention"}, ("model.mixers=[attention]",)),
    "ssm": ({"model": "ssm"}, ("model.mixers=[ssm]",)),
}
SEEDS = (0, 1, 2)
QUICK_TASKS, QUICK_MODELS, QUICK_SEEDS = ("parity",), ("rdn", "srwm"), (0,)
QUICK_OVERRIDES = ("train.steps=2", "train.warmup_steps=1", "eval.every=2", "eval.num_batches=1")
TEST_BATCHES = 16  # 512 test strings per bin
KEYS = ("model", "cell", "beta_range", "task", "setting", "seed", "metric", "value")
BIN1 = "sequence_accuracy@100"
METRICS = {"sequence_accuracy": {"setting": "bin0"}, BIN1: {"setting": "bin1"}}
# Irie, Csordas & Schmidhuber 2023 (text of section 4): which models reach 100% on bin 1
PAPER = {
    ("parity", "linear_attn"): "fails",
    ("aa_star", "linear_attn"): "fails",
    ("parity", "rdn"): "100%",
    ("aa_star", "rdn"): "100%",
    ("parity", "srwm"): "100%",
    ("aa_star", "srwm"): "100%",
    ("reset_dyck_1", "linear_attn"): "fails",
    ("reset_dyck_1", "delta_rule-beta01"): "100%",
}


def make_points(options) -> list:
    pairs = (QUICK_TASKS,) if options.quick else TASK_PAIRS
    models = QUICK_MODELS if options.quick else tuple(MODELS)
    quick = QUICK_OVERRIDES if options.quick else ()
    points = []
    for tasks in pairs:
        for seed, task, variant in product(QUICK_SEEDS if options.quick else SEEDS, tasks, models):
            labels, overrides = MODELS[variant]
            overrides = (*overrides, f"data.language={task}", *quick)
            point = train_point(
                f"{task}-{variant}-s{seed}",
                CONFIG,
                overrides,
                {**labels, "task": task},
                METRICS,
                seed,
                TEST_BATCHES if not options.quick else 1,
            )
            points.append(point)
    return points


def variant(record) -> str:
    return record["point"].split("-", 1)[1].rsplit("-s", 1)[0]


def plot(cells: dict, tasks, variants, path) -> None:
    """A grid of bin-1 accuracy, tasks by models: the colour and the upper number the median over
    seeds, the lower numbers the min and max."""
    grid = np.full((len(variants), len(tasks)), np.nan)
    ranges = {}
    for (task, name), values in cells.items():
        middle, low, high = spread(values)
        grid[variants.index(name), tasks.index(task)] = middle
        ranges[variants.index(name), tasks.index(task)] = (low, high)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(tasks) + 2), 0.6 * len(variants) + 1.5))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(variants)), variants)
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            low, high = ranges[i, j]
            colour = "black" if value > 0.5 else "white"
            ax.text(j, i - 0.12, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
            text = f"{low:.2f}-{high:.2f}"
            ax.text(j, i + 0.22, text, ha="center", va="center", fontsize=6, color=colour)
    ax.set_title(
        "strings of lengths 51..100 recognised: median over seeds (min-max below)", fontsize=9
    )
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def steps_cell(values) -> str | None:
    """Where training ended: "median (min-max)" over seeds, in whole steps."""
    if not values:
        return None
    middle, low, high = spread(values)
    return f"{middle:.0f}" if low == high else f"{middle:.0f} ({low:.0f}-{high:.0f})"


def report(records: list[dict], points: list, options) -> str:
    records = [{**r, "variant": variant(r)} for r in records]
    seeds = len(QUICK_SEEDS if options.quick else SEEDS)
    tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
    variants = [v for v in MODELS if any(r["variant"] == v for r in records)]
    by_setting = group(records, ["task", "variant", "setting"])
    steps = group(
        [{**r, "value": r["steps"]} for r in records if r["setting"] == "bin1"], ["task", "variant"]
    )
    plot(
        {k[:2]: v for k, v in by_setting.items() if k[2] == "bin1"},
        tasks,
        variants,
        options.out / f"{NAME}.png",
    )
    rows = [
        [
            task,
            name,
            spread_cell(by_setting.get((task, name, "bin0")), seeds),
            spread_cell(by_setting.get((task, name, "bin1")), seeds),
            steps_cell(steps.get((task, name))),
            PAPER.get((task, name), "-"),
        ]
        for task in tasks
        for name in variants
        if (task, name, "bin1") in by_setting
    ]
    header = ["task", "model", "bin 0 test", "bin 1 test", "steps", "paper (bin 1)"]
    cfg = load(CONFIG, points[0].overrides)
    test_strings = points[0].test_batches * cfg.eval.batch_size
    return f"""# {TITLE}

Command: `{sweep_command(options)}` (config: `configs/experiments/{NAME}/base.yaml`, the models'
overrides in `fwpzoo/experiments/{NAME}.py`); each record in `{NAME}.json` names the command that
recomputes its point alone.
{progress_note(points, records, options)}
Compute here: {compute_seconds(records)}.

Each point trains a one-layer model (d_model {cfg.model.d_model}, {cfg.model.num_heads} heads, no
short convolution) on strings of lengths 1..50 for at most {cfg.train.steps} steps of
{cfg.train.batch_size} fresh strings, stopping at the first evaluation (every
{cfg.eval.every} steps) where all {cfg.eval.batch_size * cfg.eval.num_batches} validation strings of
lengths 51..100 are recognised. The table gives the fraction of {test_strings}
fresh test strings per bin whose every position is right (a string counts only if all are): the
median over {seeds} seeds, min-max in brackets; `steps` is where training ended.

Models: `linear_attn` is the linear transformer (sum rule, elu + 1 features, sum-normalised),
`delta_rule-beta01`/`-beta02` DeltaNet (L2-normalised keys, beta in (0, 1) or (0, 2)), `rdn` the
Recurrent DeltaNet and `srwm` the self-referential weight matrix (softmax features), `attention`
softmax attention with rotary positions, `ssm` the diagonal complex SSM (LRU).

{markdown_table(header, rows)}

![bin 1 accuracy, tasks by models]({NAME}.png)

The paper's column quotes only what its text states (Irie, Csordas & Schmidhuber 2023,
section 4): the linear transformer fails parity and (aa)* on the longer strings, the Recurrent
DeltaNet and the SRWM recognise both, and DeltaNet, unlike the linear transformer, recognises
reset Dyck-1. Its table's numbers are not copied here; "-" marks a cell the text does not state.

Software: {versions_line(records)}.
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report, title=TITLE)


def main(argv) -> int:
    return _common.main(EXPERIMENT, argv)
