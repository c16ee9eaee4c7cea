"""`fwpzoo bench model`: DeltaNet against a softmax transformer of the same size.

    fwpzoo bench model [--lengths 512,2048,8192] [--tokens-per-step 8192] [--repeats 3]
                       [--d-model 256] [--num-heads 4] [--num-layers 2]
                       [--attention-block-size 256] [--cpu-devices N] [--out DIR]

Both models share d_model, layers, heads and the SwiGLU MLP; only the mixer differs (the FWP
mixer with the delta_rule cell in its chunkwise form, or causal softmax attention). The
transformer trains with each of its attention kernels (model.attention_kernel): `dense` (the
masked [T, T] square), `dot_product` (jax.nn.dot_product_attention, causal) and `blockwise`
(blocks of --attention-block-size tokens, those wholly after their queries skipped), so DeltaNet
is compared with the fastest. At every length T it measures, side by side:

    training   tokens/s of the project's jitted train step (AdamW, clipping), B = tokens / T, so
               every step sees the same number of tokens, data parallel over the largest number
               of devices (one per core by default, --cpu-devices N) that divides B; peak memory
               is XLA's compiled footprint of that step (temp + arguments + outputs - aliased),
               which is what a device must hold, not the process RSS (all models live in one
               process)
    decoding   ms/token of decode_step (batch 1, one device) after a prefill of T tokens, run as
               one jitted lax.scan of --decode-tokens steps, so the time is the model's and not
               dispatch's (every attention kernel decodes the same way, from the KV cache)
    kernels    one layer's mixer kernel at the longest T (forward and backward, training
               shapes): each attention kernel and the delta_rule chunkwise cell, each with its
               share of its model's train step
    programmers  the same training and decoding measurements for the FWPs whose programmer
               reads its own past, the Recurrent DeltaNet (rdn) and the SRWM, side by side with
               DeltaNet at the same width (softmax features; their scans are sequential)

Every timing is the median of --repeats turns in which the runs alternate, each run called twice
per turn and timed the second time (so the load of a shared machine falls on all models alike,
and neither pays for memory the other released). Prints the report as markdown;
--out DIR also writes DIR/model.md (hand notes after NOTES_MARKER are kept), model.json, model.png.
"""

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from fwpzoo.bench._common import (
    BenchArgs,
    alternating_medians,
    footprint_bytes,
    int_list,
    machine,
    positive_int,
)
from fwpzoo.cells import delta_rule
from fwpzoo.config import ConfigError, TrainConfig
from fwpzoo.layers.attention import attend, blockwise_attention, dot_product_attention
from fwpzoo.models import ModelConfig, build_model
from fwpzoo.reports import machine_line, markdown_table, save_figure, subplots, write_page
from fwpzoo.train.optim import make_optimizer
from fwpzoo.train.sharding import (
    batch_sharded,
    dividing_count,
    replicated,
    use_cpu_devices,
)
from fwpzoo.train.state import split_model
from fwpzoo.train.steps import make_train_step

# "transformer" is the dense kernel, the layer's default; the others name their kernel
TRANSFORMERS = ("transformer", "transformer_dot_product", "transformer_blockwise")
MODELS = ("deltanet", *TRANSFORMERS)  # trained
DECODERS = ("deltanet", "transformer")  # decoding reads the KV cache whatever the kernel
PROGRAMMERS = ("rdn", "srwm")  # measured against DeltaNet in their own section
LABELS = {
    "deltanet": "DeltaNet",
    "transformer": "transformer, dense",
    "transformer_dot_product": "transformer, dot_product",
    "transformer_blockwise": "transformer, blockwise",
    "rdn": "Recurrent DeltaNet",
    "srwm": "SRWM",
}
TARGET_SPEEDUP = 3.0  # DeltaNet training tokens/s over the fastest transformer's at the longest T


@dataclass(frozen=True)
class Options:
    lengths: tuple[int, ...] = (512, 2048, 8192)
    tokens_per_step: int = 8192
    d_model: int = 256
    num_heads: int = 4
    num_layers: int = 2
    chunk_size: int = 64
    vocab_size: int = 256
    repeats: int = 3
    decode_tokens: int = 128
    attention_block_size: int = 256
    cpu_devices: int | None = None  # None: one per core
    seed: int = 0


