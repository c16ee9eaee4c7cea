"""Deep fast weights against one-matrix memories at equal state size: MQAR and in-context linear
regression for the delta rule, the momentum delta rule, TTT-Linear, an MLP fast net by plain
gradient steps, and the Titans, ATLAS and LaCT presets, with the two ablations the papers' claims
call for (ATLAS's window of one token, LaCT's chunks of 16).

Every model has two layers, d_model 64 and two heads of K = V = 32, and about 1024 fast weights
per head (the MLPs' and SwiGLU's hidden widths chosen to match the delta rule's K V); the state
column adds what the optimiser keeps (momentum) and the window's past keys and values. Each is
trained on 64 tokens and tested at 64 and 128. Configs: configs/experiments/deep_memory/, one per
model; regression runs the same file with data.task=regression data.regression_dim=6.
"""

import math

from fwpzoo.cells.deep.inner import Inner
from fwpzoo.config import load
from fwpzoo.experiments import _sweep, _tuning
from fwpzoo.experiments._sweep import CONFIGS, Experiment, read_details, train_point
from fwpzoo.reports import errorbars, group, markdown_table, save_figure, spread_cell, subplots

NAME = "deep_memory"
TITLE = "Deep fast weights: MQAR and in-context regression at equal state size"
MODELS = (
    "delta_rule",
    "momentum_delta",
    "ttt_linear",
    "deep_mlp",
    "titans",
    "atlas",
    "atlas_w1",
    "lact",
    "lact_b16",
)
SEEDS = (0, 1, 2)
TASKS = {  # task -> (overrides, the metric recorded, whether higher is better)
    "mqar": ((), "accuracy", True),
    "regression": (("data.task=regression", "data.regression_dim=6"), "normalised_error", False),
}
QUICK_POINTS, QUICK_SEEDS = (("ttt_linear", "mqar"), ("atlas", "regression")), (0,)
KEYS = (
    "model",
    "task",
    "cell",
    "fast_net",
    "inner_optimizer",
    "inner_batch",
    "inner_window",
    "fast_weights",
    "state_size",
    "x",
    "seed",
    "metric",
    "value",
)


def memory_sizes(layer) -> dict:
    """fast_weights (the memory's parameters) and state_size (all the cell keeps: momentum and
    the window's past keys and values too), per layer, from a layer's ModelConfig."""
    H = layer.num_heads
    K = layer.key_dim or layer.d_model // H
    V = layer.value_dim or layer.d_model // H
    if layer.cell in ("ttt_linear", "deep"):
        inner = Inner(
            fast_net="linear" if layer.cell == "ttt_linear" else layer.fast_net,
            hidden=layer.fast_hidden,
            optimizer=layer.inner_optimizer,
            window=layer.inner_window,
        )
        count = lambda shapes: sum(math.prod(s) for s in shapes.values())  # noqa: E731
        weights, state = count(inner.shapes(K, V)), count(inner.state_shapes(K, V))
        if layer.cell == "ttt_linear":  # its bias b [V] beside W
            weights, state = weights + V, state + V
        return {"fast_weights": H * weights, "state_size": H * state}
    extra = 2 if layer.cell == "momentum_delta" else 1  # S and its momentum M
    return {"fast_weights": H * K * V, "state_size": extra * H * K * V}


def labels_of(model: str, task: str, cfg) -> dict:
    layer = cfg.model.layers()[0]
    deep = layer.cell == "deep"
    return {
        "model": model,
        "task": task,
        "cell": layer.cell,
        "fast_net": layer.fast_net if deep else "linear",
        # the one-matrix rules as the optimiser steps they are (docs/rules.md)
        "inner_optimizer": layer.inner_optimizer
        if deep
        else ("momentum" if layer.cell == "momentum_delta" else "sgd"),
        "inner_batch": layer.inner_batch,
        "inner_window": layer.inner_window,
        **memory_sizes(layer),
    }


def make_points(options) -> list:
    pairs = [(m, t) for m in MODELS for t in TASKS]
    points = []
    # seeds outermost, so a sweep cut short has every setting at least once
    for seed in QUICK_SEEDS if options.quick else SEEDS:
        for model, task in QUICK_POINTS if options.quick else pairs:
            path = CONFIGS / NAME / f"{model}.yaml"
            task_overrides, metric, _ = TASKS[task]
            overrides = (*task_overrides, *(_sweep.QUICK_OVERRIDES if options.quick else ()))
            cfg = load(path, overrides)
            labels = labels_of(model, task, cfg)
            length = cfg.data.seq_len
            metrics = {metric: {"x": length}}
            metrics |= {f"{metric}@{n}": {"x": n, "metric": metric} for n in cfg.eval.lengths}
            name = f"{task}-{model}-s{seed}"
            points.append(train_point(name, path, overrides, labels, metrics, seed))
    return points


