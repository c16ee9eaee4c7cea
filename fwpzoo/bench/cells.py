"""`fwpzoo bench cells`: every cell family in every form, forward and forward + backward.

    fwpzoo bench cells [--families delta_rule,...] [--forms recurrent,chunkwise,associative]
                       [--lengths 512,2048,8192] [--chunk-sizes 64] [--repeats 5]
                       [--batch 4] [--heads 4] [--key-dim 64] [--value-dim 64] [--sub-steps 2]
                       [--decay scalar|per_key] [--dtype float32|bfloat16]
                       [--inner-batch 16] [--fast-net linear|mlp|swiglu]
                       [--inner-optimizer sgd|momentum|muon] [--inner-window 1]
                       [--memory-limit-gb 8] [--peers] [--peer-length 2048]
                       [--cpu-devices N] [--out FILE.md]
    fwpzoo bench cells --topology v5e:2x2 [the shape options] [--out FILE.md]
    python -m fwpzoo.bench.cells ...          (the same)

--topology compiles every family's chunkwise forward and forward + backward ahead of time for
that TPU topology (libtpu from the `tpu` extra) and reports the memory one device holds, without
running them (bench/topology.py).

For each family and length T, all forms are compiled and then timed in alternation (--repeats
rounds, each call timed right after an untimed one, medians), together with a 1024^3 float32
matmul, so the load of a shared machine falls on all of them alike; the associative form, which
allocates gigabytes per call, takes its rounds separately, right after. Inputs are float32
(q, k, v in --dtype: bfloat16 inputs keep float32 gates and states, as the cells do) with
L2-normalised keys, beta in (0, 1) and log_alpha near 0; gradients are taken wrt q, k, v and
every gate. --decay per_key gives a key axis ([B, T, H, K]) to the decays that take either shape
(gated_linear_attn, gated_delta_rule, delta_product); the other gates keep theirs.

The deep cells (cells/deep) take the model fields their OPTIONS name from --inner-batch (tokens
per inner step; default 16, TTT's mini-batch: with one token per step TTT-Linear's update is
nonlinear in the state and no chunk can be computed in parallel), --fast-net, --inner-optimizer
and --inner-window, the same values in every form, and only the gates those options take.

    speedup     the recurrent form's time over the form's, same direction (fwd or fwd+bwd)
    efficiency  (chunk-algorithm FLOPs / time) / (the matmul's FLOP/s measured in the same
                rounds); FLOPs per token and head with chunk C: 6CK + 4CV + 6KV for the rules
                with a quadratic loss (per sub-step for delta_product), 2CK + 2CV + 4KV for
                the linear-loss (Hebbian) ones, 8CK + 8CV + 8KV for dplr's affine step (four
                per-key score matrices), 2CK^2 + 2K^3/3 + 2K^2 + 2CK + 2CV + 6KV for mesa's exact
                minimiser (every token's K x K system formed and Cholesky-solved);
                forward + backward counts 3x the forward; none for the deep cells, whose cost
                depends on the fast net and the optimiser
    tokens/s    B T / time of the family's fastest form, and its ratio to delta_rule's fastest
                at the same T (when delta_rule is among --families), each time first divided
                by the time of the matmul in its own rounds (the families are timed one after
                another, so this cancels a change of load between them)

--out FILE.md writes the report (hand notes after its notes marker are kept), the raw numbers
as FILE.json and a plot of the chunkwise speedups as FILE.png.

A form whose compiled footprint (XLA's memory analysis) exceeds --memory-limit-gb is skipped
with that reason in the table instead of being run.

The host CPU is split into one device per core (--cpu-devices N: into N) and every form runs
data parallel over them, the batch split as `fwpzoo train` splits it; with several devices the
matmul's FLOP/s is the faster of one device and all of them.

--peers also times the pure-JAX chunked delta rule of jax-linear-attention
(linear_attention("deltanet", impl="auto")) and of deltanet-tpu
(chunk_delta_rule(fallback_scan=True), K = V = 128 only) against delta_rule chunkwise in this
process; those packages are not dependencies of fwpzoo (they need Python 3.12 and jax 0.11.2)
and are imported only then.
"""

