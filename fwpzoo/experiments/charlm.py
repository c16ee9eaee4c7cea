"""Byte-level language modelling on NLTK Gutenberg and Brown, every architecture side by side.

Each architecture (configs/experiments/charlm/<model>.yaml, all about the same parameter count)
trains on the same stream of bytes, 32 x 128 bytes a step, for at least 4000 steps and at least 15
CPU-minutes (process time, the table's column) on a 2-core CPU: 4000 steps, or more for the
layers cheapest per step (attention 4800, the diagonal SSM 5000), so two seeds per point. The
metrics are bits per byte on the whole test split (each book's or file's last 5%), in windows of
the training length (`bpc`) and in long windows that carry the state through them (`bpc@L`),
beside gzip -9, bz2 -9 and xz -9e on the same test bytes as one stream.
"""

import bz2
import functools
import gzip
import lzma
import math
import zlib

import numpy as np

from fwpzoo.config import load
from fwpzoo.data.corpora import load_corpus
from fwpzoo.experiments import _sweep, _tuning
from fwpzoo.experiments._sweep import (
    CONFIGS,
    Experiment,
    Options,
    Outcome,
    Point,
    model_labels,
    read_details,
    run_training,
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

NAME = "charlm"
TITLE = "Byte-level language modelling on Gutenberg and Brown"
KEYS = (
    "model",
    "cell",
    "task",
    "corpus",
    "state_size",
    "num_params",
    "learning_rate",
    "x",
    "seed",
    "metric",
    "value",
)
# the main models first (seed 0 on Gutenberg of each before any other), then the other layers
MODELS = (
    "delta_rule",
    "gated_delta_rule",
    "linear_attn",
    "mamba2",
    "attention",
    "momentum_delta",
    "gated_linear_attn",
    "delta_product",
    "ssm",
)
CORPORA = ("gutenberg", "brown")
SEEDS = (0, 1)  # a point costs more than 10 CPU-minutes
LN2 = math.log(2)
DATA_DIR = "data"  # the configs' data.data_dir (scripts/fetch_data.py), from the working directory
WHOLE_SPLIT = 10**9  # more batches than any split has: text evaluation stops at the split's end
QUICK_MODELS, QUICK_CORPORA, QUICK_SEEDS = ("delta_rule", "attention"), ("fixture",), (0,)
QUICK_OVERRIDES = (
    *_sweep.QUICK_OVERRIDES,
    "data.seq_len=32",
    "train.batch_size=4",
    "train.log_every=1",
    "eval.batch_size=4",
    "eval.lengths=[64]",
)
COMPRESSORS = {
    "gzip": lambda data: gzip.compress(data, compresslevel=9),
    "bz2": lambda data: bz2.compress(data, compresslevel=9),
    "xz": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}
# a compressor that has seen the training text, as the models have: its output on train + test
# less its output on train alone (gzip's 32 KiB window and bz2's 900 kB blocks see little of it;
# xz's 64 MiB dictionary sees all of it)
AFTER_TRAIN = "+train"
COMPRESSOR_MODELS = (*COMPRESSORS, *(f"{name}{AFTER_TRAIN}" for name in COMPRESSORS))
# the tuning protocol: the five main models on Gutenberg, seed 0, where the page's findings are
TUNE_MODELS, TUNE_CORPUS = MODELS[:5], "gutenberg"


def make_points(options: Options) -> list:
    """The compressors on each corpus first (seconds; then after the training text), the
    learning-rate grid and a model's reruns at a better rate, then seeds, corpora and models."""
    quick = options.quick
    corpora = QUICK_CORPORA if quick else CORPORA
    points = [compressor_point(corpus, name) for corpus in corpora for name in COMPRESSORS]
    points += [compressor_point(c, name, after_train=True) for c in corpora for name in COMPRESSORS]
    if not quick:
        points += [
            model_point(TUNE_CORPUS, m, _tuning.TUNING_SEED, options, rate)
            for m in TUNE_MODELS
            for rate in _tuning.other_rates(config_rate(m))
        ]
        points += [
            model_point(TUNE_CORPUS, m, s, options, rate)
            for m, rate in tuned_rates(options).items()
            if not math.isclose(rate, config_rate(m))
            for s in SEEDS
        ]
    models = QUICK_MODELS if quick else MODELS
    for seed in QUICK_SEEDS if quick else SEEDS:
        for corpus in corpora:
            points += [model_point(corpus, m, seed, options) for m in models]
    return list({point.name: point for point in points}.values())


def model_point(corpus: str, model: str, seed: int, options: Options, rate=None) -> Point:
    """One seed of one model on a corpus, at its config's learning rate or at `rate`."""
    path = CONFIGS / NAME / f"{model}.yaml"
    learning_rate = (_tuning.rate_override(rate),) if rate is not None else ()
    quick = QUICK_OVERRIDES if options.quick else ()
    overrides = (f"data.corpus={corpus}", *learning_rate, *quick)
    cfg = load(path, overrides)
    labels = {
        **model_labels(cfg),
        "model": model,
        "task": "text",
        "corpus": corpus,
        "learning_rate": rate,
    }
    metrics = {"bpc": {"x": cfg.data.seq_len}}
    metrics |= {f"bpc@{n}": {"x": n} for n in cfg.eval.lengths}
    lr = f"-lr{_tuning.rate_label(rate)}" if rate is not None else ""
    return train_point(
        f"{corpus}-{model}{lr}-s{seed}", path, overrides, labels, metrics, seed, WHOLE_SPLIT
    )


@functools.cache  # a config file read once per process
def config_rate(model: str) -> float:
    return load(CONFIGS / NAME / f"{model}.yaml").train.learning_rate


def tuned_rates(options: Options) -> dict:
    """{model: its best rate on Gutenberg, seed 0}, for the models whose every rate is recorded
    (bits per byte: lower is better)."""
    rates = {}
    for m in TUNE_MODELS:
        best = _tuning.tuned_rate(
            options,
            lambda r, m=m: model_point(TUNE_CORPUS, m, _tuning.TUNING_SEED, options, r).name,
            config_rate(m),
            "bpc",
            lower_is_better=True,
        )
        if best is not None:
            rates[m] = best
    return rates


def compressor_point(corpus: str, name: str, after_train: bool = False) -> Point:
    """A general-purpose compressor's bits per byte on the corpus's test split, as one stream;
    `after_train`: the test bytes' share of its output on the training split then the test
    split (what it adds for the test bytes once it has seen the training text)."""
    model = f"{name}{AFTER_TRAIN}" if after_train else name
    labels = {"model": model, "task": "text", "corpus": corpus}
    spec = {"compressor": name, "corpus": corpus, **({"after_train": True} if after_train else {})}
    return Point(f"{corpus}-{model}", labels, {"bpc": {}}, spec)


def execute(point: Point, workdir) -> Outcome:
    """A model point trains and is evaluated; a compressor point compresses the test split."""
    if point.config is not None:
        return run_training(point, workdir)
    name, corpus = point.spec["compressor"], point.spec["corpus"]
    splits = load_corpus(corpus, DATA_DIR)
    test, compress = splits["test"].tobytes(), COMPRESSORS[name]
    details = {"test_bytes": len(test), "zlib": zlib.ZLIB_RUNTIME_VERSION}
    if point.spec.get("after_train"):
        train = splits["train"].tobytes()
        alone = len(compress(train))
        bits = 8 * (len(compress(train + test)) - alone)
        details |= {"train_bytes": len(train), "train_compressed": alone}
    else:
        bits = 8 * len(compress(test))
    return Outcome({"bpc": bits / len(test)}, 0, "compressed", details=details)


def tuning_table(records: list[dict], options: Options) -> str:
    """Test bpc on Gutenberg, seed 0: a row per model, a column per rate, the best rate, and the
    median over seeds at it where it is not the config's."""
    here = [r for r in records if r["corpus"] == TUNE_CORPUS and r["metric"] == "bpc"]
    best = tuned_rates(options)
    rows = []
    for m in TUNE_MODELS:
        own = config_rate(m)
        seed0 = {
            r["learning_rate"] or own: r["value"]
            for r in here
            if r["model"] == m and r["seed"] == _tuning.TUNING_SEED
        }
        rate = best.get(m)
        retuned = rate is not None and not math.isclose(rate, own)
        rerun = [
            r["value"] for r in here if r["model"] == m and retuned and r["learning_rate"] == rate
        ]
        rows.append(
            [
                m,
                *(seed0.get(r) for r in _tuning.LEARNING_RATES),
                _tuning.rate_label(rate) if rate is not None else "pending",
                spread_cell(rerun, len(SEEDS)) if retuned else "-",
            ]
        )
    header = [
        "model",
        *(f"lr {_tuning.rate_label(r)}" for r in _tuning.LEARNING_RATES),
        "best",
        "Gutenberg bpc at the best rate (when not the config's)",
    ]
    return markdown_table(header, rows)


def plot_curves(records: list[dict], points: list, options: Options, path) -> None:
    """A panel per corpus: each model's training bpc against the bytes trained on (the median
    over seeds, shaded to the min and max) and its test bpc where its training ended (the median,
    bars to the min and max); the compressors' test bpc dashed. Bytes rather than seconds: time
    depends on the machine's load, the data a model has seen does not."""
    configs = {p.name: load(p.config, p.overrides) for p in points if p.config is not None}
    corpora = list(dict.fromkeys(r["corpus"] for r in records))
    fig, axes = subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    models = [r for r in records if r["metric"] == "bpc" and r["model"] not in COMPRESSOR_MODELS]
    colours = {model: f"C{i}" for i, model in enumerate(dict.fromkeys(r["model"] for r in models))}
    for ax, corpus in zip(axes[0], corpora, strict=True):
        for model, colour in colours.items():
            seeds = [r for r in models if r["corpus"] == corpus and r["model"] == model]
            if seeds:
                plot_model(ax, seeds, configs[seeds[0]["point"]], options, colour, model)
        compressors = [
            r for r in records if r["corpus"] == corpus and r["model"] in COMPRESSOR_MODELS
        ]
        for rec in compressors:
            ax.axhline(rec["value"], color="grey", ls="--", lw=0.8)
            ax.annotate(
                rec["model"], (0.01, rec["value"]), xycoords=("axes fraction", "data"), fontsize=7
            )
        if compressors:  # the first steps' bpc, far above, would squeeze where models differ
            ax.set_ylim(top=max(r["value"] for r in compressors) + 0.3)
        ax.set(
            title=corpus,
            xlabel="bytes trained on (millions)",
            ylabel="bits per byte: training (lines), test (dots)",
        )
        if ax.get_legend_handles_labels()[1]:  # a corpus with no model recorded yet has none
            ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_model(ax, seeds: list[dict], cfg, options: Options, colour: str, label: str) -> None:
    """One model's curve over its seeds' records (one config, so the same logged steps) and its
    test bpc at the bytes it trained on."""
    curves = [dict(read_details(options, r["point"])["curve"]) for r in seeds]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    bits = np.array([[c[step] / LN2 for step in steps] for c in curves])  # [seeds, steps]
    megabytes_per_step = cfg.train.batch_size * cfg.data.seq_len / 1e6
    megabytes = np.array(steps) * megabytes_per_step
    ax.plot(megabytes, np.median(bits, axis=0), color=colour, lw=0.8, label=label)
    ax.fill_between(megabytes, bits.min(axis=0), bits.max(axis=0), color=colour, alpha=0.2, lw=0)
    end = max(r["steps"] for r in seeds) * megabytes_per_step
    errorbars(ax, {end: [r["value"] for r in seeds]}, color=colour)


def train_cpu_minutes(records: list[dict], options: Options) -> list[float]:
    """The CPU time (process time, every thread) each recorded point spent training."""
    points = dict.fromkeys(r["point"] for r in records)
    return [read_details(options, point)["train_cpu_seconds"] / 60 for point in points]


def papers_table(records: list[dict], cfg) -> str:
    """The papers' findings beside ours, from the median test bpc (windows of the training
    length) on each corpus, and the compressors on the same bytes; `cfg` is the setting here.
    Where and why we differ is in the page's notes."""
    bpc = [r for r in records if r["metric"] == "bpc"]
    cells = medians(bpc, ["corpus", "model"])
    corpora = list(dict.fromkeys(corpus for corpus, _ in cells))

    def less(model: str, baseline: str) -> dict[str, float]:
        return {
            c: cells[c, model] - cells[c, baseline]
            for c in corpora
            if (c, model) in cells and (c, baseline) in cells
        }

    def verdict(holds: dict[str, bool]) -> str:
        failing = [c for c, ok in holds.items() if not ok]
        if not holds:
            return "no corpus recorded yet"
        if failing:
            return f"differs on {', '.join(failing)}"
        return f"agrees on {', '.join(holds)}"

    delta_sum, gating = less("delta_rule", "linear_attn"), less("gated_delta_rule", "delta_rule")
    best = {
        c: min(cells[c, name] for name in COMPRESSOR_MODELS if (c, name) in cells) for c in corpora
    }
    # the trained models on each corpus: every compressor row, +train ones too, left out
    models = {
        c: [m for (c2, m) in cells if c2 == c and m not in COMPRESSOR_MODELS] for c in corpora
    }
    ahead = {c: [m for m in models[c] if cells[c, m] < best[c]] for c in corpora if models[c]}
    sizes = [r["num_params"] for r in bpc if r["model"] not in COMPRESSOR_MODELS]
    here_setting = (
        f"bytes of {', '.join(corpora) or '-'}; {len(cfg.model.mixers)} layers, d_model"
        f" {cfg.model.d_model}, windows of {cfg.data.seq_len} bytes, batches of"
        f" {cfg.train.batch_size}, at least {cfg.train.steps} steps"
    )
    if sizes:
        here_setting += f"; {min(sizes)} to {max(sizes)} parameters"
    rows = [
        [
            "setting",
            "far larger models and corpora than here: DeltaNet and Gated DeltaNet train hundreds"
            " of millions of parameters or more on billions of tokens; Schlag et al. 2021 train"
            " on WikiText-103",
            "-",
            here_setting,
            "-",
        ],
        [
            "the delta rule models language better than the sum rule",
            "Schlag, Irie & Schmidhuber 2021 (WikiText-103); Yang et al. 2024 (DeltaNet): lower"
            " perplexity than linear attention (no number copied: other corpora and units)",
            "delta_rule median < linear_attn median",
            f"delta_rule less linear_attn: {signed(delta_sum)}",
            verdict({c: d < 0 for c, d in delta_sum.items()}),
        ],
        [
            "gating helps the delta rule",
            "Yang, Kautz & Hatamizadeh 2025 (Gated DeltaNet): lower perplexity than DeltaNet (no"
            " number copied)",
            "gated_delta_rule median < delta_rule median",
            f"gated_delta_rule less delta_rule: {signed(gating)}",
            verdict({c: d < 0 for c, d in gating.items()}),
        ],
        [
            "a byte-level LM beats general-purpose compressors",
            "gzip -9, bz2 -9 and xz -9e on the same test bytes (their numbers are in the tables"
            " above, computed here)",
            "every model below the best compressor",
            "; ".join(
                f"{c}: {len(a)} of {len(models[c])} below {best[c]:.3f}" for c, a in ahead.items()
            )
            or "-",
            verdict({c: len(a) == len(models[c]) for c, a in ahead.items()}),
        ],
    ]
    header = ["finding", "paper", "holds where (tolerance)", "here (median bpc, lower is better)"]
    return markdown_table([*header, "agrees?"], rows)


def report(records: list[dict], points: list, options: Options) -> str:
    tuning = tuning_table(records, options) if not options.quick else ""
    records = [r for r in records if r["learning_rate"] is None]  # at the configs' rates
    plot_curves(records, points, options, options.out / f"{NAME}.png")
    seeds = len(QUICK_SEEDS if options.quick else SEEDS)
    models = [r for r in records if r["model"] not in COMPRESSOR_MODELS]
    metrics = list(dict.fromkeys(r["metric"] for r in models))
    cells = group(models, ["corpus", "model", "metric"])
    sections = []
    for corpus in dict.fromkeys(r["corpus"] for r in records):
        rows = []
        for model in dict.fromkeys(r["model"] for r in models if r["corpus"] == corpus):
            mine = [r for r in models if r["corpus"] == corpus and r["model"] == model]
            rows.append(
                [
                    model,
                    mine[0]["num_params"],
                    mine[0]["state_size"],
                    max(r["steps"] for r in mine),
                    spread_cell(train_cpu_minutes(mine, options), seeds, decimals=1),
                    *(spread_cell(cells.get((corpus, model, m)), seeds) for m in metrics),
                ]
            )
        rows += [
            [r["model"], None, None, None, None, *([r["value"]] * len(metrics))]
            for r in records
            if r["corpus"] == corpus and r["model"] in COMPRESSOR_MODELS
        ]
        header = ["model", "parameters", "state size", "steps", "train CPU-min"]
        header += [f"test {m}" for m in metrics]
        sections.append(f"### {corpus}\n\n{markdown_table(header, rows)}")
    # the setting beside the papers': the delta rule's (every model shares its layers, width,
    # windows and batches, and trains at least its steps)
    trained = next(p for p in points if p.labels["model"] == "delta_rule")
    setting = load(trained.config, trained.overrides)
    return f"""\
Test bits per byte over the whole test split, the median over {seeds} seeds (min-max in
brackets): `bpc` in windows of the training length, `bpc@L` in windows of L bytes (the state
runs across the whole window); the compressors compress the same test bytes as one stream. State
size is per layer; train CPU-min is the process time of the training, over every thread and,
where a run was resumed, every segment.

{chr(10).join(s + chr(10) for s in sections)}
`NAME{AFTER_TRAIN}`: the compressor's output on the training split followed by the test split,
less its output on the training split alone, over the test bytes: the compressor, like the models,
has seen the training text first.

![training curves]({NAME}.png)

### Learning rate: the tuning protocol

{_tuning.protocol_text(f"{TUNE_CORPUS} (test bpc, lower is better)", "bpc")} The configs train
at 3e-3; the tables above are at the configs' rates.

{tuning}

### The papers beside ours

The papers report other corpora at far larger scale, so their column states the finding and
copies no number; "here" computes it from the medians above. Where and why we differ: the notes,
"The papers beside ours: where and why we differ".

{papers_table(records, setting)}
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report, execute, title=TITLE)
