"""Multi-query associative recall (Arora et al. 2024, "Zoology") across the architectures.

Two-layer models of each mixer (d_model 64) are trained on MQAR with a vocabulary of 256 and x
key-value pairs in 64 tokens, at 16, 8 and 4 heads (key dim 4, 8, 16 per head, so fast weights of
64 x key dim numbers per layer); the metric is the accuracy at the query positions of held-out
(test-split) sequences, recorded with the layer's state size. Each run trains until its
validation accuracy reaches 0.99 or for 4000 steps, so a slow learner is not cut short where a
fast one has converged. A re-binding study asks, at one
point, for values that were overwritten mid-sequence (every key bound twice), a decay init study
trains the gated models from Mamba-2's own init at one point, and a write strength study starts
the delta rule's beta low at key dim 4, where from its default start it stays at chance.
Configs: configs/experiments/mqar/<model>.yaml.
"""

import functools
import math

from fwpzoo.config import load
from fwpzoo.experiments import _sweep, _tuning
from fwpzoo.experiments._sweep import (
    CONFIGS,
    Experiment,
    model_labels,
    train_point,
)
from fwpzoo.reports import (
    errorbars,
    group,
    markdown_table,
    medians,
    save_figure,
    signed,
    spread_cell,
    subplots,
)

NAME = "mqar"
TITLE = "MQAR: multi-query associative recall"
KEYS = (
    "model",
    "cell",
    "rule",
    "decay_init",
    "beta_init",
    "learning_rate",
    "budget",
    "task",
    "rebinds",
    "d_model",
    "num_heads",
    "key_dim",
    "vocab_size",
    "state_size",
    "x",
    "seed",
    "metric",
    "value",
)
MODELS = ("attention", "delta_rule", "linear_attn", "gated_delta_rule", "mamba2")
GATED = ("gated_delta_rule", "mamba2")
# num_heads at d_model 64 (key dim per head 8, 4, 16: the fast weights hold 64 x key dim numbers
# per layer) -> the pairs swept at it (16 pairs fill the 64 tokens; why not 4 pairs: the page's
# notes, "Budget"); key dim 8 first, where the pairs are once and twice the key dim; at key dim 4
# they reach 4x
GRID = {8: (8, 16), 16: (8, 16), 4: (8, 16)}
# two seeds, as for every point that costs more than 10 CPU-minutes; attention, which stops early
# on its budget, gets a third where it does (the page's notes, "The budget")
SEEDS = (0, 1)
ATTENTION_SEEDS = (0, 1, 2)
# the decay init study: Mamba-2's own init against the grid's long-memory one, at one point
LONG_DECAY = "long"  # the configs': A in [1, 2], dt in [0.001, 0.005], alpha in [0.99, 0.999]
MAMBA2_DECAY = ("model.decay_a_range=[1,16]", "model.decay_dt_range=[0.001,0.1]")
STUDY_POINT = (8, 16)  # (num_heads, pairs): key dim 8, twice as many pairs
# the tuning protocol's deciding point: key dim 8 with 16 pairs, where the sum and delta rules
# are compared at equal state and neither is at chance or at 1.0
TUNE_POINT = STUDY_POINT
TUNE_ORDER = ("delta_rule", "linear_attn", "gated_delta_rule", "mamba2", "attention")
# the write strength study: the delta rules with beta starting at 0.1 at key dim 4 (16 heads),
# where each later token erases about beta / 4 of a pair along its key, so that as much of a pair
# is left at its query as from the default start at key dim 16 (the page's notes, "Why the delta
# rule stays at chance at key dim 4")
LOW_BETA = 0.1
BETA_HEADS, BETA_MODELS = 16, ("delta_rule", "gated_delta_rule")
# the re-binding study: (num_heads, pairs, rebinds) at key dim 16, where 8 pairs fit the fast
# weights without interference, every key bound a second time; beside the plain point
REBIND_POINT = (4, 8, 8)
# extended to key dims 8 and 16 with 8 and 16 pairs, every key re-bound, three seeds; 16 pairs
# re-bound need 4 * 16 + 2 * 16 - 1 = 95 tokens, so those sequences are 96 long (their plain twins
# in the grid keep 64: the same pairs and queries, without the second bindings)
REBIND_GRID = ((4, 8), (8, 8), (8, 16), (4, 16))
REBIND_SEEDS = (0, 1, 2)
REBIND_LONG_SEQ = 96
# a longer budget at key dim 4 for the models whose loss had not levelled off at step 4000 (the
# page's notes): (model, beta init) at 16 heads, 16 pairs, two seeds
LONG_STEPS = 12000
LONG_MODELS = (("delta_rule", None), ("linear_attn", None), ("delta_rule", LOW_BETA))
# attention learns to pick the later of two bindings of a key late (the page's notes, "Re-binding"),
# so at the re-binding points it trains up to 12000 steps, still stopping at validation accuracy
# 0.99
REBIND_ATTENTION = ("train.steps=12000",)
# with 16 heads (key dim 4) attention runs its 4000 steps like the fixed-state models, with their
# two seeds: a longer budget does not change what it learns there (the page's notes)
NARROW_HEADS = 16
QUICK_MODELS, QUICK_GRID, QUICK_SEEDS = ("attention", "delta_rule"), {2: (4,)}, (0,)
QUICK_REBIND_MODEL, QUICK_REBIND_POINT = "delta_rule", (2, 2, 2)
QUICK_OVERRIDES = (
    *_sweep.QUICK_OVERRIDES,
    "data.seq_len=16",
    "data.vocab_size=32",
    "model.d_model=16",
)