import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from fwpzoo import cells
from fwpzoo.bench._common import (
    BenchArgs,
    alternating_medians,
    footprint_bytes,
    int_list,
    machine,
    positive_float,
    positive_int,
)
from fwpzoo.cells import _spec
from fwpzoo.cells.deep import inner
from fwpzoo.config import ConfigError
from fwpzoo.layers.norms import l2_normalize
from fwpzoo.reports import machine_line, markdown_table, save_figure, subplots, write_page
from fwpzoo.train.sharding import batch_sharded, make_mesh, use_cpu_devices

GATES = 8  # at most this many gates per family get their own random key
DECAYS = ("scalar", "per_key")
DTYPES = ("float32", "bfloat16")
MATMUL_SIZE = 1024
TARGET = {"speedup": 6.0, "efficiency": 0.35, "peers": 2.0}  # delta_rule fwd+bwd, T = 2048
# every other family: chunkwise fwd+bwd over its own recurrent form at T = 2048; mesa solves a
# K x K system per token in every form, so its chunks can gain less
RULE_TARGET, RULE_TARGETS = 4.0, {"mesa": 2.0}


@dataclass(frozen=True)
class Options:
    families: tuple[str, ...] = tuple(cells.CELLS)
    forms: tuple[str, ...] = cells.FORMS
    lengths: tuple[int, ...] = (512, 2048, 8192)
    chunk_sizes: tuple[int, ...] = (64,)
    repeats: int = 5
    batch: int = 4
    heads: int = 4
    key_dim: int = 64
    value_dim: int = 64
    sub_steps: int = 2
    decay: str = "scalar"  # scalar | per_key: log_alpha's shape where the family takes either
    memory_limit_gb: float = 8.0
    peers: bool = False
    peer_length: int = 2048
    cpu_devices: int | None = None  # None: one per core (the largest count dividing --batch)
    seed: int = 0
    topology: str | None = None  # compile for this TPU topology instead of timing (topology.py)
    dtype: str = "float32"  # of q, k, v; gates and states stay float32 (the cell contract)
    # the deep cells' model fields (a cell takes those its OPTIONS name)
    inner_batch: int = 16
    fast_net: str = "linear"
    inner_optimizer: str = "sgd"
    inner_window: int = 1


def name_list(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


name_list.__name__ = "comma-separated list of names"


def check_names(names: tuple[str, ...], valid: tuple[str, ...], what: str) -> None:
    for name in names:
        if name not in valid:
            raise ConfigError(f"unknown {what} {name!r}; valid: {', '.join(valid)}")


def parse_options(argv: list[str]) -> tuple[Options, Path | None]:
    parser = BenchArgs(prog="fwpzoo bench cells")
    parser.add_argument("--families", type=name_list)
    parser.add_argument("--forms", type=name_list)
    parser.add_argument("--lengths", type=int_list)
    parser.add_argument("--chunk-sizes", type=int_list)
    for name in (
        "repeats", "batch", "heads", "key_dim", "value_dim", "sub_steps", "peer_length",
        "cpu_devices", "inner_batch", "inner_window",
    ):  # fmt: skip
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int)
    parser.add_argument("--decay", type=str)
    parser.add_argument("--memory-limit-gb", type=positive_float)
    parser.add_argument("--peers", action="store_true", default=None)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--topology", type=str)
    parser.add_argument("--dtype", type=str)
    parser.add_argument("--fast-net", type=str)
    parser.add_argument("--inner-optimizer", type=str)
    parser.add_argument(
        "--out", type=Path, help="write the markdown report here (and FILE.json, FILE.png)"
    )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    options = Options(**{k: v for k, v in args.items() if v is not None})
    check_names(options.families, tuple(cells.CELLS), "family")
    check_names(options.forms, cells.FORMS, "form")
    check_names((options.decay,), DECAYS, "decay")
    check_names((options.dtype,), DTYPES, "dtype")
    check_names((options.fast_net,), inner.FAST_NETS, "fast net")
    check_names((options.inner_optimizer,), inner.OPTIMIZERS, "inner optimizer")
    check_inner_batch(options)
    return options, out


