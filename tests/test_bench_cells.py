"""`fwpzoo bench cells` at toy sizes: the report's rows, the files it writes, bad input."""

import json
import subprocess
import sys

import pytest

from fwpzoo import cli
from fwpzoo.bench import cells as bench
from fwpzoo.reports import NOTES_MARKER

TINY = [
    "--families", "delta_rule,linear_attn", "--lengths", "8,12", "--chunk-sizes", "4",
    "--repeats", "1", "--batch", "1", "--heads", "1", "--key-dim", "4", "--value-dim", "4",
]  # fmt: skip


def test_report_rows_files_and_kept_notes(tmp_path, capsys):
    page = tmp_path / "cells.md"
    page.write_text(f"old report\n{NOTES_MARKER}\nhand-written notes\n")

    assert cli.main(["bench", "cells", *TINY, "--out", str(page)]) == 0

    report = capsys.readouterr().out
    for family in ("delta_rule", "linear_attn"):
        for T in (8, 12):
            for form in ("recurrent", "chunkwise C=4", "associative"):
                assert f"| {family} | {T} | {form} |" in report
    written = page.read_text()
    assert "old report" not in written
    assert report.strip() in written
    assert written.endswith(f"{NOTES_MARKER}\nhand-written notes\n")

    assert page.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Prefill (forward only), best chunkwise vs recurrent" in report

    result = json.loads(page.with_suffix(".json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 3
    assert all(row["fwd"] > 0 and row["fwd+bwd"] > 0 for row in rows)
    for row in rows:  # the recurrent form is each group's yardstick
        if row["form"] == "recurrent":
            assert row["fwd+bwd speedup"] == pytest.approx(1.0)


def test_deep_cells_take_the_inner_options_and_are_reported_against_delta_rule(capsys):
    """The deep cells run with --inner-batch (ttt_linear's mini_batch) in every form, and the
    tokens/s table puts every family against delta_rule at the same T."""
    tiny = [*TINY, "--families", "delta_rule,ttt_linear", "--lengths", "8"]
    argv = [*tiny, "--forms", "recurrent,chunkwise", "--inner-batch", "2"]
    assert cli.main(["bench", "cells", *argv]) == 0
    report = capsys.readouterr().out
    assert "Deep cells: inner_batch 2 (ttt_linear's mini_batch)" in report
    assert "| ttt_linear | 8 | chunkwise C=4 |" in report
    assert "| delta_rule | 8 | " in report and "fwd+bwd vs delta_rule" in report
    assert bench.cell_options("ttt_linear", bench.Options(inner_batch=2)) == {"mini_batch": 2}


def test_delta_rule_flops_model():
    options = bench.Options(batch=2, heads=3, key_dim=5, value_dim=7)
    C, K, V = 4, 5, 7
    per_token = 6 * C * K + 4 * C * V + 6 * K * V
    assert bench.chunk_flops("delta_rule", 16, C, options) == pytest.approx(2 * 3 * 16 * per_token)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--families", "delta_rule,nope"], "nope"),
        (["--forms", "sideways"], "sideways"),
        (["--decay", "diagonal"], "diagonal"),
        (["--lengths", "0"], "--lengths"),
        (["--repeats", "x"], "--repeats"),
        (["--memory-limit-gb", "-1"], "--memory-limit-gb"),
        (["--cpu-devices", "0"], "--cpu-devices"),
        (["--families", "deep", "--chunk-sizes", "8", "--inner-batch", "3"], "--inner-batch 3"),
        (["--fast-net", "conv"], "conv"),
        (["--inner-optimizer", "adam"], "adam"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, culprit, refused):
    refused(["bench", "cells", *args], culprit)


@pytest.mark.slow
def test_cpu_devices_split_the_batch_and_the_matmul(tmp_path):
    """--cpu-devices 2 (a fresh process: JAX takes the split before it starts) runs every form
    on the batch split over two CPU devices and times the matmul both ways."""
    page = tmp_path / "cells.md"
    # one family at one length: the split is the point here (the last of a repeated flag counts)
    split = [*TINY, "--batch", "2", "--families", "delta_rule", "--lengths", "8"]
    argv = ["-m", "fwpzoo", "bench", "cells", *split, "--cpu-devices", "2", "--out", str(page)]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(page.with_suffix(".json").read_text())
    assert result["machine"]["devices"] == 2
    assert "2 x cpu" in page.read_text()
    assert "the faster of one device and all of them" in page.read_text()
    assert all(row["fwd"] > 0 and row["fwd+bwd"] > 0 for row in result["rows"])


def test_a_batch_the_devices_do_not_divide_is_refused(tmp_path):
    argv = ["-m", "fwpzoo", "bench", "cells", *TINY, "--cpu-devices", "2"]  # --batch 1
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip() == (
        "fwpzoo bench: error: --batch 1 is not divisible by the 2 devices"
    )


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_bench_help_lists_the_benchmarks(flag, capsys):
    assert cli.main(["bench", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fwpzoo bench NAME")
    assert "benchmarks: " in out and "cells" in out.split("benchmarks: ")[1].split("\n")[0]