def mqar_point(
    model, heads, pairs, seed, overrides=(), decay=None, rebinds=0, beta=None, rate=None, steps=None
) -> object:
    """One seed of one model at (num_heads, pairs), with `rebinds` keys bound again; `decay`
    names a decay init override, `beta` is where the write strength starts, `rate` the learning
    rate (None: the config's)."""
    path = CONFIGS / NAME / f"{model}.yaml"
    rebind = (f"data.rebinds={rebinds}",) if rebinds else ()
    beta_init = (f"model.beta_init={beta}",) if beta is not None else ()
    learning_rate = (_tuning.rate_override(rate),) if rate is not None else ()
    budget = (f"train.steps={steps}",) if steps is not None else ()
    overrides = (
        f"data.num_pairs={pairs}",
        f"model.num_heads={heads}",
        *rebind,
        *rebind_length(pairs, rebinds),
        *beta_init,
        *learning_rate,
        *budget,
        *overrides,
    )
    cfg = load(path, overrides)
    labels = {
        **model_labels(cfg),
        "decay_init": (decay or LONG_DECAY) if model in GATED else None,
        "beta_init": cfg.model.beta_init,
        "learning_rate": rate,
        "budget": steps,
        "task": "mqar",
        "rebinds": rebinds,
        "d_model": cfg.model.d_model,
        "num_heads": heads,
        "key_dim": cfg.model.d_model // heads,
        "vocab_size": cfg.data.vocab_size,
        "x": pairs,
    }
    variant = (
        (f"-lr{_tuning.rate_label(rate)}" if rate is not None else "")
        + (f"-steps{steps}" if steps is not None else "")
        + f"-{decay}_init" * bool(decay)
        + f"-beta{beta}_init" * (beta is not None)
        + f"-r{rebinds}" * bool(rebinds)
    )
    name = f"{model}{variant}-h{heads}-n{pairs}-s{seed}"
    return train_point(name, path, overrides, labels, {"accuracy": {}}, seed)