def parse_options(argv: list[str]) -> tuple[Options, Path | None]:
    parser = BenchArgs(prog="fwpzoo bench model")
    defaults = Options()
    parser.add_argument("--lengths", type=int_list, default=defaults.lengths)
    for name in ("tokens_per_step", "d_model", "num_heads", "num_layers", "chunk_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int)
    for name in ("vocab_size", "repeats", "decode_tokens", "attention_block_size", "cpu_devices"):
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, help="write model.md, model.json and model.png here")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    options = Options(**{k: v for k, v in args.items() if v is not None})
    for T in options.lengths:
        if options.tokens_per_step % T:
            raise ConfigError(
                f"--tokens-per-step {options.tokens_per_step} is not a multiple of length {T}"
            )
    try:
        for name in (*MODELS, *PROGRAMMERS):
            model_config(name, options)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return options, out


def model_config(name: str, options: Options) -> ModelConfig:
    """The two contenders: the same blocks and sizes around a different mixer."""
    shared = dict(d_model=options.d_model, num_heads=options.num_heads)
    if name == "deltanet":
        mixers = ("fwp",) * options.num_layers
        return ModelConfig(
            mixers=mixers, cell="delta_rule", form="chunkwise", chunk_size=options.chunk_size,
            **shared,
        )  # fmt: skip
    if name in PROGRAMMERS:
        mixers = (name,) * options.num_layers
        return ModelConfig(mixers=mixers, feature_map="softmax", qk_norm="none", **shared)
    kernel = name.removeprefix("transformer").removeprefix("_") or "dense"
    return ModelConfig(
        mixers=("attention",) * options.num_layers, attention_kernel=kernel,
        attention_block_size=options.attention_block_size, **shared,
    )  # fmt: skip


def new_model(name: str, options: Options):
    cfg = model_config(name, options)
    return build_model(cfg, vocab_size=options.vocab_size, rngs=nnx.Rngs(options.seed))


def parameter_count(model) -> int:
    params = nnx.state(model, nnx.Param)
    return sum(leaf.size for leaf in jax.tree.leaves(params))


# training --------------------------------------------------------------------------------------


def random_tokens(options: Options, shape, salt: int):
    key = jax.random.fold_in(jax.random.key(options.seed), salt)
    return jax.random.randint(key, shape, 0, options.vocab_size, dtype=jnp.int32)


def data_mesh(batch_size: int) -> Mesh:
    """A "data" mesh over the most devices that split batch_size evenly."""
    count = dividing_count(jax.device_count(), [batch_size])
    return Mesh(np.array(jax.devices()[:count]), ("data",))


def training_run(name: str, options: Options, T: int) -> tuple[Callable, dict]:
    """One train step at length T, compiled, data parallel:
    (run, {"compile_s", "memory_bytes", "devices"})."""
    graphdef, model_state = split_model(new_model(name, options))
    optimizer = make_optimizer(TrainConfig())
    B = options.tokens_per_step // T
    mesh = data_mesh(B)
    state = {**model_state, "opt_state": optimizer.init(model_state["params"])}
    state = jax.device_put(state, replicated(mesh))
    tokens = random_tokens(options, (B, T + 1), salt=2 * T)  # [B, T + 1]
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": jnp.ones((B, T), jnp.float32),
    }
    batch = jax.device_put(batch, batch_sharded(mesh))
    start = time.perf_counter()
    step = jax.jit(make_train_step(graphdef, optimizer, grad_accum=1))
    compiled = step.lower(state, batch).compile()
    info = {
        "compile_s": time.perf_counter() - start,
        "memory_bytes": footprint_bytes(compiled),
        "devices": mesh.devices.size,
    }
    return (lambda: compiled(state, batch)), info


# decoding --------------------------------------------------------------------------------------


def decoding_run(name: str, options: Options, T: int) -> tuple[Callable, dict]:
    """decode_tokens greedy steps after a prefill of T tokens, batch 1, compiled."""
    graphdef, state = nnx.split(new_model(name, options))
    n = options.decode_tokens

    @jax.jit
    def prefill(state, prompt):
        model = nnx.merge(graphdef, state)
        logits, cache = model.prefill(prompt, model.init_cache(1, T + n))
        return logits[:, -1], cache

    @jax.jit
    def decode(state, logits, cache):
        model = nnx.merge(graphdef, state)

        def one_token(carry, _):
            logits, cache = carry  # [1, vocab]
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [1]
            return model.decode_step(token, cache), token

        _, tokens = jax.lax.scan(one_token, (logits, cache), length=n)
        return tokens

    logits, cache = prefill(state, random_tokens(options, (1, T), salt=2 * T + 1))
    cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    compiled = decode.lower(state, logits, cache).compile()
    return (lambda: compiled(state, logits, cache)), {"cache_bytes": cache_bytes}


