"""Continual familiarity detection (Tyulmankov, Yang & Abbott, Neuron 2022, "HebbFF").

A stream of random patterns, each new or a repeat of the one R steps back; the model says familiar
or novel at every step. Models: HebbFF (the plastic mixer with input plasticity, a sigmoid hidden
layer and the Hebbian rule) with eta learned with a free sign and with eta held positive, the FWP
layers delta_rule and linear_attn, and the diagonal SSM without fast weights; each trained at
several R (setting) and tested at every R of TEST_INTERVALS (x). Configs:
configs/experiments/familiarity/.
"""

import statistics
from dataclasses import replace

import jax
from flax import nnx

from fwpzoo.config import load
from fwpzoo.data import make_task
from fwpzoo.data.familiarity import NOVEL
from fwpzoo.experiments import _sweep, _tuning
from fwpzoo.experiments._sweep import (
    CONFIGS,
    Experiment,
    Outcome,
    model_labels,
    train_point,
)
from fwpzoo.reports import (
    errorbars,
    group,
    markdown_table,
    save_figure,
    spread_cell,
    subplots,
)
from fwpzoo.train import evaluate, make_eval_step, restore_run

NAME = "familiarity"
TITLE = "Continual familiarity detection (HebbFF)"
# variant -> (the model the page names it by, eta_sign); its config is configs/.../<variant>.yaml
MODELS = {
    "hebbff": ("plastic", "learned"),
    "hebbff-hebbian": ("plastic", "fixed_positive"),
    "hebbff-antihebbian": ("plastic", "fixed_negative"),
    "delta_rule": ("delta_rule", None),
    "linear_attn": ("linear_attn", None),
    "ssm": ("ssm", None),
}
# the anti-Hebbian control is the Hebbian one with the sign flipped: eta held at a fixed sign
# with the same parametrisation and magnitude (|eta K| = 5 at the start), so the two differ in
# the sign alone (the learned-sign model parametrises eta directly)
VARIANT_CONFIG = {"hebbff-antihebbian": ("hebbff-hebbian", ("model.plastic_eta=negative",))}
HEBBFF = ("hebbff", "hebbff-hebbian", "hebbff-antihebbian")
TRAIN_INTERVALS = (2, 8)
TEST_INTERVALS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
SEEDS = (0, 1, 2)
HEBBFF_SEEDS = (0, 1, 2, 3, 4)  # the sign question gets five seeds a variant
QUICK_MODELS, QUICK_TRAIN, QUICK_TEST, QUICK_SEEDS = ("hebbff", "delta_rule"), (2,), (1, 2, 4), (0,)
KEYS = (
    "model",
    "plastic_on",
    "plasticity",
    "eta_sign",
    "task",
    "setting",
    "x",
    "seed",
    "metric",
    "value",
)


def make_points(options) -> list:
    quick = options.quick
    tests = QUICK_TEST if quick else TEST_INTERVALS
    points = []
    # seeds outermost, so a sweep cut short has every model and interval at least once
    for seed in QUICK_SEEDS if quick else HEBBFF_SEEDS:
        for R in QUICK_TRAIN if quick else TRAIN_INTERVALS:
            for name in QUICK_MODELS if quick else MODELS:
                if not quick and seed not in SEEDS and name not in HEBBFF:
                    continue
                _, eta_sign = MODELS[name]
                config, extra = VARIANT_CONFIG.get(name, (name, ()))
                path = CONFIGS / NAME / f"{config}.yaml"
                overrides = (
                    f"data.repeat_interval={R}",
                    *extra,
                    *(_sweep.QUICK_OVERRIDES if quick else ()),
                )
                cfg = load(path, overrides)
                labels = {**model_labels(cfg), "eta_sign": eta_sign, "task": NAME, "setting": R}
                if labels["mixer"] == "plastic":
                    layer = cfg.model.layers()[0]
                    labels |= {"plastic_on": layer.plastic_on, "plasticity": layer.plasticity}
                metrics = {f"accuracy@R{x}": {"x": x, "metric": "accuracy"} for x in tests}
                if labels["mixer"] == "plastic":
                    metrics["learned_eta"] = {}
                point = train_point(f"{name}-R{R}-s{seed}", path, overrides, labels, metrics, seed)
                points.append(replace(point, spec={**point.spec, "test_intervals": list(tests)}))
    return points