def plot(records: list[dict], path) -> None:
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = subplots(1, len(tasks), figsize=(5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [r for r in records if r["task"] == task]
        models = list(dict.fromkeys(r["model"] for r in mine))
        for x in dict.fromkeys(r["x"] for r in mine):
            cells = group([r for r in mine if r["x"] == x], ["model"])
            curve = {models.index(m): values for (m,), values in cells.items()}
            errorbars(ax, curve, label=f"test length {x}", linestyle="none")
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=7)
        ax.set(title=task, ylabel=TASKS[task][1])
        ax.legend(fontsize=7)
    save_figure(fig, path)


def throughput(options, points: list, model: str, task: str) -> list[float]:
    """The recorded points' median training tokens/s (one per seed)."""
    rates = []
    for point in points:
        if (point.labels["model"], point.labels["task"]) != (model, task):
            continue
        path = options.points_dir / f"{point.name}.json"
        if path.exists():
            rate = read_details(options, point.name).get("tokens_per_sec")
            rates += [rate] if rate is not None else []
    return rates


def task_table(records: list[dict], points: list, options, task: str) -> str:
    seeds = len(QUICK_SEEDS if options.quick else SEEDS)
    mine = [r for r in records if r["task"] == task]
    lengths = sorted({r["x"] for r in mine})
    cells = group(mine, ["model", "x"])
    rows = []
    for model in dict.fromkeys(r["model"] for r in mine):
        first = next(r for r in mine if r["model"] == model)
        how = [first[k] for k in ("fast_net", "inner_optimizer", "inner_batch", "inner_window")]
        sizes = [first["fast_weights"], first["state_size"]]
        values = [spread_cell(cells.get((model, x)), seeds) for x in lengths]
        rate = spread_cell(throughput(options, points, model, task), seeds, decimals=0)
        rows.append([model, *how, *sizes, *values, rate])
    header = ["model", "fast net", "optimiser", "inner batch", "window", "fast weights"]
    header += ["state", *(f"length {x}" for x in lengths), "training tokens/s"]
    return markdown_table(header, rows, align="lllrrrr" + "r" * (len(lengths) + 1))


SAME_QUALITY = 0.01  # LaCT's "keeps quality": a median this close to the small chunks'


def claims(records: list[dict], points: list, options, cfg) -> str:
    """The papers' claims and what the recorded medians say (the models each compares), with
    the rule each verdict applies; where and why we differ is in the page's notes."""
    cells = group(records, ["model", "task", "x"])

    def median(model, task, x):
        values = cells.get((model, task, x))
        return sorted(values)[len(values) // 2] if values else None

    def compare(a, b, task, x):
        va, vb = median(a, task, x), median(b, task, x)
        if va is None or vb is None:
            return "pending"
        return f"{a} {va:.3f} vs {b} {vb:.3f}"

    def better(a, b, task, x) -> bool | None:
        """Whether `a`'s median beats `b`'s on `task` at length x; None while either is pending."""
        va, vb = median(a, task, x), median(b, task, x)
        if va is None or vb is None:
            return None
        return va > vb if TASKS[task][2] else va < vb

    def verdict(holds: list[bool | None]) -> str:
        if any(h is None for h in holds):
            return "pending"
        return "agrees" if all(holds) else "differs"

    def rate(model, task):
        rates = throughput(options, points, model, task)
        return sorted(rates)[len(rates) // 2] if rates else None

    lact_quality = [
        None
        if median("lact", t, 64) is None or median("lact_b16", t, 64) is None
        else abs(median("lact", t, 64) - median("lact_b16", t, 64)) <= SAME_QUALITY
        for t in TASKS
    ]
    lact_speed = [
        None
        if rate("lact", t) is None or rate("lact_b16", t) is None
        else rate("lact", t) > rate("lact_b16", t)
        for t in TASKS
    ]
    setting = (
        f"{len(cfg.model.mixers)} layers, d_model {cfg.model.d_model}, trained on"
        f" {cfg.data.seq_len} tokens for at most {cfg.train.steps} steps on a CPU, tested at"
        f" {cfg.data.seq_len} and {', '.join(str(x) for x in cfg.eval.lengths)}"
    )
    lines = [
        [
            "setting: the papers train models of hundreds of millions of parameters and more, on"
            " contexts of thousands of tokens",
            f"setting here: {setting}",
            "-",
            "-",
            "-",
        ],
        [
            "TTT (Sun et al. 2024): a deeper fast net (MLP) uses a longer context better than a "
            "linear one",
            "deep_mlp vs ttt_linear at twice the training length",
            "; ".join(compare("deep_mlp", "ttt_linear", t, 128) for t in TASKS),
            "deep_mlp's median better on both tasks",
            verdict([better("deep_mlp", "ttt_linear", t, 128) for t in TASKS]),
        ],
        [
            "ATLAS (Behrouz et al. 2025): the Omega rule's window helps recall",
            "atlas (window 4) vs atlas_w1 on MQAR",
            compare("atlas", "atlas_w1", "mqar", 64),
            "atlas's median higher",
            verdict([better("atlas", "atlas_w1", "mqar", 64)]),
        ],
        [
            "LaCT (Zhang et al. 2025): large chunks keep quality while raising throughput",
            "lact (chunk 64) vs lact_b16 (chunk 16); tokens/s in the tables",
            "; ".join(compare("lact", "lact_b16", t, 64) for t in TASKS),
            f"medians within {SAME_QUALITY} on both tasks, and more training tokens/s",
            verdict(lact_quality + lact_speed),
        ],
    ]
    header = ["claim", "comparison here", "ours (medians)"]
    return markdown_table([*header, "holds where (tolerance)", "agrees?"], lines)


def report(records: list[dict], points: list, options) -> str:
    figure = ""
    if records:  # a page of pending points has no figure yet
        plot(records, options.out / f"{NAME}.png")
        figure = f"![test metric per model]({NAME}.png)\n"
    configs = [load(p.config, p.overrides) for p in points]
    rates = sorted({cfg.train.learning_rate for cfg in configs})
    sequences = configs[0].eval.batch_size * configs[0].eval.num_batches
    sections = []
    for task in dict.fromkeys(r["task"] for r in records):
        metric, higher = TASKS[task][1], TASKS[task][2]
        better = "higher" if higher else "lower"
        sections.append(
            f"### {task}: test {metric} ({better} is better)\n\n"
            f"{task_table(records, points, options, task)}\n"
        )
    return f"""{_tuning.untuned_text(" / ".join(_tuning.rate_label(r) for r in rates))}

MQAR: 8 key-value pairs in 64 tokens, vocabulary 64; test accuracy at the queries. Regression:
y = w . x with a fresh w in {{-1, 0, 1}}^6 per sequence and x in {{-1, +1}}^6, one token each,
scored from the 6th pair on; normalised error = the squared error of the most likely number over
the mean y^2 (1: predicting 0). Medians over seeds (min-max in brackets) on {sequences} fresh
test sequences at the training length (64) and at 128. Fast weights and state: numbers per layer.

{chr(10).join(sections)}
{figure}
### The papers' claims beside ours

{claims(records, points, options, configs[0])}

Where this differs from the papers, and why: at this scale (the first row) a claim is tested
here only in its direction; the regression task is in tokens (x as one of 64 sign patterns, y an
integer), since every model here is a token model, where Garg et al. feed real vectors;
deep_mlp is TTT-MLP's inner loop without its LayerNorm and residual; LaCT steps once per token
inside its chunk (causal reads) and has no sliding-window attention beside it; ATLAS keeps its
window and Muon but not its polynomial feature map. TTT-Linear's inner loss puts a LayerNorm on
the fast net's output, as published (Sun et al. 2024, and flash-linear-attention's reference),
so it cannot see the scale of what the memory returns, which regression's y is carried in (the
notes measure it: scripts/deep_memory_probes.py ttt); every memory here starts from zero fast
weights where TTT learns its start weights. The deep presets' inner step sizes (beta_init), and
deep_mlp's decay start and query scale, are set so that their inner loops stay finite at
initialisation (each config says why, scripts/deep_memory_probes.py inner measures it), and
deep_mlp bounds its learned step below 2/16 during training too (beta_range 0,0.1). Every
memory has the same number of fast weights per head; what an optimiser keeps beside them
(momentum, the window's keys) is in the state column. Where and why the verdicts differ: the
notes.
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report, title=TITLE)
