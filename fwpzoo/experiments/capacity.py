"""Associative retrieval capacity (Schlag, Irie & Schmidhuber 2021, "Linear transformers are
secretly fast weight programmers", the synthetic experiments of section 6.1).

A sequence shows L key-value pairs over S keys and S one-hot values, then a query key; the target is
the value last paired with it (fwpzoo.data.capacity). The model is the paper's single fast-weight
memory read once:

    e_i = E[key_i]                                  key embedding              [B, L, D]
    k_i = phi(W_k e_i),  q = phi(W_q E[query])      feature map                [B, L, K'], [B, K']
    sum rule   (linear_attn): S_L = sum_i k_i v_i^T, z_L = sum_i k_i,  y = S_L^T q / (z_L . q)
    delta rule (delta_rule):  k, q sum-normalised (phi / sum phi),
                              beta_i = sigmoid(w_beta . e_i + b),
                              S_i = S_{i-1} + beta_i k_i (v_i - S_{i-1}^T k_i)^T,  y = S_L^T q
    loss = 1/2 ||onehot(target) - y||^2                                        y [B, V], V = S

and the baseline is softmax attention over the same keys and values, y = softmax(K q / sqrt(D)) V.
Each (setting, model, S) is trained with Adam until the loss on fresh sequences reaches stop_loss,
stops improving for `patience` evaluations, or max_steps pass; the result is the loss on a final
set of fresh sequences. Sweep settings: configs/experiments/capacity/{sweep,quick}.yaml.
"""

import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fwpzoo import cells
from fwpzoo.config import ConfigError, from_dict
from fwpzoo.config_file import parse_yaml
from fwpzoo.data.capacity import SETTINGS, capacity_batch
from fwpzoo.experiments import _tuning
from fwpzoo.experiments._sweep import (
    CONFIGS,
    Experiment,
    Outcome,
    Point,
)
from fwpzoo.layers.feature_maps import apply_feature_map, favor_projection, feature_dim
from fwpzoo.reports import (
    errorbars,
    group,
    markdown_table,
    save_figure,
    spread,
    subplots,
)

NAME = "capacity"
TITLE = "Associative retrieval capacity (Schlag, Irie & Schmidhuber 2021)"
# record spelling of a feature map -> (feature_maps registry name, nu)
PHI = {
    "elu1": ("elu1", 1),
    "dpfp1": ("dpfp", 1),
    "dpfp2": ("dpfp", 2),
    "dpfp3": ("dpfp", 3),
    "favor": ("favor", 1),
}
RULE_CELL = {"sum": "linear_attn", "delta": "delta_rule"}
SOFTMAX = "softmax"
STREAMS = {"train": 0, "eval": 1, "final": 2}  # independent data streams per run


# ---------------------------------------------------------------------------------------------
# The model


def embedding_size(num_keys):
    """The paper's key embedding width, 1.1 x (keys + values): wider than the number of keys, so
    E W_k can be any key matrix and W_k's small weights steer it quickly."""
    return math.ceil(2.2 * num_keys)


def init_params(key, num_keys, d_key):
    emb_key, wk_key, wq_key, wb_key = jax.random.split(key, 4)
    width = embedding_size(num_keys)
    scale = width**-0.5  # unit-variance projections of the N(0, 1) embeddings
    return {
        "embedding": jax.random.normal(emb_key, (num_keys, width)),  # [S, E]
        "w_k": scale * jax.random.normal(wk_key, (width, d_key)),
        "w_q": scale * jax.random.normal(wq_key, (width, d_key)),
        "w_beta": scale * jax.random.normal(wb_key, (width,)),
        "b_beta": jnp.zeros(()),
    }


def sum_normalise(x):
    # DPFP can map a vector to all zeros; the epsilon makes that key a no-op write, not a NaN.
    return x / (jnp.sum(x, axis=-1, keepdims=True) + 1e-6)