def check_inner_batch(options: Options) -> None:
    """A chunk holds whole inner mini-batches: --inner-batch must divide every chunk size when a
    family that takes it runs chunkwise."""
    takes = any("inner_batch" in cell_options(family, options) for family in options.families)
    if not takes or "chunkwise" not in options.forms:
        return
    for chunk in options.chunk_sizes:
        if chunk % options.inner_batch:
            raise ConfigError(
                f"--inner-batch {options.inner_batch} must divide every --chunk-sizes value, "
                f"and {chunk} is not a multiple of it"
            )


def cell_options(family: str, options: Options) -> dict:
    """The static arguments of the family's forms that the bench sets: {argument: value} for
    the model fields its OPTIONS name (the deep cells; {} for the others)."""
    fields = {
        "inner_batch": options.inner_batch,
        "fast_net": options.fast_net,
        "inner_optimizer": options.inner_optimizer,
        "inner_window": options.inner_window,
    }
    named = getattr(cells.get(family), "OPTIONS", {})
    return {argument: fields[field] for argument, field in named.items() if field in fields}


def cell_form(family: str, form: str, options: Options) -> Callable:
    """The family's form with the bench's options bound: (q, k, v, **gates) -> (o, state)."""
    fn = getattr(cells.get(family), form)
    bound = cell_options(family, options)
    return lambda q, k, v, **gates: fn(q, k, v, **gates, **bound)


# inputs and FLOPs ------------------------------------------------------------------------------


# A gate drawn for its range (fwpzoo.cells._spec.RANGES) from a standard normal x: beta and
# unit-range gates in (0, 1), log decays near 0 (factors around 0.98), positive ones by softplus,
# directions as unit vectors.
GATE_DRAWS = {
    _spec.BETA: jax.nn.sigmoid,
    _spec.UNIT: lambda x: 0.5 * jax.nn.sigmoid(x),
    _spec.LOG_DECAY: lambda x: jax.nn.log_sigmoid(4.0 + x),
    _spec.POSITIVE: jax.nn.softplus,
    _spec.REAL: lambda x: x,
    _spec.NEGATIVE_UNIT: lambda x: jax.nn.sigmoid(x) - 1.0,
    _spec.DIRECTION: l2_normalize,
}


def cell_inputs(family: str, T: int, options: Options, *, key_dim=None, value_dim=None):
    """(q, k, v in options.dtype, gates in float32): L2-normalised keys, every gate of the
    family's GATE_SPECS (the optional ones too) drawn for its range and shape (per key where a
    decay may take either shape and options.decay is per_key, scalar otherwise). Unit-range
    gates stay below 1/2, so that beta * eta < 1/2 keeps the momentum rule's steps stable.
    Gates that name `times` are tied as the FWP layer ties them (dplr: b = -rate * a, a a unit
    direction, RWKV-7's transition; free ones would make it expand)."""
    module = cells.get(family)
    B, H = options.batch, options.heads
    K, V = key_dim or options.key_dim, value_dim or options.value_dim
    N = options.sub_steps
    sub = (N,) if module.OBJECTIVE.step == _spec.GRADIENT_STEPS else ()
    ks = jax.random.split(jax.random.fold_in(jax.random.key(options.seed), T), 3 + GATES)
    q = jax.random.normal(ks[0], (B, T, H, K))  # [B, T, H, K]
    k = jax.random.normal(ks[1], (B, T, H, *sub, K))  # [B, T, H, (N,) K]
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, *sub, V))  # [B, T, H, (N,) V]
    gates = {}
    per_key = options.decay == "per_key"  # for the gates that take either shape
    specs_for = getattr(module, "gate_specs", None)  # gates that depend on the options
    specs = module.GATE_SPECS if specs_for is None else specs_for(**cell_options(family, options))
    for key, gate in zip(ks[3:], module.GATE_SPECS, strict=False):
        if gate not in specs:
            continue
        shape = gate.head_shape(H, K, N, per_key, V)
        shape = shape if gate.shape == _spec.STATIC else (B, T, *shape)
        gates[gate.name] = GATE_DRAWS[gate.range](jax.random.normal(key, shape))
    gates = _spec.tie(specs, gates, k)
    return *(x.astype(options.dtype) for x in (q, k, v)), gates