# the mixer kernels ------------------------------------------------------------------------------


def causal_mask(T: int):
    """[T, T], True where a query may look; made inside the trace (an iota, as the layer makes
    it) so XLA fuses it rather than reading a [T, T] constant."""
    positions = jnp.arange(T)
    return positions[:, None] >= positions[None, :]


def unit_rows(x):
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


# name -> (the model whose layers run it, kernel(q, k, v, beta, options) -> o [B, T, H, V])
KERNELS: dict[str, tuple[str, Callable]] = {
    "attention, dense (layers.attention.attend)": (
        "transformer",
        lambda q, k, v, beta, options: attend(q, k, v, causal_mask(q.shape[1])),
    ),
    "attention, dot_product (jax.nn.dot_product_attention)": (
        "transformer_dot_product",
        lambda q, k, v, beta, options: dot_product_attention(q, k, v),
    ),
    "attention, blockwise (layers.attention.blockwise_attention)": (
        "transformer_blockwise",
        lambda q, k, v, beta, options: blockwise_attention(q, k, v, options.attention_block_size),
    ),
    "delta_rule chunkwise (DeltaNet's cell)": (
        "deltanet",
        lambda q, k, v, beta, options: delta_rule.chunkwise(
            q, unit_rows(k), v, beta=beta, chunk_size=options.chunk_size
        )[0],
    ),
}


def kernel_runs(options: Options, T: int) -> dict[str, Callable]:
    """Forward and backward of one mixer kernel at training shapes, compiled, for each KERNEL,
    the batch split over the training step's devices."""
    B, H = options.tokens_per_step // T, options.num_heads
    K = options.d_model // H
    key = jax.random.key(options.seed)
    q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (B, T, H, K)) for i in range(3))
    beta = jax.nn.sigmoid(jax.random.normal(jax.random.fold_in(key, 3), (B, T, H)))  # [B, T, H]
    q, k, v, beta = jax.device_put((q, k, v, beta), batch_sharded(data_mesh(B)))
    runs = {}
    for name, (_, kernel) in KERNELS.items():

        def loss(q, k, v, beta, kernel=kernel):
            return jnp.sum(kernel(q, k, v, beta, options))

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, beta).compile()
        runs[name] = lambda compiled=compiled: compiled(q, k, v, beta)
    return runs


# the whole bench -------------------------------------------------------------------------------