def make_points(options) -> list:
    """Seed by seed, the whole grid, models innermost: a sweep cut short has every setting on
    its first seed before it spends time on a second, and compares every model where it got to.
    Within a seed: key dim 8 (where the pairs straddle it), the re-binding study beside its plain
    point, key dim 4 (pairs up to 4x), the rest of key dim 16; then the decay init study and the
    write strength study. Last, attention's third seed on the grid."""
    if options.quick:
        plain = [
            mqar_point(m, h, n, s, QUICK_OVERRIDES)
            for s in QUICK_SEEDS
            for h, grid in QUICK_GRID.items()
            for n in grid
            for m in QUICK_MODELS
        ]
        heads, pairs, rebinds = QUICK_REBIND_POINT
        rebound = mqar_point(QUICK_REBIND_MODEL, heads, pairs, 0, QUICK_OVERRIDES, rebinds=rebinds)
        return [*plain, rebound]
    (first_heads, first_grid), *rest = GRID.items()
    heads, pairs, r = REBIND_POINT
    points = [*tuning_points(), *retuned_points(options), *long_points(SEEDS[:1])]
    points += [
        mqar_point(m, h, n, s, rebind_budget(m), rebinds=n)
        for s in REBIND_SEEDS
        for h, n in REBIND_GRID
        for m in MODELS
    ]
    points += long_points(SEEDS[1:])
    for s in SEEDS:
        points += [mqar_point(m, first_heads, n, s) for n in first_grid for m in MODELS]
        points += [mqar_point(m, heads, pairs, s) for m in MODELS]
        points += [mqar_point(m, heads, pairs, s, rebind_budget(m), rebinds=r) for m in MODELS]
        for grid_heads, grid in rest:
            points += [mqar_point(m, grid_heads, n, s) for n in grid for m in MODELS]
        points += [mqar_point(m, *STUDY_POINT, s, MAMBA2_DECAY, "mamba2") for m in GATED]
        points += [
            mqar_point(m, BETA_HEADS, n, s, beta=LOW_BETA)
            for n in GRID[BETA_HEADS]
            for m in BETA_MODELS
        ]
    points += [
        mqar_point("attention", grid_heads, n, s)
        for grid_heads, grid in GRID.items()
        for s in ATTENTION_SEEDS[len(SEEDS) : planned_seeds("attention", grid_heads, 0, options)]
        for n in grid
    ]
    return list({point.name: point for point in points}.values())  # each point where first listed


@functools.cache  # a config file read once per process
def config_rate(model: str) -> float:
    return load(CONFIGS / NAME / f"{model}.yaml").train.learning_rate


def tuning_points() -> list:
    """The learning-rate grid at the deciding point, seed 0, every model (the rate its config
    already has is the grid's own point); the delta and sum rules first, the finding at stake."""
    heads, pairs = TUNE_POINT
    return [
        mqar_point(m, heads, pairs, _tuning.TUNING_SEED, rate=rate)
        for m in TUNE_ORDER
        for rate in _tuning.other_rates(config_rate(m))
    ]


def tuned_rates(options) -> dict:
    """{model: its best rate at the deciding point}, for the models whose every rate is recorded."""
    heads, pairs = TUNE_POINT
    seed = _tuning.TUNING_SEED
    rates = {}
    for m in TUNE_ORDER:
        best = _tuning.tuned_rate(
            options,
            lambda r, m=m: mqar_point(m, heads, pairs, seed, rate=r).name,
            config_rate(m),
            "accuracy",
        )
        if best is not None:
            rates[m] = best
    return rates


def retuned_points(options) -> list:
    """A model whose best rate is not its config's, at that rate on every seed of the compared
    points (the deciding key dim, both pair counts)."""
    heads, _ = TUNE_POINT
    return [
        mqar_point(m, heads, n, s, rate=rate)
        for m, rate in tuned_rates(options).items()
        if not math.isclose(rate, config_rate(m))
        for n in GRID[heads]
        for s in range(planned_seeds(m, heads, 0, options))
    ]


def rebind_budget(model: str) -> tuple[str, ...]:
    return REBIND_ATTENTION if model == "attention" else ()


def rebind_length(pairs: int, rebinds: int) -> tuple[str, ...]:
    """The longer sequence re-binding needs where the grid's 64 tokens cannot hold it."""
    return (f"data.seq_len={REBIND_LONG_SEQ}",) if 4 * pairs + 2 * rebinds - 1 > 64 else ()


def long_points(seeds) -> list:
    """The longer budget at key dim 4 with 16 pairs."""
    return [
        mqar_point(m, BETA_HEADS, 16, s, beta=beta, steps=LONG_STEPS)
        for s in seeds
        for m, beta in LONG_MODELS
    ]


def planned_seeds(model: str, heads: int, rebinds: int, options) -> int:
    """How many seeds a cell of the page waits for."""
    if options.quick:
        return len(QUICK_SEEDS)
    if rebinds:
        return len(REBIND_SEEDS)
    third = model == "attention" and heads != NARROW_HEADS
    return len(ATTENTION_SEEDS if third else SEEDS)


