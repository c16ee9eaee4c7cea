"""Chunkwise forward + backward of every cell family, this checkout against another, timed side
by side in one process.

    python scripts/bench_against.py BASE_DIR [--families a,b] [--length 2048] [--repeats 7]
                                    [--cpu-devices 2] [--out FILE.json]

BASE_DIR is another checkout (e.g. `git worktree add /tmp/base COMMIT`). Its fwpzoo package is
copied under the name fwpzoo_base (imports rewritten) into a temporary folder, so both versions
load into this process; each family's chunkwise form of both is compiled on the same inputs
(this checkout's bench draws them: B4 H4 K = V = 64 by default, per bench/cells.py) and the two
are timed in alternation with a 1024^3 matmul (bench/_common.alternating_medians), so the load
of a shared machine falls on both alike. Prints one line per family: the median seconds of
both, their ratio (this / base) and the delta rule's efficiency against the matmul.
"""

import argparse
import importlib
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path


def load_base(base_dir: Path):
    """The base checkout's fwpzoo, imported as fwpzoo_base."""
    folder = Path(tempfile.mkdtemp(prefix="fwpzoo_base_"))
    target = folder / "fwpzoo_base"
    shutil.copytree(base_dir / "fwpzoo", target)
    for path in target.rglob("*.py"):
        path.write_text(re.sub(r"\bfwpzoo\b(?=[.\s])", "fwpzoo_base", path.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module("fwpzoo_base.cells")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("base", type=Path)
    parser.add_argument("--families", default="")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--cpu-devices", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from fwpzoo.train.sharding import use_cpu_devices

    use_cpu_devices(args.cpu_devices, {})
    import jax

    from fwpzoo import cells
    from fwpzoo.bench import cells as bench
    from fwpzoo.bench._common import alternating_medians

    base_cells = load_base(args.base)
    options = bench.parse_options(["--cpu-devices", str(args.cpu_devices)])[0]
    families = [f for f in (args.families.split(",") if args.families else cells.CELLS) if f]
    families = [f for f in families if f in base_cells.CELLS]
    rows = []
    for family in families:
        inputs = bench.spread(bench.cell_inputs(family, args.length, options))
        runs = bench.matmul_runs()
        for label, package in (("base", base_cells), ("this", cells)):
            chunkwise = package.get(family).chunkwise
            fn = bench.forward_backward_fn(chunkwise)
            compiled = jax.jit(fn).lower(*inputs).compile()
            runs[label] = lambda compiled=compiled, inputs=inputs: compiled(*inputs)
        seconds = alternating_medians(runs, args.repeats)
        matmul = max(2 * bench.MATMUL_SIZE**3 / seconds[name] for name in runs if "matmul" in name)
        # the deep cells have no cost model (None): their efficiency is nan
        flops = 3 * (bench.chunk_flops(family, args.length, 64, options) or float("nan"))
        row = {
            "family": family,
            "base_s": seconds["base"],
            "this_s": seconds["this"],
            "ratio": seconds["this"] / seconds["base"],
            "base_efficiency": flops / seconds["base"] / matmul,
            "this_efficiency": flops / seconds["this"] / matmul,
        }
        rows.append(row)
        print(
            f"{family:20s} base {row['base_s'] * 1e3:8.1f} ms  this {row['this_s'] * 1e3:8.1f} ms"
            f"  ratio {row['ratio']:.3f}  efficiency {row['base_efficiency']:.3f} ->"
            f" {row['this_efficiency']:.3f}",
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