def chunk_flops(family: str, T: int, chunk: int, options: Options) -> float | None:
    """Forward FLOPs of the chunk algorithm under the cost model in the module docstring; None
    for the deep cells (an inner optimiser's step: no cost model)."""
    K, V = options.key_dim, options.value_dim
    objective = cells.get(family).OBJECTIVE
    if objective.step == _spec.INNER:
        return None
    steps = T * (options.sub_steps if objective.step == _spec.GRADIENT_STEPS else 1)
    C = min(chunk, steps)
    if objective.step == _spec.AFFINE:  # dplr: four per-key score matrices
        per_step = 8 * C * K + 8 * C * V + 8 * K * V
    elif objective.step == _spec.MINIMISER:  # mesa: every token's K x K system formed and solved
        per_step = 2 * C * K * K + 2 * K**3 // 3 + 2 * K * K + 2 * C * K + 2 * C * V + 6 * K * V
    elif objective.loss_fn is not _spec.negative_correlation:
        per_step = 6 * C * K + 4 * C * V + 6 * K * V
    else:
        per_step = 2 * C * K + 2 * C * V + 4 * K * V
    return float(per_step * steps * options.batch * options.heads)


# compiling and timing --------------------------------------------------------------------------


def forward_fn(form_fn: Callable) -> Callable:
    return lambda q, k, v, gates: form_fn(q, k, v, **gates)


def forward_backward_fn(form_fn: Callable) -> Callable:
    """Gradients wrt q, k, v and every gate of sum(o) + sum(final state)."""

    def loss(q, k, v, gates):
        o, state = form_fn(q, k, v, **gates)
        return jnp.sum(o) + sum(jnp.sum(part) for part in jax.tree.leaves(state))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


def compiled_run(fn: Callable, args: tuple, limit_bytes: float) -> tuple[Callable | None, str]:
    """(zero-argument run, "") or (None, why it is skipped)."""
    compiled = jax.jit(fn).lower(*args).compile()
    held = footprint_bytes(compiled)
    if held is not None and held > limit_bytes:
        return None, f"skipped: needs {gigabytes(held)} (limit {gigabytes(limit_bytes)})"
    return (lambda: compiled(*args)), ""


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def matmul_runs() -> dict[str, Callable]:
    """The 1024^3 matmul on one device and, where there are several, with its rows split over
    all of them: the machine's matmul rate is the faster of the two."""
    x = jax.random.normal(jax.random.key(0), (MATMUL_SIZE, MATMUL_SIZE))
    one = jax.jit(jnp.matmul).lower(x, x).compile()
    runs = {"matmul": lambda: one(x, x)}
    if jax.device_count() > 1:
        rows = spread(x)
        split = jax.jit(jnp.matmul).lower(rows, x).compile()
        runs["matmul over devices"] = lambda: split(rows, x)
    return runs


def spread(tree):
    """Every array of tree with its batch (leading) axis split over all devices."""
    if jax.device_count() == 1:
        return tree
    return jax.device_put(tree, batch_sharded(make_mesh()))


def variants(family: str, options: Options) -> dict[str, Callable]:
    """Form label -> form function; chunkwise once per chunk size."""
    module = cells.get(family)
    out = {}
    for form in (form for form in options.forms if hasattr(module, form)):
        fn = cell_form(family, form, options)
        if form == "chunkwise":
            for chunk in options.chunk_sizes:
                out[f"chunkwise C={chunk}"] = lambda *a, fn=fn, c=chunk, **g: fn(
                    *a, chunk_size=c, **g
                )
        else:
            out[form] = fn
    return out


