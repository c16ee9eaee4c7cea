"""scripts/accelerator_bench.sh, dry-run on the CPU: the commands it would run on an
accelerator, and that each one's options parse."""

import shlex
import subprocess
from pathlib import Path

from fwpzoo.bench import cells as cells_bench
from fwpzoo.bench import model as model_bench

SCRIPT = Path(__file__).parents[1] / "scripts" / "accelerator_bench.sh"


def test_accelerator_bench_dry_run_lists_commands_whose_options_parse(tmp_path):
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    commands = [shlex.split(line) for line in run.stdout.splitlines()]
    parsers = {"cells": cells_bench.parse_options, "model": model_bench.parse_options}
    cell_runs = []
    for words in commands:
        assert words[:2] == ["fwpzoo", "bench"]
        options, out = parsers[words[2]](words[3:])
        assert str(out).startswith(str(tmp_path))
        if words[2] == "cells":
            cell_runs.append(options)
    assert [words[2] for words in commands].count("model") == 1
    # flash-linear-attention's shapes, both input dtypes, and nothing written by a dry run
    assert {(o.heads, o.dtype) for o in cell_runs} == {
        (heads, dtype) for heads in (16, 96) for dtype in ("float32", "bfloat16")
    }
    assert {(o.batch, o.lengths, o.key_dim, o.value_dim) for o in cell_runs} == {
        (1, (8192,), 128, 128)
    }
    assert not any(tmp_path.iterdir())