def write(cell, form, chunk_size, k, v, **gates):
    """The cell's final state over the pairs. It reads too (o, with q = k); o is unused, so jit
    drops that computation."""
    if form == "chunkwise":
        # a chunk longer than the sequence would only pad it with zeros
        chunk_size = min(chunk_size, k.shape[1])
        return cell.chunkwise(k, k, v, chunk_size=chunk_size, **gates)[1]
    return getattr(cell, form)(k, k, v, **gates)[1]


def fwp_readout(params, keys, values, query, *, rule, feature_map, projection, form, chunk_size):
    """keys [B, L] int, values [B, L, V] one-hot, query [B] int -> y [B, V]."""
    name, nu = PHI[feature_map]
    e = params["embedding"][keys]  # [B, L, D]
    k = apply_feature_map(name, e @ params["w_k"], nu=nu, projection=projection)  # [B, L, K']
    q_in = params["embedding"][query] @ params["w_q"]  # [B, D]
    q = apply_feature_map(name, q_in, nu=nu, projection=projection)  # [B, K']
    k = k[:, :, None, :]  # [B, L, H=1, K']
    if rule == "sum":
        # Linear attention's normaliser z = sum_i k_i rides along as a last, constant value
        # column, so one pass of the cell builds both S and z.
        ones = jnp.ones((*values.shape[:-1], 1), values.dtype)
        v = jnp.concatenate([values, ones], axis=-1)[:, :, None, :]  # [B, L, 1, V + 1]
        state = write(cells.get(RULE_CELL[rule]), form, chunk_size, k, v)  # [B, 1, K', V + 1]
        read = jnp.einsum("bkv,bk->bv", state[:, 0], q)  # [B, V + 1]
        return read[:, :-1] / (read[:, -1:] + 1e-6)
    k, q = sum_normalise(k), sum_normalise(q)
    beta = jax.nn.sigmoid(e @ params["w_beta"] + params["b_beta"])[:, :, None]  # [B, L, 1]
    v = values[:, :, None, :]  # [B, L, 1, V]
    state = write(cells.get(RULE_CELL[rule]), form, chunk_size, k, v, beta=beta)  # [B, 1, K', V]
    return jnp.einsum("bkv,bk->bv", state[:, 0], q)


def softmax_readout(params, keys, values, query):
    k = params["embedding"][keys] @ params["w_k"]  # [B, L, D]
    q = params["embedding"][query] @ params["w_q"]  # [B, D]
    scores = jnp.einsum("bld,bd->bl", k, q) / jnp.sqrt(k.shape[-1])  # [B, L]
    return jnp.einsum("bl,blv->bv", jax.nn.softmax(scores, axis=-1), values)


def readout_fn(model, projection=None, form="recurrent", chunk_size=64):
    """y [B, V] as a function of (params, keys, values, query) for a model "RULE-MAP" or
    "softmax"."""
    if model == SOFTMAX:
        return softmax_readout
    rule, feature_map = model.split("-")
    options = dict(
        rule=rule, feature_map=feature_map, projection=projection, form=form, chunk_size=chunk_size
    )
    return lambda params, keys, values, query: fwp_readout(params, keys, values, query, **options)


def batch_loss(readout, params, batch, num_values):
    """Mean over the batch of 1/2 ||onehot(target) - y||^2."""
    values = jax.nn.one_hot(batch["values"], num_values)  # [B, L, V]
    y = readout(params, batch["keys"], values, batch["query"])  # [B, V]
    error = jax.nn.one_hot(batch["target"], num_values) - y
    return 0.5 * jnp.mean(jnp.sum(jnp.square(error), axis=-1))