def measure(options: Options, progress: bool = True) -> dict:
    """Every table of the report, as plain data."""
    models = {name: new_model(name, options) for name in MODELS}
    result = {
        "options": asdict(options),
        "machine": machine(),
        "parameters": {name: parameter_count(model) for name, model in models.items()},
        "load_before": os.getloadavg()[0],
        "training": [],
        "decoding": [],
    }
    bar = tqdm(total=4 * len(options.lengths) + 1, file=sys.stderr, disable=not progress)
    for T in options.lengths:
        bar.set_description(f"training T={T}")
        runs, infos = {}, {}
        for name in MODELS:
            runs[name], infos[name] = training_run(name, options, T)
        seconds = alternating_medians(runs, options.repeats)
        for name in MODELS:
            tokens_per_s = options.tokens_per_step / seconds[name]
            row = {"model": name, "T": T, "batch": options.tokens_per_step // T}
            result["training"].append(
                {**row, "step_s": seconds[name], "tokens_per_s": tokens_per_s, **infos[name]}
            )
        del runs
        bar.update()
        bar.set_description(f"decoding T={T}")
        runs, infos = {}, {}
        for name in DECODERS:
            runs[name], infos[name] = decoding_run(name, options, T)
        seconds = alternating_medians(runs, options.repeats)
        for name in DECODERS:
            ms_per_token = 1e3 * seconds[name] / options.decode_tokens
            result["decoding"].append(
                {"model": name, "T": T, "ms_per_token": ms_per_token, **infos[name]}
            )
        del runs
        bar.update()
    result["programmers"] = measure_programmers(options, bar)
    T = max(options.lengths)
    bar.set_description(f"kernels T={T}")
    seconds = alternating_medians(kernel_runs(options, T), options.repeats)
    result["kernels"] = {"T": T, "batch": options.tokens_per_step // T, "seconds": seconds}
    bar.update()
    bar.close()
    result["load_after"] = os.getloadavg()[0]
    return result


def measure_programmers(options: Options, bar) -> dict:
    """Training and decoding of rdn and srwm beside DeltaNet, alternating within each length."""
    names = ("deltanet", *PROGRAMMERS)
    rows = {"training": [], "decoding": []}
    for T in options.lengths:
        for section, make in (("training", training_run), ("decoding", decoding_run)):
            bar.set_description(f"programmers {section} T={T}")
            runs, infos = {}, {}
            for name in names:
                runs[name], infos[name] = make(name, options, T)
            seconds = alternating_medians(runs, options.repeats)
            for name in names:
                if section == "training":
                    speed = {"tokens_per_s": options.tokens_per_step / seconds[name]}
                else:
                    speed = {"ms_per_token": 1e3 * seconds[name] / options.decode_tokens}
                rows[section].append({"model": name, "T": T, **speed, **infos[name]})
            del runs
            bar.update()
    return rows


def programmers_markdown(result: dict) -> list[str]:
    """The Recurrent DeltaNet and the SRWM against DeltaNet: one row per length and model."""
    rows, options = result["programmers"], result["options"]
    lines = [
        "### Recurrent DeltaNet and SRWM against DeltaNet (same width, measured side by side)",
        "",
    ]
    header = ["T", "model", "training tokens/s", "/ DeltaNet", "peak MiB", "decoding ms/token"]
    table = []
    for T in options["lengths"]:
        deltanet = value(rows["training"], "deltanet", T, "tokens_per_s")
        for name in ("deltanet", *PROGRAMMERS):
            tokens_per_s = value(rows["training"], name, T, "tokens_per_s")
            table.append(
                [
                    T,
                    LABELS[name],
                    f"{tokens_per_s:,.0f}",
                    f"{tokens_per_s / deltanet:.2f}x",
                    mib(value(rows["training"], name, T, "memory_bytes")),
                    f"{value(rows['decoding'], name, T, 'ms_per_token'):.3f}",
                ]
            )
    return lines + [
        markdown_table(header, table, align="rlrrrr"),
        "",
        "Their slow projections act inside a sequential scan over tokens (the update reads the "
        "previous output), so they have no chunkwise form; training backpropagates by undoing "
        "each token's rank-one write (fwpzoo/cells/programmed/recurrent_fwp.md).",
        "",
    ]


def value(rows: list[dict], model: str, T: int, key: str):
    return next(row[key] for row in rows if row["model"] == model and row["T"] == T)


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f}"


def fastest_transformer(result: dict, T: int) -> str:
    """The transformer (attention kernel) with the most training tokens/s at length T."""
    return max(TRANSFORMERS, key=lambda name: value(result["training"], name, T, "tokens_per_s"))


def training_speedup(result: dict, T: int) -> float:
    """DeltaNet's training tokens/s over the fastest transformer's at length T."""
    rows = result["training"]
    return value(rows, "deltanet", T, "tokens_per_s") / value(
        rows, fastest_transformer(result, T), T, "tokens_per_s"
    )


def markdown(result: dict, command: str) -> str:
    """The report: command, machine, the three tables and the verdict on the target."""
    options = result["options"]
    lengths = options["lengths"]
    lines = [
        "## Results",
        "",
        f"Command: `{command}`",
        "",
        machine_line(result),
        "",
        f"Models: d_model {options['d_model']}, {options['num_layers']} layers, "
        f"{options['num_heads']} heads, SwiGLU MLP 4 x d_model, vocabulary "
        f"{options['vocab_size']}; DeltaNet = delta_rule chunkwise, chunk "
        f"{options['chunk_size']}, L2-normalised q/k, short conv 4, output norm. Parameters: "
        f"DeltaNet {result['parameters']['deltanet']:,}, "
        f"transformer {result['parameters']['transformer']:,}.",
        "",
        f"### Training ({options['tokens_per_step']:,} tokens per step, median of "
        f"{options['repeats']} after a warm-up)",
        "",
    ]
    header = ["T", "batch", "devices", "model", "tokens/s", "DeltaNet / this"]
    header += ["peak MiB per device"]
    rows, table = result["training"], []
    for T in lengths:
        deltanet = value(rows, "deltanet", T, "tokens_per_s")
        for name in MODELS:
            tokens_per_s = value(rows, name, T, "tokens_per_s")
            ratio = "" if name == "deltanet" else f"{deltanet / tokens_per_s:.2f}x"
            batch, devices = value(rows, name, T, "batch"), value(rows, name, T, "devices")
            memory = mib(value(rows, name, T, "memory_bytes"))
            table.append([T, batch, devices, LABELS[name], f"{tokens_per_s:,.0f}", ratio, memory])
    lines += [
        markdown_table(header, table, align="rrrlrrr"),
        "",
        "Peak memory is XLA's compiled footprint of the train step on one device (temp + "
        "arguments + outputs - aliased buffers), from `compiled.memory_analysis()`.",
        "",
        f"### Decoding (batch 1, {options['decode_tokens']} tokens after a prefill of T, "
        "one jitted scan)",
        "",
    ]
    header = ["T", "DeltaNet ms/token", "transformer ms/token", "DeltaNet cache MiB"]
    header += ["transformer cache MiB"]
    rows, decoders = result["decoding"], ("deltanet", "transformer")
    table = [
        [T, *(f"{value(rows, m, T, 'ms_per_token'):.3f}" for m in decoders)]
        + [f"{value(rows, m, T, 'cache_bytes') / 2**20:.2f}" for m in decoders]
        for T in lengths
    ]
    lines.append(markdown_table(header, table, align="rrrrr"))
    kernels = result["kernels"]
    T = kernels["T"]
    lines += [
        "",
        f"### One layer's mixer kernel, forward + backward (T={T}, batch {kernels['batch']}, "
        "training shapes)",
        "",
    ]
    table = []
    for name, seconds in kernels["seconds"].items():
        step_s = value(result["training"], KERNELS[name][0], T, "step_s")
        share = options["num_layers"] * seconds / step_s
        table.append([name, f"{1e3 * seconds:,.1f}", f"{share:.0%}"])
    header = ["kernel", "ms", "x layers / its model's train step"]
    lines.append(markdown_table(header, table, align="lrr"))
    lines += ["", *programmers_markdown(result), verdict(result), ""]
    return "\n".join(lines)


def verdict(result: dict) -> str:
    """The target (training speed-up over the fastest transformer at the longest T) and how
    decoding scales with context."""
    lengths = result["options"]["lengths"]
    short, long = min(lengths), max(lengths)
    speedup = training_speedup(result, long)
    met = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    growth = {
        name: value(result["decoding"], name, long, "ms_per_token")
        / value(result["decoding"], name, short, "ms_per_token")
        for name in DECODERS
    }
    return (
        f"At T={long} DeltaNet trains at {speedup:.2f}x the tokens/s of the fastest transformer "
        f"({LABELS[fastest_transformer(result, long)]}; target {TARGET_SPEEDUP:g}x: {met}). "
        f"From T={short} to T={long} decoding time per "
        f"token changes by {growth['deltanet']:.2f}x for DeltaNet and "
        f"{growth['transformer']:.2f}x for the transformer."
    )


def plot(result: dict, path: Path) -> None:
    lengths = result["options"]["lengths"]
    fig, (train_ax, decode_ax) = subplots(1, 2, figsize=(10, 4))
    styles = dict(zip(MODELS, ("o-", "s--", "^:", "v-."), strict=True))
    for name in MODELS:
        train_ax.plot(
            lengths, [value(result["training"], name, T, "tokens_per_s") for T in lengths],
            styles[name], label=LABELS[name],
        )  # fmt: skip
    for name in DECODERS:
        decode_ax.plot(
            lengths, [value(result["decoding"], name, T, "ms_per_token") for T in lengths],
            styles[name], label=name,
        )  # fmt: skip
    train_ax.set(xlabel="T (tokens)", ylabel="training tokens/s", title="Training throughput")
    decode_ax.set(xlabel="context T (tokens)", ylabel="ms/token", title="Decoding, batch 1")
    for ax in (train_ax, decode_ax):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    save_figure(fig, path)


def write_report(result: dict, report: str, out: Path) -> None:
    """out/model.md (keeping notes after NOTES_MARKER), out/model.json and out/model.png."""
    out.mkdir(parents=True, exist_ok=True)
    header = "# Benchmark: DeltaNet vs a softmax transformer\n\n" + (__doc__ or "")
    page = f"{header.rstrip()}\n\n![tokens/s and ms/token vs T](model.png)\n\n{report}"
    write_page(out / "model.md", page)
    (out / "model.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "model.png")


def main(argv: list[str]) -> int:
    options, out = parse_options(argv)
    use_cpu_devices(options.cpu_devices, {})  # each step then uses the devices its batch splits
    result = measure(options)
    command = " ".join(["fwpzoo bench model", *argv])
    report = markdown(result, command)
    print(report)
    if out is not None:
        write_report(result, report, out)
    return 0