def measure_group(family: str, T: int, options: Options) -> list[dict]:
    """All forms of one family at one length, timed side by side."""
    args = spread(cell_inputs(family, T, options))
    limit = options.memory_limit_gb * 1e9
    matmuls = matmul_runs()
    runs, skipped = dict(matmuls), {}
    for label, fn in variants(family, options).items():
        for direction, make in (("fwd", forward_fn), ("fwd+bwd", forward_backward_fn)):
            run, why = compiled_run(make(fn), args, limit)
            if run is None:
                skipped[(label, direction)] = why
            else:
                runs[(label, direction)] = run
    # The associative form allocates gigabytes per call, which slows whatever runs next: it is
    # timed in its own rounds after the others instead of taking turns with them.
    separate = {key: run for key, run in runs.items() if key[0] == "associative"}
    seconds = alternating_medians(
        {k: r for k, r in runs.items() if k not in separate}, options.repeats
    )
    seconds |= alternating_medians(separate, options.repeats)
    flops_per_s = max(2 * MATMUL_SIZE**3 / seconds[name] for name in matmuls)
    rows = []
    for label in variants(family, options):
        row = {"family": family, "T": T, "form": label, "matmul_flops_per_s": flops_per_s}
        for direction in ("fwd", "fwd+bwd"):
            row[direction] = seconds.get((label, direction))
            row[direction + " skipped"] = skipped.get((label, direction))
        rows.append(row)
    add_ratios(rows, options)
    return rows


def add_ratios(rows: list[dict], options: Options) -> None:
    """Speedup over the recurrent form and, for chunkwise, efficiency."""
    recurrent = next((row for row in rows if row["form"] == "recurrent"), None)
    for row in rows:
        for direction, multiple in (("fwd", 1), ("fwd+bwd", 3)):
            seconds = row[direction]
            base = recurrent and recurrent[direction]
            row[direction + " speedup"] = base / seconds if base and seconds else None
            row[direction + " efficiency"] = None
            if seconds and row["form"].startswith("chunkwise"):
                chunk = int(row["form"].split("=")[1])
                flops = chunk_flops(row["family"], row["T"], chunk, options)
                if flops is not None:
                    efficiency = multiple * flops / seconds / row["matmul_flops_per_s"]
                    row[direction + " efficiency"] = efficiency


# the peers -------------------------------------------------------------------------------------


def peer_functions(key_dim: int) -> dict[str, Callable]:
    """name -> f(q, k, v, beta) -> (o, state) for the delta rule, each implementation's own."""
    try:
        from deltanet_tpu import chunk_delta_rule
        from jla.ops import linear_attention
    except ImportError as error:
        raise ConfigError(
            f"--peers needs jax-linear-attention and deltanet-tpu installed ({error})"
        ) from None

    peers = {
        "jax-linear-attention chunked": lambda q, k, v, beta: linear_attention(
            "deltanet", q, k, v, beta=beta, scale=1.0, output_final_state=True, impl="auto"
        )
    }
    if key_dim == 128:  # its only supported head size
        peers["deltanet-tpu fallback_scan"] = lambda q, k, v, beta: chunk_delta_rule(
            q, k, v, beta, scale=1.0, output_final_state=True, fallback_scan=True,
            precision="fp32",
        )  # fmt: skip
    return peers


def measure_peers(options: Options) -> list[dict]:
    """delta_rule chunkwise against the peers at K = V = 64 and 128, one process, alternating."""
    rows = []
    T = options.peer_length
    for dim in (64, 128):
        q, k, v, gates = cell_inputs("delta_rule", T, options, key_dim=dim, value_dim=dim)
        args = (q, k, v, gates["beta"])
        contenders = {
            f"fwpzoo chunkwise C={chunk}": lambda q, k, v, beta, c=chunk: cells.get(
                "delta_rule"
            ).chunkwise(q, k, v, beta=beta, chunk_size=c)
            for chunk in options.chunk_sizes
        }
        contenders.update(peer_functions(dim))
        runs = {}
        for name, fn in contenders.items():
            runs[(name, "fwd")] = jax.jit(fn).lower(*args).compile()
            grad = jax.grad(lambda *a, fn=fn: sum(jnp.sum(x) for x in fn(*a)), argnums=(0, 1, 2, 3))
            runs[(name, "fwd+bwd")] = jax.jit(grad).lower(*args).compile()
        seconds = alternating_medians(
            {key: (lambda c=c, args=args: c(*args)) for key, c in runs.items()}, options.repeats
        )
        for name in contenders:
            rows.append(
                {"K": dim, "T": T, "implementation": name}
                | {direction: seconds[(name, direction)] for direction in ("fwd", "fwd+bwd")}
            )
    return rows


