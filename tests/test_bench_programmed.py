"""`fwpzoo bench programmed` at toy sizes: every backward of both cells, exact gradients."""

import json

from fwpzoo import cli


def test_every_backward_is_timed_and_exact(tmp_path, capsys):
    argv = ["--length", "6", "--batch", "1", "--num-heads", "1", "--dim", "2"]
    argv += ["--chunk-sizes", "4", "--repeats", "1", "--out", str(tmp_path)]
    assert cli.main(["bench", "programmed", *argv]) == 0
    assert "| srwm | reversible |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "programmed.json").read_text())["rows"]
    assert {(r["cell"], r["backward"]) for r in rows} == {
        (cell, backward)
        for cell in ("recurrent_delta", "srwm")
        for backward in ("plain autodiff (recurrent)", "checkpointed, C=4", "reversible")
    }
    assert all(r["seconds"] > 0 and r["error"] < 1e-5 for r in rows)
    assert (tmp_path / "programmed.md").read_text().startswith("# Benchmark: memory-lean")


def test_bad_input_is_refused(refused):
    refused(["bench", "programmed", "--length", "0"], "--length")