def make_train_chunk(readout, optimizer, num_values):
    """A jitted function taking one optimizer step per batch of a stacked [N, B, ...] chunk, so a
    whole evaluation interval is one dispatch."""

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(lambda p: batch_loss(readout, p, batch, num_values))(
            params
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def train_chunk(params, opt_state, batches):
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses

    return train_chunk


# ---------------------------------------------------------------------------------------------
# The sweep


@dataclasses.dataclass(frozen=True)
class Sweep:
    """One sweep file of configs/experiments/capacity/."""

    d_key: int
    favor_features: int
    batch_size: int
    learning_rate: float
    eval_every: int  # training steps between evaluations (one jitted chunk)
    eval_sequences: int  # fresh sequences per evaluation during training
    final_sequences: int  # fresh sequences of the reported loss; a multiple of eval_sequences
    patience: int  # evaluations without improvement before a run stops
    stop_loss: float
    max_steps: int
    form: str  # the cells' form: recurrent or chunkwise
    chunk_size: int
    seeds: tuple[int, ...]
    settings: tuple[str, ...]
    models: tuple[str, ...]  # "sum-elu1", "delta-dpfp2", ..., "softmax"
    # the S grid of each setting and rule (sum, delta or softmax), or of one model where it
    # differs from its rule's: {setting: {rule or model: [S, ...]}}
    num_pairs: Mapping


def load_sweep(path: Path) -> Sweep:
    """A Sweep from YAML, read as a config file is and typed by the config decoder; ConfigError
    (one line) for a missing file, a missing or unknown key or a bad value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read sweep {path}: {err}".splitlines()[0]) from None
    raw = parse_yaml(text, path)
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep {path} must hold a mapping of the sweep's fields, not {raw!r}")
    missing = [f.name for f in dataclasses.fields(Sweep) if f.name not in raw]
    if missing:
        raise ConfigError(f"sweep {path}: missing keys {missing}")
    try:
        sweep = from_dict(Sweep, raw)
    except ConfigError as err:
        raise ConfigError(f"sweep {path}: {err}") from None
    check_sweep(sweep, path)
    return sweep


def check_sweep(sweep: Sweep, path) -> None:
    valid_models = [SOFTMAX] + [f"{rule}-{phi}" for rule in RULE_CELL for phi in PHI]
    for name, given, valid in (
        ("settings", sweep.settings, SETTINGS),
        ("models", sweep.models, valid_models),
        ("form", (sweep.form,), ("recurrent", "chunkwise")),
    ):
        bad = [x for x in given if x not in valid]
        if bad:
            raise ConfigError(f"sweep {path}: unknown {name} {bad}; valid: {', '.join(valid)}")
    for setting in sweep.settings:
        grids = sweep.num_pairs.get(setting)
        rules = {rule_of(model) for model in sweep.models}
        if not isinstance(grids, dict) or not rules <= set(grids) <= rules | set(sweep.models):
            raise ConfigError(
                f"sweep {path}: num_pairs.{setting} needs a list for each of {sorted(rules)} "
                "and may add lists for models of the sweep"
            )
        if not all(isinstance(s, int) and s >= 1 for grid in grids.values() for s in grid):
            raise ConfigError(f"sweep {path}: num_pairs.{setting} must hold positive integers")
    if not sweep.seeds or not all(isinstance(seed, int) for seed in sweep.seeds):
        raise ConfigError(f"sweep {path}: seeds must be a non-empty list of integers")
    if sweep.final_sequences % sweep.eval_sequences or sweep.max_steps % sweep.eval_every:
        raise ConfigError(
            f"sweep {path}: final_sequences must be a multiple of eval_sequences and "
            "max_steps a multiple of eval_every"
        )


def rule_of(model: str) -> str:
    """sum, delta or softmax."""
    return model.split("-")[0]


def grid(sweep: Sweep) -> list[tuple[str, str, int]]:
    """Every (setting, model, S) of the sweep, in order."""
    return [
        (setting, model, s)
        for setting in sweep.settings
        for model in sweep.models
        for s in pairs_of(sweep, setting, model)
    ]


def pairs_of(sweep: Sweep, setting: str, model: str) -> list[int]:
    grids = sweep.num_pairs[setting]
    return grids[model] if model in grids else grids[rule_of(model)]


def phi_dim(model: str, sweep: Sweep) -> int | None:
    if model == SOFTMAX:
        return None
    name, nu = PHI[model.split("-")[1]]
    return feature_dim(name, sweep.d_key, nu=nu, num_features=sweep.favor_features)


def draw(
    sweep: Sweep, setting: str, num_pairs: int, seed: int, stream: str, index: int, count: int
):
    """`count` stacked batches [count, B, ...] of fresh sequences, a pure function of the
    arguments."""
    rng = np.random.default_rng((seed, num_pairs, STREAMS[stream], index))
    flat = capacity_batch(rng, count * sweep.batch_size, num_pairs, setting)
    return {key: x.reshape(count, sweep.batch_size, *x.shape[1:]) for key, x in flat.items()}


def train_run(sweep: Sweep, setting: str, model: str, num_pairs: int, seed: int) -> dict:
    """Trains one model on one (setting, S) from one seed and returns its result row."""
    start = time.perf_counter()
    init_key, favor_key = jax.random.split(jax.random.key(seed))
    projection = None
    if model.endswith("favor"):
        projection = favor_projection(favor_key, sweep.d_key, sweep.favor_features)
    readout = readout_fn(model, projection, sweep.form, sweep.chunk_size)
    optimizer = optax.adam(sweep.learning_rate)
    params = init_params(init_key, num_pairs, sweep.d_key)
    opt_state = optimizer.init(params)
    train_chunk = make_train_chunk(readout, optimizer, num_pairs)
    per_eval = sweep.eval_sequences // sweep.batch_size
    evaluate = jax.jit(
        lambda p, batches: jnp.mean(
            jax.lax.map(lambda b: batch_loss(readout, p, b, num_pairs), batches)
        )
    )
    best, strikes, curve, stopped = math.inf, 0, [], "max_steps"
    for index in range(sweep.max_steps // sweep.eval_every):
        batches = draw(sweep, setting, num_pairs, seed, "train", index, sweep.eval_every)
        params, opt_state, _ = train_chunk(params, opt_state, batches)
        eval_batches = draw(sweep, setting, num_pairs, seed, "eval", index, per_eval)
        loss = float(evaluate(params, eval_batches))
        curve.append(((index + 1) * sweep.eval_every, loss))
        if not math.isfinite(loss):
            stopped = "nan"
            break
        if loss <= sweep.stop_loss:
            stopped = "stop_loss"
            break
        best, strikes = (loss, 0) if loss < best else (best, strikes + 1)
        if strikes >= sweep.patience:
            stopped = "plateau"
            break
    final = [
        float(evaluate(params, draw(sweep, setting, num_pairs, seed, "final", i, per_eval)))
        for i in range(sweep.final_sequences // sweep.eval_sequences)
    ]
    return {
        "setting": setting,
        "model": model,
        "num_pairs": num_pairs,
        "seed": seed,
        "phi_dim": phi_dim(model, sweep),
        "loss": float(np.mean(final)),
        "steps": curve[-1][0],
        "stopped": stopped,
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }


# ---------------------------------------------------------------------------------------------
# Points, records and report

KEYS = (
    "model",
    "cell",
    "rule",
    "feature_map",
    "phi_dim",
    "beta_range",
    "d_key",
    "setting",
    "state_size",
    "x",
    "seed",
    "metric",
    "value",
)
TRAINING_FIELDS = tuple(
    f.name for f in dataclasses.fields(Sweep) if f.name not in ("seeds", "settings", "models")
)


def labels_of(sweep: Sweep, setting: str, model: str, s: int) -> dict:
    """Record fields of one (setting, model, S)."""
    length = s if setting == "unique" else 2 * s
    if model == SOFTMAX:  # attention keeps every key and value: L (D + V) numbers
        labels = {
            "model": "attention",
            "feature_map": SOFTMAX,
            "state_size": length * (sweep.d_key + s),
        }
    else:
        rule, feature_map = model.split("-")
        phi = phi_dim(model, sweep)
        labels = {
            "model": RULE_CELL[rule],
            "cell": RULE_CELL[rule],
            "rule": rule,
            "feature_map": feature_map,
            "phi_dim": phi,
            "beta_range": "0,1" if rule == "delta" else None,
            "state_size": phi * s,  # the fast weights K' x V
        }
    return {**labels, "setting": setting, "x": s}


def make_points(options) -> list[Point]:
    """Sweep by sweep; within one, seeds outermost, so a sweep cut short has every (setting,
    model, S) once first."""
    points = []
    for prefix, file in sweep_files(options):
        sweep = load_sweep(CONFIGS / NAME / file)
        training = {name: getattr(sweep, name) for name in TRAINING_FIELDS}
        # the first sweep's records predate the d_key field, so only the others carry it
        d_key = {"d_key": sweep.d_key} if prefix else {}
        for seed in sweep.seeds:
            for setting, model, s in grid(sweep):
                spec = {"sweep": file, **training, "setting": setting, "model": model, "S": s}
                spec["seed"] = seed
                labels = {**labels_of(sweep, setting, model, s), **d_key, "seed": seed}
                name = f"{prefix}{setting}-{model}-S{s}-s{seed}"
                points.append(Point(name, labels, {"loss": {}}, spec))
    return points


def execute(point: Point, workdir: Path) -> Outcome:
    """Trains one point (the workdir is unused: a run takes seconds and keeps nothing)."""
    del workdir
    spec = point.spec
    sweep = load_sweep(CONFIGS / NAME / spec["sweep"])
    result = train_run(sweep, spec["setting"], spec["model"], spec["S"], spec["seed"])
    return Outcome(
        {"loss": result["loss"]}, result["steps"], result["stopped"], {}, {"curve": result["curve"]}
    )


def plot(records: list[dict], sweep: Sweep, path: Path) -> None:
    """Final loss against S (median over seeds, bars to min and max): a panel per setting x
    rule, a line per feature map, softmax attention dashed in every panel."""
    rules = list(dict.fromkeys(rule_of(m) for m in sweep.models if m != SOFTMAX)) or [SOFTMAX]
    fig, axes = subplots(
        len(sweep.settings),
        len(rules),
        figsize=(4.6 * len(rules), 3.6 * len(sweep.settings)),
        squeeze=False,
    )
    curves = group(records, ["setting", "sweep_model", "x"])
    for row, setting in enumerate(sweep.settings):
        for col, rule in enumerate(rules):
            ax = axes[row][col]
            for model in sweep.models:
                if model != SOFTMAX and not model.startswith(rule + "-"):
                    continue
                curve = {s: v for (st, m, s), v in curves.items() if st == setting and m == model}
                label = SOFTMAX if model == SOFTMAX else model.split("-")[1]
                phi = phi_dim(model, sweep)
                label += f" ({phi})" if phi else " attention"
                style = {"color": "k", "ls": "--"} if model == SOFTMAX else {}
                errorbars(ax, curve, label=label, **style)
            all_s = sorted({s for grid in sweep.num_pairs[setting].values() for s in grid})
            ax.set(title=f"{setting}, {rule} rule", xlabel="stored pairs S", ylabel="final loss")
            ax.set_yscale("log")
            ax.set_ylim(sweep.stop_loss / 10, 1.0)
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_s, [str(s) for s in all_s])
            ax.axhline(sweep.stop_loss, color="grey", linewidth=0.5)
            if ax.get_legend_handles_labels()[0]:  # a panel of an unfinished sweep may be empty
                ax.legend(fontsize=7, title="feature map (dim phi)", title_fontsize=7)
    save_figure(fig, path)


def capacity_of(losses: dict[int, list[float]], grid: list[int], stop_loss: float) -> str | None:
    """The largest S of the grid whose median loss over seeds ended below 10 x stop_loss, with
    any smaller S that failed named beside it ("-" if none passed; ">= S" while a larger S is
    pending)."""
    recorded = [s for s in grid if s in losses]
    if not recorded:
        return None
    passed = [s for s in recorded if spread(losses[s])[0] <= stop_loss * 10]
    best = max(passed, default=None)
    pending = [s for s in grid if s not in losses and (best is None or s > best)]
    text = "-" if best is None else str(best)
    failed_below = [s for s in recorded if best is not None and s < best and s not in passed]
    if failed_below:
        text += f" ({', '.join(map(str, failed_below))} failed)"
    return f">= {text}" if pending and best is not None else text


def loss_cell(losses: list[float] | None, seeds: int) -> str | None:
    """Two significant digits (the losses span 1e-4 to 0.5): median (min-max) over seeds."""
    if not losses:
        return None
    middle, low, high = spread(losses)
    text = f"{middle:.2g}" if len(losses) == 1 else f"{middle:.2g} ({low:.2g}-{high:.2g})"
    return text + (f" [{len(losses)}/{seeds}]" if len(losses) < seeds else "")


def report(records: list[dict], points: list[Point], options) -> str:
    (_, main_file), *others = sweep_files(options)
    sweep = load_sweep(CONFIGS / NAME / main_file)
    records = [{**rec, "sweep_model": sweep_model(rec)} for rec in records]
    extra = "\n\n".join(other_sweep(records, prefix, file, options) for prefix, file in others)
    records = [rec for rec in records if rec.get("d_key") is None]  # the main sweep's
    plot(records, sweep, options.out / f"{NAME}.png")
    losses = group(records, ["setting", "sweep_model", "x"])
    seeds = len(sweep.seeds)
    sections = []
    for setting in sweep.settings:
        rows = []
        all_s = sorted({s for grid in sweep.num_pairs[setting].values() for s in grid})
        for model in sweep.models:
            mine = {s: v for (st, m, s), v in losses.items() if st == setting and m == model}
            own = pairs_of(sweep, setting, model)  # the model's own S grid
            rows.append(
                [model, phi_dim(model, sweep), capacity_of(mine, own, sweep.stop_loss)]
                + [loss_cell(mine.get(s), seeds) for s in all_s]
            )
        header = ["model", "dim phi", "largest S solved", *(f"S={s}" for s in all_s)]
        sections.append(f"### {setting}\n\n{markdown_table(header, rows)}")
    stopped = {}
    for rec in records:
        stopped[rec["stop_reason"]] = stopped.get(rec["stop_reason"], 0) + 1
    return f"""{_tuning.untuned_text(_tuning.rate_label(sweep.learning_rate))}

Setup: d_key = {sweep.d_key}, FAVOR+ with {sweep.favor_features} random features, batch
{sweep.batch_size}, Adam {sweep.learning_rate:g}, cells in their {sweep.form} form, seeds
{", ".join(map(str, sweep.seeds))}. A run stops when the loss on {sweep.eval_sequences} fresh
sequences (every {sweep.eval_every} steps) reaches {sweep.stop_loss:g}, after {sweep.patience}
evaluations without improvement, or at {sweep.max_steps} steps; reported is the loss on
{sweep.final_sequences} further fresh sequences. "Largest S solved": the largest S whose median
loss over seeds ended below {10 * sweep.stop_loss:g} (a smaller S that did not is named beside
it; until this definition, the table stopped at the first S that failed).
How runs ended: {", ".join(f"{k} {v}" for k, v in sorted(stopped.items()))}.

![final loss against S]({NAME}.png)

Final loss (1/2 squared error to the one-hot value, averaged over sequences), median over seeds
(min-max in brackets; [n/{seeds}] where seeds are missing):

{chr(10).join(s + chr(10) for s in sections)}
{extra}
"""


# Schlag, Irie & Schmidhuber 2021 (section 6.1, the Figure 2 setting: d_key 64), unique keys:
# the final losses of the training logs published with its code, as the page's notes quote them,
# for the sum rule with DPFP-1 (dim phi 128); "solved": the run reached its stop loss
PAPER_DK64 = {"sum-dpfp1": {100: "solved", 120: 0.0085, 160: 0.10}}
# the paper's training (section 6.1), which the sweeps here follow, its patience included
PAPER_TRAINING = (
    "Adam 1e-3, batch 32, stop at loss 1e-3 or after 10 evaluations without improvement"
)


def paper_table(losses: dict, sweep) -> str:
    """The paper's final losses at d_key 64 beside ours, S by S over both grids (the median
    over seeds, min-max), one table per model the paper reports; where and why we differ is in
    the page's notes."""
    tables = []
    for model, paper in PAPER_DK64.items():
        phi = phi_dim(model, sweep)
        ours = {s: v for (st, m, s), v in losses.items() if st == "unique" and m == model}
        grid = sorted({*paper, *pairs_of(sweep, "unique", model)})
        rows = [
            [
                "setting",
                "-",
                f"d_key 64, dim phi {phi}; {PAPER_TRAINING}",
                f"d_key {sweep.d_key}, dim phi {phi}; Adam {sweep.learning_rate:g}, batch"
                f" {sweep.batch_size}, stop at loss {sweep.stop_loss:g}, after {sweep.patience}"
                f" evaluations without improvement or at {sweep.max_steps} steps",
            ]
        ]
        rows += [
            [s, f"{s / phi:.2f}", paper.get(s), loss_cell(ours.get(s), len(sweep.seeds))]
            for s in grid
        ]
        header = ["S", "S / dim phi", f"paper: {model}, final loss", f"here: {model}, final loss"]
        tables.append(markdown_table(header, rows))
    return "\n\n".join(tables)