# the report ------------------------------------------------------------------------------------


def measure(options: Options, progress: bool = True) -> dict:
    result = {"options": asdict(options), "machine": machine(), "load_before": os.getloadavg()[0]}
    groups = [(family, T) for family in options.families for T in options.lengths]
    bar = tqdm(total=len(groups) + options.peers, file=sys.stderr, disable=not progress)
    result["rows"] = []
    for family, T in groups:
        bar.set_description(f"{family} T={T}")
        result["rows"] += measure_group(family, T, options)
        bar.update()
    if options.peers:
        bar.set_description(f"peers T={options.peer_length}")
        result["peers"] = measure_peers(options)
        bar.update()
    bar.close()
    result["load_after"] = os.getloadavg()[0]
    return result


def fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def timing_cells(row: dict, direction: str) -> list[str]:
    if row[direction] is None:
        return [row[direction + " skipped"], "-", "-"]
    return [
        fmt(1e3 * row[direction], ".1f"),
        fmt(row[direction + " speedup"], ".2f") + ("x" if row[direction + " speedup"] else ""),
        fmt(row[direction + " efficiency"], ".2f"),
    ]


def forms_table(rows: list[dict]) -> str:
    header = ["family", "T", "form", "fwd ms", "fwd speedup", "fwd eff.", "fwd+bwd ms"]
    header += ["fwd+bwd speedup", "fwd+bwd eff."]
    cells_ = [
        [row["family"], row["T"], row["form"], *timing_cells(row, "fwd")]
        + timing_cells(row, "fwd+bwd")
        for row in rows
    ]
    return markdown_table(header, cells_, align="lrlrrrrrr")


def peers_table(rows: list[dict]) -> str:
    header = ["K = V", "implementation", "fwd ms", "fwd+bwd ms", "fwd+bwd vs fwpzoo"]
    cells_ = []
    for row in rows:
        ours = min(
            r["fwd+bwd"] for r in rows if r["K"] == row["K"] and r["implementation"][:6] == "fwpzoo"
        )
        cells_.append(
            [
                row["K"],
                row["implementation"],
                f"{1e3 * row['fwd']:.1f}",
                f"{1e3 * row['fwd+bwd']:.1f}",
                f"{row['fwd+bwd'] / ours:.2f}x",
            ]
        )
    return markdown_table(header, cells_, align="rlrrr")


def fastest(rows: list[dict], family: str, T: int, direction: str) -> dict | None:
    """The row of the family's fastest form at T in direction ("fwd" or "fwd+bwd")."""
    timed_rows = [r for r in rows if (r["family"], r["T"]) == (family, T) and r[direction]]
    return min(timed_rows, key=lambda r: r[direction], default=None)


def throughput_table(result: dict) -> str:
    """Tokens/s (B T / seconds) of each family's fastest form in each direction, and that
    against delta_rule's fastest at the same T where it was measured. The groups are timed one
    after another, so the ratio divides each group's seconds by the seconds of the matmul timed
    in the same rounds: a change of load between groups cancels."""
    rows, batch = result["rows"], result["options"]["batch"]
    header = ["family", "T", "fwd form", "fwd tokens/s", "fwd vs delta_rule", "fwd+bwd form"]
    header += ["fwd+bwd tokens/s", "fwd+bwd vs delta_rule"]
    table = []
    for family in result["options"]["families"]:
        for T in result["options"]["lengths"]:
            line = [family, T]
            for direction in ("fwd", "fwd+bwd"):
                best = fastest(rows, family, T, direction)
                delta = fastest(rows, "delta_rule", T, direction)
                if best is None:
                    line += [None, None, None]
                    continue
                work = lambda r, d=direction: r[d] * r["matmul_flops_per_s"]  # noqa: E731
                ratio = f"{work(delta) / work(best):.2f}x" if delta else None
                line += [best["form"], f"{batch * T / best[direction]:,.0f}", ratio]
            table.append(line)
    return markdown_table(header, table, align="lrlrrlrr")