def execute(point, workdir) -> Outcome:
    """Trains at the point's R, then tests at every R of its metrics; the learned eta and
    lambda of a plastic layer."""
    outcome = _sweep.run_training(replace(point, metrics={}), workdir)
    run, step, model_state = restore_run(workdir)
    eval_step = jax.jit(make_eval_step(run.graphdef))
    metrics = {}
    for name, fields in point.metrics.items():
        if "x" in fields:
            data = replace(run.cfg.data, repeat_interval=fields["x"])
            task = make_task(data, run.cfg.train.seed)
            test = evaluate(eval_step, model_state, task, run.cfg.eval, run.mesh, "test")
            metrics[name] = test["accuracy"]
    details = dict(outcome.details)
    if "learned_eta" in point.metrics:
        model = nnx.merge(run.graphdef, model_state["params"], model_state["rest"])
        mixer = model.blocks[0].mixer
        metrics["learned_eta"] = float(mixer.eta()[0])
        details |= {"learned_lambda": float(mixer.lam()[0]), "presynaptic_dim": mixer.K}
    return replace(outcome, metrics=metrics, details=details)


def always_novel(cfg, R: int) -> float:
    """The accuracy of answering "novel" at every scored step of the test streams of seed 0 at
    interval R: 1 - p / (1 + p) once t >= 2R, 1 - p at R <= t < 2R (nothing there was a repeat)."""
    task = make_task(replace(cfg.data, repeat_interval=R), 0)
    hits = total = 0.0
    for batch in task.eval_batches("test", cfg.eval.batch_size, cfg.eval.num_batches):
        hits += float(((batch["targets"] == NOVEL) * batch["weights"]).sum())
        total += float(batch["weights"].sum())
    return hits / total


def variant(rec: dict) -> str:
    return rec["model"] + (f" (eta {rec['eta_sign']})" if rec["eta_sign"] else "")


def plot(records: list[dict], settings, baseline: dict, path) -> None:
    fig, axes = subplots(1, len(settings), figsize=(5 * len(settings), 3.6), squeeze=False)
    curves = group([r for r in records if r["metric"] == "accuracy"], ["setting", "variant", "x"])
    for ax, R in zip(axes[0], settings, strict=True):
        for name in dict.fromkeys(v for s, v, _ in curves if s == R):
            errorbars(
                ax, {x: vs for (s, v, x), vs in curves.items() if (s, v) == (R, name)}, label=name
            )
        ax.axvline(R, color="grey", lw=0.8, ls=":")  # the training interval
        xs = sorted(baseline)
        ax.plot(xs, [baseline[x] for x in xs], color="grey", lw=0.8, ls="--")
        ax.set(title=f"trained at R = {R}", xlabel="test R", ylabel="test accuracy", xscale="log")
        ax.set(ylim=(0.45, 1.01))
        ax.legend(fontsize=7)
    save_figure(fig, path)


def twice_table(cells: dict, planned: dict, settings) -> str:
    """Each HebbFF variant's accuracy at twice each training interval."""
    names = [variant({"model": "plastic", "eta_sign": e}) for _, e in (MODELS[n] for n in HEBBFF)]
    rows = [
        [name, *(spread_cell(cells.get((R, name, 2 * R)), planned[name]) for R in settings)]
        for name in names
        if any((R, name, 2 * R) in cells for R in settings)
    ]
    header = ["model", *(f"trained at R = {R}, tested at R = {2 * R}" for R in settings)]
    return markdown_table(header, rows) if rows else "No HebbFF point is recorded yet."


ABOVE_NOVEL = 0.1  # "generalises": a median this far above always "novel" at the interval