def other_sweep(records: list[dict], prefix: str, file: str, options) -> str:
    """A further sweep's section: its setup, plot and table."""
    sweep = load_sweep(CONFIGS / NAME / file)
    mine = [rec for rec in records if rec.get("d_key") == sweep.d_key]
    if not mine:
        return (
            f"### d_key {sweep.d_key} (`{file}`)\n\nNo point of this sweep is recorded yet. The"
            f" paper at this key size:\n\n{paper_table({}, sweep)}"
        )
    plot(mine, sweep, options.out / f"{NAME}_{prefix.strip('-')}.png")
    losses = group(mine, ["setting", "sweep_model", "x"])
    sections = []
    for setting in sweep.settings:
        rows = []
        for model in sweep.models:
            grid_s = pairs_of(sweep, setting, model)
            here = {s: v for (st, m, s), v in losses.items() if st == setting and m == model}
            phi = phi_dim(model, sweep)
            rows.append(
                [model, phi, capacity_of(here, grid_s, sweep.stop_loss)]
                + [
                    f"S={s} ({s / phi:g} phi): "
                    + (loss_cell(here.get(s), len(sweep.seeds)) or "pending")
                    for s in grid_s
                ]
            )
        width = max(len(row) for row in rows)
        rows = [row + [None] * (width - len(row)) for row in rows]
        header = ["model", "dim phi", "largest S solved", *(["S: loss"] * (width - 3))]
        sections.append(markdown_table(header, rows))
    ratios = [
        s / phi_dim(m, sweep)
        for st in sweep.settings
        for m in sweep.models
        for s in pairs_of(sweep, st, m)
    ]
    return f"""### d_key {sweep.d_key}, the paper's key size (`{file}`)

The same task and training as above at d_key = {sweep.d_key} (Schlag et al. 2021 use 64), the
sum rule with each feature map, S from {min(ratios):g} to {max(ratios):g} x dim phi, seeds
{", ".join(map(str, sweep.seeds))}.

![final loss against S, d_key {sweep.d_key}]({NAME}_{prefix.strip("-")}.png)

{chr(10).join(sections)}

The paper beside ours at this key size (Schlag, Irie & Schmidhuber 2021, section 6.1, the
setting of its Figure 2; the final losses of the training logs published with its code, as the
notes quote them), unique keys, S by S over both grids; "-" where one has no run at that S.
Where and why we differ: the notes, "At the paper's key size: where and why we differ".

{paper_table(losses, sweep)}"""


def sweep_model(rec: dict) -> str:
    """The sweep's name of a record's model: "RULE-MAP" or "softmax"."""
    return SOFTMAX if rec["model"] == "attention" else f"{rec['rule']}-{rec['feature_map']}"


def sweep_files(options) -> tuple[tuple[str, str], ...]:
    """(point name prefix, sweep file) of each sweep: the main one first."""
    return (
        (("", "quick.yaml"),) if options.quick else (("", "sweep.yaml"), ("dk64-", "dkey64.yaml"))
    )


def sweep_file(options) -> str:
    return sweep_files(options)[0][1]


EXPERIMENT = Experiment(
    NAME,
    KEYS,
    make_points,
    report,
    execute,
    title=TITLE,
    source=lambda options: f"sweep: `configs/experiments/{NAME}/{sweep_file(options)}`",
    cost_note=" (2-core CPU shared with other work)",
)