def verdict(result: dict) -> list[str]:
    """The targets for delta_rule fwd+bwd at T = 2048, where this run measured them."""
    rows = [r for r in result["rows"] if r["family"] == "delta_rule" and r["T"] == 2048]
    chunked = [r for r in rows if r["form"].startswith("chunkwise") and r["fwd+bwd"]]
    lines = []
    if chunked and any(r["form"] == "recurrent" and r["fwd+bwd"] for r in rows):
        best = min(chunked, key=lambda r: r["fwd+bwd"])
        speedup, eff = best["fwd+bwd speedup"], best["fwd+bwd efficiency"]
        met = speedup >= TARGET["speedup"] and eff >= TARGET["efficiency"]
        lines.append(
            f"delta_rule, T=2048, fwd+bwd, best chunkwise ({best['form']}): {speedup:.2f}x the "
            f"recurrent form, efficiency {eff:.2f} (targets {TARGET['speedup']:g}x and "
            f"{TARGET['efficiency']:g}: {'met' if met else 'NOT met'})."
        )
    for family in dict.fromkeys(r["family"] for r in result["rows"] if r["T"] == 2048):
        speedup = best_chunkwise_speedup(result, family, 2048, "fwd+bwd")
        if family == "delta_rule" or speedup is None:
            continue
        target = RULE_TARGETS.get(family, RULE_TARGET)
        lines.append(
            f"{family}, T=2048, fwd+bwd, best chunkwise: {speedup:.2f}x the recurrent form "
            f"(target {target:g}x: {'met' if speedup >= target else 'NOT met'})."
        )
    for dim in sorted({r["K"] for r in result.get("peers", [])}):
        rows = [r for r in result["peers"] if r["K"] == dim]
        ours = min(r["fwd+bwd"] for r in rows if r["implementation"].startswith("fwpzoo"))
        theirs = min(r["fwd+bwd"] for r in rows if not r["implementation"].startswith("fwpzoo"))
        met = theirs / ours >= TARGET["peers"]
        lines.append(
            f"K = V = {dim}: the fastest peer takes {theirs / ours:.2f}x fwpzoo's fwd+bwd time "
            f"(target {TARGET['peers']:g}x: {'met' if met else 'NOT met'})."
        )
    return lines


def best_chunkwise_speedup(result: dict, family: str, T: int, direction: str) -> float | None:
    """The highest speedup over the recurrent form among the chunkwise rows of (family, T) in
    direction "fwd" or "fwd+bwd"; None where none was measured."""
    ratios = [
        row[direction + " speedup"]
        for row in result["rows"]
        if (row["family"], row["T"]) == (family, T) and row["form"].startswith("chunkwise")
    ]
    return max((ratio for ratio in ratios if ratio), default=None)


def prefill_summary(result: dict) -> list[str]:
    """Where the best chunkwise forward (prefill) beats the recurrent forward and where not."""
    wins, losses = [], []
    for family in result["options"]["families"]:
        for T in result["options"]["lengths"]:
            best = best_chunkwise_speedup(result, family, T, "fwd")
            if best is not None:
                (wins if best >= 1 else losses).append(f"{family} T={T} ({best:.2f}x)")
    if not wins and not losses:
        return []
    line = f"Prefill (forward only), best chunkwise vs recurrent: faster at {len(wins)} of "
    line += f"{len(wins) + len(losses)} points"
    return [line + (f"; slower at {', '.join(losses)}." if losses else ".")]


