"""`fwpzoo bench programmed`: the memory-lean backwards of the Recurrent DeltaNet and SRWM cells.

    fwpzoo bench programmed [--length 512] [--batch 8] [--num-heads 4] [--dim 16]
                            [--chunk-sizes 32,64] [--repeats 5] [--out DIR]

For each cell (recurrent_delta with K = V = dim, srwm with D = D_out = dim) it times the forward
and backward (gradients w.r.t. every input, the slow weights included) of the float32 scan with
each backward: autodiff through the plain scan (`recurrent`, every state kept), `checkpointed`
at each chunk size (the chunk-entering states kept, each chunk rerun), and `reversible` (each
state recovered by undoing the next token's rank-one write). It reports the median seconds
(alternating runs, as the other benchmarks), XLA's temporary memory of the compiled step, and
the largest relative error of any gradient against the float64 plain scan. Prints markdown;
--out DIR also writes DIR/programmed.md (notes after the marker kept) and DIR/programmed.json.
"""

import functools
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fwpzoo.bench._common import (
    BenchArgs,
    alternating_medians,
    int_list,
    machine,
    positive_int,
)
from fwpzoo.cells.programmed import recurrent_delta, srwm
from fwpzoo.reports import machine_line, markdown_table, write_page


@dataclass(frozen=True)
class Options:
    length: int = 512
    batch: int = 8
    num_heads: int = 4
    dim: int = 16
    chunk_sizes: tuple[int, ...] = (32, 64)
    repeats: int = 5
    seed: int = 0


def parse_options(argv: list[str]) -> tuple[Options, Path | None]:
    parser = BenchArgs(prog="fwpzoo bench programmed")
    for name in ("length", "batch", "num_heads", "dim", "repeats"):
        parser.add_argument("--" + name.replace("_", "-"), type=positive_int)
    parser.add_argument("--chunk-sizes", type=int_list)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, help="write programmed.md and programmed.json here")
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return Options(**{k: v for k, v in args.items() if v is not None}), out


def inputs(cell: str, options: Options, dtype) -> dict:
    """Random inputs of one cell at the benchmark's shapes (the same draw for every dtype)."""
    rng = np.random.default_rng(options.seed)
    B, T, H, D = options.batch, options.length, options.num_heads, options.dim
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    if cell == "recurrent_delta":
        return {
            "q": draw(B, T, H, D),
            "k": draw(B, T, H, D),
            "v": draw(B, T, H, D),
            "beta": draw(B, T, H),
            "R": draw(H, D, 3 * D + 1) / np.sqrt(D),
        }
    return {"x": draw(B, T, H, D), "W0": draw(H, 3 * D + srwm.BETA_ROWS, D) / np.sqrt(D)}


def backwards(module, options: Options) -> dict:
    """name -> the cell's scan with that backward."""
    forms = {"plain autodiff (recurrent)": module.recurrent}
    for C in options.chunk_sizes:
        forms[f"checkpointed, C={C}"] = functools.partial(module.checkpointed, chunk_size=C)
    forms["reversible"] = module.reversible
    return forms


def gradient_fn(form):
    """Gradients w.r.t. every input of the sum of squared outputs."""
    return jax.grad(lambda x: jnp.sum(jnp.square(form(**x)[0])))


def measure(options: Options) -> dict:
    result = {"options": asdict(options), "machine": machine(), "rows": []}
    result["load_before"] = os.getloadavg()[0]
    for cell, module in (("recurrent_delta", recurrent_delta), ("srwm", srwm)):
        with jax.enable_x64(True):
            reference = jax.jit(gradient_fn(module.recurrent))(inputs(cell, options, np.float64))
            reference = jax.tree.map(np.asarray, reference)
        x = inputs(cell, options, np.float32)
        runs, rows = {}, {}
        for name, form in backwards(module, options).items():
            compiled = jax.jit(gradient_fn(form)).lower(x).compile()
            grads = compiled(x)
            error = max(
                float(np.linalg.norm(np.asarray(grads[k]) - reference[k]))
                / float(np.linalg.norm(reference[k]))
                for k in reference
            )
            stats = compiled.memory_analysis()
            temp = None if stats is None else stats.temp_size_in_bytes
            rows[name] = {"cell": cell, "backward": name, "temp_bytes": temp, "error": error}
            runs[name] = lambda compiled=compiled, x=x: compiled(x)
        for name, seconds in alternating_medians(runs, options.repeats).items():
            result["rows"].append({**rows[name], "seconds": seconds})
    result["load_after"] = os.getloadavg()[0]
    return result


def markdown(result: dict, command: str) -> str:
    options = result["options"]
    lines = [
        "## Results",
        "",
        f"Command: `{command}`",
        "",
        machine_line(result),
        "",
        f"B = {options['batch']}, T = {options['length']}, H = {options['num_heads']}, "
        f"dim = {options['dim']}; forward + backward, median of {options['repeats']}.",
        "",
    ]
    plain = {r["cell"]: r["seconds"] for r in result["rows"] if r["backward"].startswith("plain")}
    rows = [
        [
            r["cell"],
            r["backward"],
            f"{1e3 * r['seconds']:.0f}",
            f"{plain[r['cell']] / r['seconds']:.2f}x",
            "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}",
            f"{r['error']:.1e}",
        ]
        for r in result["rows"]
    ]
    header = ["cell", "backward", "ms", "vs plain", "temp MiB", "max relative gradient error"]
    return "\n".join([*lines, markdown_table(header, rows, align="llrrrr")]) + "\n"


def main(argv: list[str]) -> int:
    options, out = parse_options(argv)
    result = measure(options)
    report = markdown(result, " ".join(["fwpzoo bench programmed", *argv]))
    print(report)
    if out is not None:
        header = "# Benchmark: memory-lean backwards of the programmed cells\n\n" + __doc__
        write_page(out / "programmed.md", f"{header.rstrip()}\n\n{report}")
        (out / "programmed.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0
