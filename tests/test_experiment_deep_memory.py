"""fwpzoo experiment deep_memory: the grid (every model on both tasks at equal fast-weight count)
and, slow, its --quick version end to end."""

import json

import pytest

from fwpzoo import cli
from fwpzoo.config import load
from fwpzoo.experiments import _sweep, deep_memory


def test_the_grid_compares_every_memory_on_both_tasks_at_equal_fast_weights(tmp_path):
    options = _sweep.parse_options("deep_memory", ["--workdir", str(tmp_path)])
    points = deep_memory.make_points(options)
    assert len(points) == len(deep_memory.MODELS) * len(deep_memory.TASKS) * 3
    assert len({p.name for p in points}) == len(points)
    assert {(p.labels["model"], p.labels["task"]) for p in points} == {
        (m, t) for m in deep_memory.MODELS for t in deep_memory.TASKS
    }
    for point in points:  # about 1024 fast weights per head, as the delta rule's K V = 32 x 32
        assert abs(point.labels["fast_weights"] / (2 * 32 * 32) - 1) <= 0.05, point.name
        assert point.labels["state_size"] >= point.labels["fast_weights"]
        cfg = load(point.config, point.overrides)
        assert cfg.data.task == point.labels["task"]
    atlas = next(p for p in points if p.labels["model"] == "atlas")
    # MLP W1, b1, W2, b2 with hidden 16 and their Muon momenta, 3 past keys and values and weights
    per_head = 2 * (32 * 16 + 16 + 16 * 32 + 32) + 3 * (32 + 32 + 1)
    assert atlas.labels["state_size"] == 2 * per_head


@pytest.mark.slow
def test_deep_memory_quick(tmp_path):
    argv = ["experiment", "deep_memory", "--quick", "--workdir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = tmp_path / "deep_memory"
    records = json.loads((out / "deep_memory.json").read_text())
    assert {(r["model"], r["task"], r["metric"], r["x"]) for r in records} == {
        ("ttt_linear", "mqar", "accuracy", 64),
        ("ttt_linear", "mqar", "accuracy", 128),
        ("atlas", "regression", "normalised_error", 64),
        ("atlas", "regression", "normalised_error", 128),
    }
    assert all(r["steps"] == 2 and r["command"].endswith(f"--point {r['point']}") for r in records)
    page = (out / "deep_memory.md").read_text()
    assert "### The papers' claims beside ours" in page and "ATLAS (Behrouz et al. 2025)" in page
    assert (out / "deep_memory.png").stat().st_size > 0