def plot(result: dict, path: Path) -> None:
    """fwd and fwd+bwd speedup of the best chunkwise form over the recurrent one, per family."""
    lengths = result["options"]["lengths"]
    fig, axes = subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, direction in zip(axes, ("fwd", "fwd+bwd"), strict=True):
        for family in result["options"]["families"]:
            best = [best_chunkwise_speedup(result, family, T, direction) for T in lengths]
            ax.plot(lengths, [float("nan") if x is None else x for x in best], "o-", label=family)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set(xlabel="T (tokens)", title=f"chunkwise over recurrent, {direction}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(T) for T in lengths])
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("speedup")
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


def deep_line(options: dict) -> list[str]:
    """The deep cells' options, where one of them ran."""
    if not any(cell_options(f, Options()) for f in options["families"]):
        return []
    return [
        "",
        f"Deep cells: inner_batch {options['inner_batch']} (ttt_linear's mini_batch), "
        f"fast_net {options['fast_net']}, inner_optimizer {options['inner_optimizer']}, "
        f"inner_window {options['inner_window']}.",
    ]


def markdown(result: dict, command: str) -> str:
    options, info = result["options"], result["machine"]
    rates = [row["matmul_flops_per_s"] for row in result["rows"]]
    lines = [
        "## Results",
        "",
        f"Command: `{command}`",
        "",
        f"{machine_line(result)} {MATMUL_SIZE}^3 float32 matmul: median "
        f"{statistics.median(rates) / 1e9:.0f} GFLOP/s over the groups"
        + (" (the faster of one device and all of them)." if info["devices"] > 1 else "."),
        "",
        f"Shapes: B={options['batch']}, H={options['heads']}, K={options['key_dim']}, "
        f"V={options['value_dim']}, delta_product N={options['sub_steps']} sub-steps; "
        f"median of {options['repeats']} alternating rounds after a warm-up.",
        *deep_line(options),
        "",
        forms_table(result["rows"]),
        "",
        "Tokens/s of each family's fastest form:",
        "",
        throughput_table(result),
    ]
    if "peers" in result:
        lines += [
            "",
            f"### Peers: delta rule, B={options['batch']}, H={options['heads']}, "
            f"T={options['peer_length']}, one process",
            "",
            peers_table(result["peers"]),
        ]
    return "\n".join([*lines, "", *verdict(result), *prefill_summary(result), ""])


def write_report(result: dict, report: str, out: Path) -> None:
    """out (keeping notes after NOTES_MARKER), the raw numbers in out with suffix .json and the
    plot with suffix .png."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Benchmark: the cell forms\n\n" + (__doc__ or "")
    figure = out.with_suffix(".png")
    write_page(
        out, f"{header.rstrip()}\n\n![speedups over the recurrent form]({figure.name})\n\n{report}"
    )
    plot(result, figure)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")


def use_devices(options: Options) -> None:
    """Splits the CPU as asked (one device per core by default), before anything runs, and
    checks the batch splits evenly."""
    use_cpu_devices(options.cpu_devices, {"--batch": options.batch})
    if options.batch % jax.device_count():
        raise ConfigError(
            f"--batch {options.batch} is not divisible by the {jax.device_count()} devices"
        )


def main(argv: list[str]) -> int:
    options, out = parse_options(argv)
    if options.topology is not None:
        return compile_only(options, out, argv)
    use_devices(options)
    result = measure(options)
    report = markdown(result, " ".join(["fwpzoo bench cells", *argv]))
    print(report)
    if out is not None:
        write_report(result, report, out)
    return 0


def with_chunk(chunkwise, chunk):
    """The chunkwise form at one chunk size, (q, k, v, **gates) -> (o, state)."""
    return lambda q, k, v, **gates: chunkwise(q, k, v, chunk_size=chunk, **gates)


def topology_cases(options: Options):
    """(family, T, chunk, form, inputs) for every family, length and chunk size, built lazily."""
    for family in options.families:
        chunkwise = cell_form(family, "chunkwise", options)  # the deep cells' options bound
        for T in options.lengths:
            for chunk in options.chunk_sizes:
                inputs = cell_inputs(family, T, options)
                yield family, T, chunk, with_chunk(chunkwise, chunk), inputs


def compile_only(options: Options, out: Path | None, argv: list[str]) -> int:
    """--topology: every family's chunkwise form compiled for that TPU topology, nothing run."""
    from fwpzoo.bench import topology

    cases = topology_cases(options)
    directions = {"fwd": forward_fn, "fwd+bwd": forward_backward_fn}
    rows = topology.compile_rows(
        cases, directions, options.topology, options.batch, progress=tqdm.write
    )
    report = topology.markdown(rows, options.topology, " ".join(["fwpzoo bench cells", *argv]))
    print(report)
    if out is not None:
        out.write_text(report)
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    from fwpzoo.cli import main as cli_main

    sys.exit(cli_main(["bench", "cells", *sys.argv[1:]]))