def plot(records: list[dict], path) -> None:
    """Accuracy against pairs, a panel per key dim; then against state size at the most pairs;
    medians over seeds with bars to the min and max."""
    key_dims = sorted({r["key_dim"] for r in records})
    most_pairs = max(r["x"] for r in records)
    fig, axes = subplots(1, len(key_dims) + 1, figsize=(3.6 * (len(key_dims) + 1), 3.4))
    for ax, key_dim in zip(axes, key_dims, strict=False):
        pairs = sorted({r["x"] for r in records if r["key_dim"] == key_dim})
        ax.set(title=f"key dim {key_dim} per head", xlabel="key-value pairs", ylabel="accuracy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(n) for n in pairs])
    for i, model in enumerate(dict.fromkeys(r["model"] for r in records)):
        mine = [r for r in records if r["model"] == model]
        for ax, key_dim in zip(axes, key_dims, strict=False):
            curve = group([r for r in mine if r["key_dim"] == key_dim], ["x"])
            errorbars(ax, {x: v for (x,), v in curve.items()}, color=f"C{i}")
        hardest = [r for r in mine if r["x"] == most_pairs]
        if model != "attention":
            curve = group(hardest, ["state_size"])
            errorbars(axes[-1], {s: v for (s,), v in curve.items()}, label=model, color=f"C{i}")
            continue
        # attention's cache is the same size at every head setting: one marker per setting,
        # spread sideways, so three settings do not read as one bar of seed spread
        markers = dict(zip(sorted({r["key_dim"] for r in hardest}), "^so", strict=False))
        for (key_dim, size), values in group(hardest, ["key_dim", "state_size"]).items():
            shift = 1.12 ** (list(markers).index(key_dim) - 1)
            errorbars(
                axes[-1],
                {size * shift: values},
                label=f"attention, key dim {key_dim}",
                color=f"C{i}",
                marker=markers[key_dim],
                markersize=6,
            )
    axes[-1].set(xscale="log", title=f"{most_pairs} pairs", xlabel="state size per layer")
    sizes = sorted({r["state_size"] for r in records if r["x"] == most_pairs})
    axes[-1].set_xticks(sizes, [str(size) for size in sizes])  # log scale's minor labels collide
    axes[-1].minorticks_off()
    axes[-1].legend(fontsize=7)
    for ax in axes:
        ax.set_ylim(-0.02, 1.02)
    save_figure(fig, path)


def grid_tables(records: list[dict], options) -> str:
    """A table per key dim: a row per model, a column per pairs count."""
    cells = group(records, ["model", "key_dim", "x"])
    sizes = {(r["model"], r["key_dim"]): r["state_size"] for r in records}
    models = list(dict.fromkeys(r["model"] for r in records))
    sections = []
    for key_dim in sorted({r["key_dim"] for r in records}):
        pairs = sorted({r["x"] for r in records if r["key_dim"] == key_dim})
        heads = next(r["num_heads"] for r in records if r["key_dim"] == key_dim)
        rows = [
            [
                model,
                sizes[model, key_dim],
                *(
                    spread_cell(
                        cells.get((model, key_dim, n)), planned_seeds(model, heads, 0, options)
                    )
                    for n in pairs
                ),
            ]
            for model in models
            if (model, key_dim) in sizes
        ]
        header = ["model", "state size", *(f"{n} pairs" for n in pairs)]
        title = f"### key dim {key_dim} per head ({heads} heads)"
        sections.append(f"{title}\n\n{markdown_table(header, rows)}")
    return "\n\n".join(sections)


def rebind_settings(options) -> list[tuple[int, int]]:
    """(num_heads, pairs) of the re-binding study, every key re-bound at each."""
    if options.quick:
        heads, pairs, _ = QUICK_REBIND_POINT
        return [(heads, pairs)]
    return sorted(REBIND_GRID, key=lambda setting: (-setting[0], setting[1]))


def rebind_table(records: list[dict], options) -> str:
    """A row per model, for each re-binding setting the plain point beside every key re-bound."""
    settings = rebind_settings(options)
    cells = group(records, ["model", "num_heads", "x", "rebinds"])
    models = [m for m in MODELS + QUICK_MODELS if any(r["model"] == m for r in records)]
    rows = [
        [
            m,
            *(
                spread_cell(cells.get((m, h, n, r)), planned_seeds(m, h, r, options))
                for h, n in settings
                for r in (0, n)
            ),
        ]
        for m in dict.fromkeys(models)
        if any((m, h, n, n) in cells for h, n in settings)
    ]
    header = ["model"]
    for heads, pairs in settings:
        key_dim = 64 // heads if not options.quick else None
        where = f"key dim {key_dim}, {pairs} pairs" if key_dim else f"{pairs} pairs"
        header += [f"{where}: plain", f"{where}: all re-bound"]
    return markdown_table(header, rows) if rows else "No point of the study is recorded yet."


def plot_rebinds(records: list[dict], options, path) -> None:
    """Accuracy with every key re-bound (solid) and plain (dotted) against pairs, a panel per
    key dim; medians over seeds with bars to the min and max."""
    settings = {(r["key_dim"], r["x"]) for r in records if r["rebinds"]}
    if not settings:
        return
    key_dims = sorted({key_dim for key_dim, _ in settings})
    fig, axes = subplots(1, len(key_dims), figsize=(4 * len(key_dims), 3.4), squeeze=False)
    for ax, key_dim in zip(axes[0], key_dims, strict=True):
        pairs = sorted({n for k, n in settings if k == key_dim})
        ax.set(title=f"key dim {key_dim}: every key re-bound", xlabel="pairs", ylabel="accuracy")
        ax.set_xscale("log", base=2)
        ax.set_xticks(pairs, [str(n) for n in pairs])
        ax.set_ylim(-0.02, 1.02)
        for i, model in enumerate(MODELS):
            mine = [r for r in records if r["model"] == model and r["key_dim"] == key_dim]
            for rebound, style in ((True, "-"), (False, ":")):
                curve = {
                    n: [r["value"] for r in mine if r["x"] == n and bool(r["rebinds"]) == rebound]
                    for n in pairs
                }
                label = model if rebound else None
                errorbars(
                    ax, {n: v for n, v in curve.items() if v}, color=f"C{i}", ls=style, label=label
                )
    if axes[0][-1].get_legend_handles_labels()[1]:
        axes[0][-1].legend(fontsize=7)
    save_figure(fig, path)


def long_table(records: list[dict], options) -> str:
    """At key dim 4 with 16 pairs: each model of the longer-budget study at the grid's 4000
    steps (its grid or write strength point) beside LONG_STEPS."""
    rows = []
    for model, beta in LONG_MODELS:
        here = [
            r
            for r in records
            if (r["model"], r["beta_init"], r["num_heads"], r["x"]) == (model, beta, BETA_HEADS, 16)
            and r["learning_rate"] is None
            and not r["rebinds"]
        ]
        by_budget = group(here, ["budget"])
        start = "about 0.5 (no bias)" if beta is None else f"{beta:g}"
        rows.append(
            [
                model,
                start if model != "linear_attn" else "-",
                *(spread_cell(by_budget.get((b,)), len(SEEDS)) for b in (None, LONG_STEPS)),
            ]
        )
    header = ["model", "beta at init", "4000 steps", f"{LONG_STEPS} steps"]
    return markdown_table(header, rows)


def beta_table(records: list[dict], options) -> str:
    """At key dim 4: a row per (model, where beta starts), a column per pairs count; the grid's
    points are the default start."""
    here = [r for r in records if r["num_heads"] == BETA_HEADS and r["model"] in BETA_MODELS]
    if not any(r["beta_init"] is not None for r in here):
        return "No point of the study is recorded yet."
    cells = group(here, ["model", "beta_init", "x"])
    pairs = sorted({r["x"] for r in here})
    rows = [
        [
            model,
            "about 0.5 (no bias)" if beta is None else f"{beta:g}",
            *(
                spread_cell(
                    cells.get((model, beta, n)), planned_seeds(model, BETA_HEADS, 0, options)
                )
                for n in pairs
            ),
        ]
        for model, beta in sorted(
            {(r["model"], r["beta_init"]) for r in here},
            key=lambda row: (BETA_MODELS.index(row[0]), row[1] is not None, row[1]),
        )
    ]
    header = ["model", "beta at init", *(f"{n} pairs" for n in pairs)]
    return markdown_table(header, rows)


def tuning_table(records: list[dict], options) -> str:
    """At the deciding point, seed 0: a row per model, a column per rate of the grid, its best
    rate, and where that is not its config's, the key dim 8 points rerun at it."""
    heads, pairs = TUNE_POINT
    here = [
        r
        for r in records
        if (r["num_heads"], r["x"], r["seed"]) == (heads, pairs, _tuning.TUNING_SEED)
        and not r["rebinds"]
        and r["beta_init"] is None
        and r["decay_init"] in (None, LONG_DECAY)
    ]
    best = tuned_rates(options)
    rows = []
    for m in TUNE_ORDER:
        own = config_rate(m)
        values = {r["learning_rate"] or own: r["value"] for r in here if r["model"] == m}
        retuned = m in best and not math.isclose(best[m], own)
        rerun = group(
            [r for r in records if r["model"] == m and retuned and r["learning_rate"] == best[m]],
            ["x"],
        )
        rows.append(
            [
                m,
                *(values.get(rate) for rate in _tuning.LEARNING_RATES),
                _tuning.rate_label(best[m]) if m in best else "pending",
                "; ".join(
                    f"{n} pairs {spread_cell(v, planned_seeds(m, heads, 0, options))}"
                    for (n,), v in sorted(rerun.items())
                )
                or "-",
            ]
        )
    header = [
        "model",
        *(f"lr {_tuning.rate_label(rate)}" for rate in _tuning.LEARNING_RATES),
        "best",
        "at the best rate, key dim 8 (when not the config's)",
    ]
    return markdown_table(header, rows)


def column_name(key_dim: int, pairs: int, rebinds: int = 0) -> str:
    return f"key dim {key_dim}, {pairs} pairs" + f", {rebinds} re-bound" * bool(rebinds)


def differences(cells: dict, model: str, baseline: str) -> dict[str, float]:
    """{column: median of `model` less median of `baseline`} where both are recorded."""
    return {
        column_name(*column): value - cells[baseline, *column]
        for (name, *column), value in cells.items()
        if name == model and (baseline, *column) in cells
    }


def verdict(holds: dict[str, bool]) -> str:
    """Whether a finding holds in every column recorded, and if not where (why: the notes)."""
    if not holds:
        return "no column recorded yet"
    failing = [column for column, ok in holds.items() if not ok]
    if not failing:
        return f"agrees in all {len(holds)} columns recorded"
    return f"differs in {len(failing)} of {len(holds)} ({'; '.join(failing)})"


PLAIN_TIE = 0.01  # a median gap this small between two rules is a tie


def delta_sum_statement(records: list[dict]) -> str:
    """What the medians say about the delta rule against the sum rule, plain and re-bound."""
    cells = medians(records, ["model", "key_dim", "x", "rebinds"])
    gaps = differences(cells, "delta_rule", "linear_attn")
    plain = {c: v for c, v in gaps.items() if "re-bound" not in c}
    rebound = {c: v for c, v in gaps.items() if "re-bound" in c}

    def ahead(columns: dict[str, float]) -> str:
        wins = [f"{c} ({v:+.3f})" for c, v in columns.items() if v > 0]
        return f"{len(wins)} of {len(columns)}" + (f": {'; '.join(wins)}" if wins else "")

    if not plain:
        return ""
    text = (
        "**Delta rule against sum rule, at equal state size (medians, delta_rule less "
        f"linear_attn).** Plain MQAR: the delta rule is ahead in {ahead(plain)}; elsewhere the sum "
        f"rule matches or beats it. Every key re-bound: the delta rule is ahead in "
        f"{ahead(rebound)}."
    )
    if max(plain.values()) <= PLAIN_TIE and rebound and min(rebound.values()) > 0:
        text += (
            f" So at this scale the delta rule is never more than {PLAIN_TIE} ahead of the sum"
            " rule where each key is bound once, and ahead wherever a key's value must be"
            " replaced: its advantage here is replacement, not capacity."
        )
    return text


def papers_table(records: list[dict]) -> str:
    """The papers' findings beside ours, from the medians of every column recorded (grid and
    re-binding, long decay init)."""
    cells = medians(records, ["model", "key_dim", "x", "rebinds"])
    attention = {
        column_name(*column): value for (m, *column), value in cells.items() if m == "attention"
    }
    lowest = min(attention.items(), key=lambda item: item[1], default=None)
    fixed = [m for m in MODELS if m != "attention"]
    drops = {
        f"{m}, {column_name(key_dim, 16)}": value <= cells[m, key_dim, 8, 0] + 0.005
        for (m, key_dim, x, r), value in cells.items()
        if m in fixed and x == 16 and not r and (m, key_dim, 8, 0) in cells
    }
    delta_sum = differences(cells, "delta_rule", "linear_attn")
    gated = {
        f"{m}, {column}": value
        for m in GATED
        for column, value in differences(cells, m, "delta_rule").items()
    }
    zoology = "2 layers, d_model 64 to 512, vocabulary 8,192, sequences up to 512, up to 64 pairs"
    rows = [
        [
            "softmax attention solves MQAR at every size",
            "Arora et al. 2024 (Zoology), its MQAR accuracy against model width",
            zoology,
            "near 1.0 at every width and sequence length",
            "attention, every (key dim, pairs) column",
            "every median >= 0.9",
            f"lowest median {lowest[1]:.3f} ({lowest[0]})" if lowest else "-",
            verdict({column: value >= 0.9 for column, value in attention.items()}),
        ],
        [
            "a fixed-state model needs its state to grow with the pairs",
            "Arora et al. 2024 (Zoology), as above",
            zoology,
            "accuracy falls as the pairs outgrow the state (a figure; no number copied)",
            "each fixed-state model and key dim, 8 against 16 pairs",
            "median at 16 pairs <= median at 8 pairs + 0.005",
            f"accuracy at 16 pairs no higher than at 8 in {sum(drops.values())} of {len(drops)}"
            " (model, key dim)",
            verdict(drops),
        ],
        [
            "the delta rule recalls better than the sum rule at equal state",
            "Yang et al. 2024 (DeltaNet), its MQAR experiment",
            "Zoology's MQAR at the paper's scale",
            "DeltaNet ahead of linear attention (a figure; no number copied)",
            "delta_rule against linear_attn, every column, re-bound ones included",
            "delta_rule median - linear_attn median >= 0",
            f"delta_rule less linear_attn: {signed(delta_sum)}",
            verdict({column: value >= 0 for column, value in delta_sum.items()}),
        ],
        [
            "gated models recall as well as or better than ungated ones",
            "Yang, Kautz & Hatamizadeh 2025 (Gated DeltaNet); Dao & Gu 2024 (Mamba-2)",
            "their recall benchmarks at the papers' scale",
            "gating keeps or improves recall (no number copied)",
            "gated_delta_rule and mamba2 against delta_rule, long decay init",
            "gated median - delta_rule median >= -0.01",
            f"less delta_rule: {signed(gated)}",
            verdict({column: value >= -0.01 for column, value in gated.items()}),
        ],
    ]
    header = [
        "finding",
        "paper",
        "paper's setting",
        "paper's result",
        "compared here",
        "holds where (tolerance)",
        "here (medians over seeds)",
        "agrees?",
    ]
    return markdown_table(header, rows)


def report(records: list[dict], points: list, options) -> str:
    records = [{**r, "rebinds": r["rebinds"] or 0} for r in records]  # None: from before it
    tuning = tuning_table(records, options) if not options.quick else ""
    records = [r for r in records if r["learning_rate"] is None]  # at the configs' rate
    longer = records  # the longer-budget study's table reads both budgets
    records = [r for r in records if r["budget"] is None]  # at the configs' budget
    long_decay = [
        r for r in records if r["decay_init"] in (None, LONG_DECAY) and r["beta_init"] is None
    ]
    plain = [r for r in records if r["rebinds"] == 0]
    grid = [r for r in long_decay if r["rebinds"] == 0]
    plot(grid, options.out / f"{NAME}.png")
    plot_rebinds(long_decay, options, options.out / f"{NAME}_rebinds.png")
    seeds = len(QUICK_SEEDS if options.quick else SEEDS)
    attention_seeds = len(QUICK_SEEDS if options.quick else ATTENTION_SEEDS)
    heads, pairs = STUDY_POINT
    here = [r for r in plain if r["num_heads"] == heads and r["x"] == pairs]
    study = [r for r in here if r["model"] in GATED]
    study_rows = [
        [model, decay, spread_cell(values, seeds)]
        for (model, decay), values in group(study, ["model", "decay_init"]).items()
    ]
    budget = load(points[0].config, points[0].overrides)
    rebind_steps = load(CONFIGS / NAME / "attention.yaml", REBIND_ATTENTION).train.steps
    study_table = markdown_table(["model", "decay init", "accuracy"], study_rows)
    key_dims = ", ".join(str(budget.model.d_model // h) for h in sorted(GRID, reverse=True))
    here_setting = (
        f"{len(budget.model.mixers)} layers, d_model {budget.model.d_model}, vocabulary "
        f"{budget.data.vocab_size}, {budget.data.seq_len} tokens ({REBIND_LONG_SEQ} with 16 pairs"
        f" re-bound), key dim {key_dims} per head, 8 and 16 pairs, up to {budget.train.steps}"
        " steps"
    )
    return f"""\
Test accuracy at the query positions, the median over {seeds} seeds ({attention_seeds} for attention
where its points stop early; min-max in brackets; [n/m seeds] where seeds are still pending). A
run trains {budget.train.steps} steps or stops at the first eval (every {budget.eval.every} steps)
with validation accuracy {budget.train.stop_at} or more; each record's `steps` says where it
ended. State size is per layer (attention: its key-value cache at the training length).

![accuracy]({NAME}.png)

### Learning rate: the tuning protocol

{_tuning.protocol_text(f"key dim 8 with {TUNE_POINT[1]} pairs", "accuracy")} The configs train at
3e-3; the tables below are at the configs' rate, and this table holds the grid (seed 0 accuracy)
and the reruns.

{tuning}

{grid_tables(grid, options)}

### Re-binding: every key bound again before the queries

After the pairs each key is bound a second time, to a new value, in random order; the queries ask
for the latest value (`data.rebinds`). A sum of outer products holds the old and the new value of
a key with equal weight; the delta rule replaces the old one. Attention, which learns to pick the
later binding slowly, trains up to {rebind_steps} steps here. Every model has
{len(REBIND_SEEDS) if not options.quick else 1} seeds at each setting; with 16 pairs re-bound the
sequences are {REBIND_LONG_SEQ} tokens long (64 cannot hold them), while the plain twin beside
them is the grid's 64-token point.

{rebind_table(long_decay, options)}

![accuracy with every key re-bound]({NAME}_rebinds.png)

{delta_sum_statement(long_decay)}

### A longer budget at key dim 4 ({BETA_HEADS} heads, 16 pairs)

The sum rule and the low-beta delta rule were still falling at step 4000; here they (and the delta
rule from its default start) train up to {LONG_STEPS} steps, with the same stop at validation
accuracy {budget.train.stop_at}.

{long_table(longer, options)}

### Decay init of the gated models ({heads} heads, {pairs} pairs)

`long`: the configs' init, A in [1, 2] and dt in [0.001, 0.005], so every head starts with
alpha = exp(-A dt) in [0.99, 0.999]; `mamba2`: Mamba-2's init, A in [1, 16] and dt in
[0.001, 0.1], alpha from about 0.2 to 0.999.

{study_table if study_rows else "No point of the study is recorded yet."}

### Write strength init of the delta rules (key dim 4, {BETA_HEADS} heads)

The grid's beta = sigmoid(projection) starts near 0.5; here a trained bias on the projection
starts it at {LOW_BETA} (`model.beta_init={LOW_BETA}`).

{beta_table(plain, options)}

### The papers beside ours

The papers show their findings as figures, so the paper's result states the claim and no number
is copied from them. "Here" computes each finding from the medians above (the grid and the
re-binding table), column by column, in this page's setting: {here_setting}. Where and why we
differ: the notes, "The papers beside ours: where and why we differ".

{papers_table(long_decay)}
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report, title=TITLE)