def papers_table(cells: dict, seeds: int, anti: dict, baseline: dict, cfg) -> str:
    """The paper's findings, ours beside them from the records: whether each run with eta
    learned ({run: ended with eta < 0}) turned anti-Hebbian; at the longest training interval,
    eta held anti-Hebbian against eta held Hebbian at twice that interval, and eta learned and
    held anti-Hebbian at half and 1.5 times it. Each verdict by the rule its row states; where
    and why we differ is in the page's notes."""
    R = max(setting for setting, _, _ in cells) if cells else None
    learned_eta, hebbian, anti_hebbian = (
        variant({"model": "plastic", "eta_sign": s})
        for s in ("learned", "fixed_positive", "fixed_negative")
    )

    def at(name, x):
        return spread_cell(cells.get((R, name, x)), seeds) or "-"

    def median(name, x):
        values = cells.get((R, name, x))
        return statistics.median(values) if values else None

    def verdict(holds: dict[str, bool]) -> str:
        failing = [what for what, ok in holds.items() if not ok]
        if not holds:
            return "nothing recorded yet"
        if not failing:
            return "agrees" if len(holds) == 1 else f"agrees in all {len(holds)}"
        return f"differs in {len(failing)} of {len(holds)} ({'; '.join(failing)})"

    longer = f"trained at R = {R}, at R = {2 * R}: held anti-Hebbian {at(anti_hebbian, 2 * R)},"
    longer += f" held Hebbian {at(hebbian, 2 * R)}, eta learned {at(learned_eta, 2 * R)}"
    beyond = f"trained at R = {R}: at R = {3 * R // 2} {at(learned_eta, 3 * R // 2)}, at R ="
    beyond += f" {R // 2} {at(learned_eta, R // 2)} (eta learned); held anti-Hebbian"
    beyond += f" {at(anti_hebbian, 3 * R // 2)}, {at(anti_hebbian, R // 2)}"
    pair = [median(anti_hebbian, 2 * R), median(hebbian, 2 * R)] if cells else [None, None]
    generalises = {
        f"{name}, R = {x}": median(name, x) >= baseline[x] + ABOVE_NOVEL
        for name in (learned_eta, anti_hebbian)
        for x in ((3 * R // 2, R // 2) if cells else ())
        if median(name, x) is not None and x in baseline
    }
    paper_setting = (
        "patterns are fixed random +-1 vectors of dimension 100; the readout is one sigmoid"
        " unit; eta starts anti-Hebbian (eta d = -5 in its code)"
    )
    steps, batch = cfg.train.steps, cfg.train.batch_size
    here_setting = (
        f"patterns are tokens from a vocabulary of {cfg.data.vocab_size} in streams of"
        f" {cfg.data.seq_len}; one plastic layer in the zoo's LM block; eta starts Hebbian"
        f" (eta K = +5); {steps} Adam steps of {batch} streams"
    )
    rows = [
        ["setting", paper_setting, "-", here_setting, "-"],
        [
            "meta-learning turns the plasticity anti-Hebbian (eta < 0)",
            "learnt eta is negative; anti-Hebbian is the solution found most readily",
            "every run with eta learned ends with eta < 0",
            f"{sum(anti.values())} of {len(anti)} runs with eta learned, each started Hebbian",
            verdict(anti),
        ],
        [
            "anti-Hebbian plasticity detects repeats over longer intervals than Hebbian",
            "anti-Hebbian HebbFF holds its accuracy to far longer intervals",
            f"median of held anti-Hebbian > median of held Hebbian at R = {2 * R} (the held"
            " controls differ in eta's sign alone)",
            longer,
            verdict({f"R = {2 * R}": pair[0] > pair[1]} if None not in pair else {}),
        ],
        [
            "HebbFF trained at one interval generalises to others",
            "accuracy holds at intervals it was not trained on",
            f'median >= always "novel" + {ABOVE_NOVEL} at R = {3 * R // 2} and {R // 2}'
            if cells
            else "-",
            beyond,
            verdict(generalises),
        ],
    ]
    header = ["finding", "Tyulmankov, Yang & Abbott 2022", "holds where (tolerance)", "here"]
    return markdown_table([*header, "agrees?"], rows)


def seeds_text(planned: dict) -> str:
    """The seed counts a table's medians are over, e.g. "5 seeds for the HebbFF variants and 3
    for the others"."""
    hebbff = planned[variant({"model": "plastic", "eta_sign": "learned"})]
    others = planned[variant({"model": "delta_rule", "eta_sign": None})]
    if hebbff == others:
        return f"{hebbff} seed" + "s" * (hebbff > 1)
    return f"{hebbff} seeds for the HebbFF variants and {others} for the others"


def report(records: list[dict], points: list, options) -> str:
    records = [{**r, "variant": variant(r)} for r in records]
    settings = sorted({r["setting"] for r in records})
    cfg = load(CONFIGS / NAME / "hebbff.yaml", _sweep.QUICK_OVERRIDES if options.quick else ())
    accuracy = [r for r in records if r["metric"] == "accuracy"]
    xs = sorted({r["x"] for r in accuracy})
    baseline = {x: always_novel(cfg, x) for x in xs}
    plot(records, settings, baseline, options.out / f"{NAME}.png")
    planned = {
        variant({"model": m, "eta_sign": e}): (
            len(QUICK_SEEDS) if options.quick else len(HEBBFF_SEEDS if n in HEBBFF else SEEDS)
        )
        for n, (m, e) in MODELS.items()
    }
    seeds = seeds_text(planned)
    cells = group(accuracy, ["setting", "variant", "x"])
    rows = [
        [R, name, *(spread_cell(cells.get((R, name, x)), planned[name]) for x in xs)]
        for R, name in dict.fromkeys((r["setting"], r["variant"]) for r in accuracy)
    ]
    twice = twice_table(cells, planned, settings)
    rows.append(["-", 'always "novel" (seed 0)', *(baseline[x] for x in xs)])
    table = markdown_table(["train R", "model", *(f"R={x}" for x in xs)], rows)
    eta_rows = []
    for rec in (r for r in records if r["metric"] == "learned_eta"):
        details = _sweep.read_details(options, rec["point"])
        K = details["presynaptic_dim"]
        sign = "anti-Hebbian" if rec["value"] < 0 else "Hebbian"
        eta_rows.append(
            [rec["variant"], rec["setting"], rec["seed"], rec["value"], rec["value"] * K, sign]
            + [details["learned_lambda"]]
        )
    eta_table = markdown_table(
        ["model", "train R", "seed", "eta", "eta K", "sign", "lambda"], eta_rows
    )
    num = cfg.eval.batch_size * cfg.eval.num_batches
    learned = [
        r["value"] for r in records if r["metric"] == "learned_eta" and r["eta_sign"] == "learned"
    ]
    anti = sum(value < 0 for value in learned)
    anti_runs = {
        f"R = {r['setting']}, seed {r['seed']}": r["value"] < 0
        for r in records
        if r["metric"] == "learned_eta" and r["eta_sign"] == "learned"
    }
    learned_name = variant({"model": "plastic", "eta_sign": "learned"})
    by_interval = "; ".join(
        f"trained at R = {R}: {sum(v < 0 for v in values)} of {len(values)}"
        for (R,), values in group(
            [r for r in records if r["metric"] == "learned_eta" and r["eta_sign"] == "learned"],
            ["setting"],
        ).items()
    )
    return f"""{_tuning.untuned_text(_tuning.rate_label(cfg.train.learning_rate))}

A stream of {cfg.data.seq_len} patterns (tokens from a vocabulary of {cfg.data.vocab_size}),
each the one shown R steps back with probability {cfg.data.repeat_prob} (if that one was new)
or a pattern never seen before; the model answers familiar or novel at every step t >= R.
Accuracy on {num} fresh test streams per R, median over {seeds} (min-max in brackets).
Answering "novel" everywhere scores 1 - p / (1 + p) = 2/3 in the long run and 1 - p from R to 2R
(nothing shown before 2R was a repeat itself, so every pattern may come back): less where the
stream is short against R (the last row, and the dashed line in the plot).

{table}

![accuracy against the test interval]({NAME}.png)

Medians over seeds with bars to the min and max. Dotted: the training interval; dashed: always
"novel".

HebbFF with eta learned ended anti-Hebbian (eta < 0) in {anti} of {len(learned)} recorded runs
({by_interval}), each started Hebbian (eta K = +5).

Controls: `eta fixed_positive` and `eta fixed_negative` hold eta at one sign with the same
parametrisation and starting magnitude (|eta K| = 5), so they differ in the sign alone; `eta
learned` parametrises eta directly, free to change sign. Accuracy at twice the training
interval, median over seeds (min-max):

{twice}

The learned plasticity of each HebbFF run (eta starts at +5 / K, Hebbian, in both variants; K is
the presynaptic dimension):

{eta_table}

## The paper's findings beside ours

Tyulmankov, Yang & Abbott (Neuron 2022) meta-learn HebbFF on continual familiarity detection;
they show these findings in figures, so their column states the claim. Ours are medians over
{planned[learned_name]} seeds (min-max) from the table above.

{papers_table(cells, planned[learned_name], anti_runs, baseline, cfg)}

Where and why we differ: the notes, "The paper beside ours: where and why we differ".
"""


EXPERIMENT = Experiment(NAME, KEYS, make_points, report, execute, title=TITLE)
