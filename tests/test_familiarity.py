"""Continual familiarity: the stream recomputed from its definition, and the quick experiment end
to end (records, learned eta, the command that recomputes a point)."""

import json
import shlex

import numpy as np
import pytest

from fwpzoo import cli
from fwpzoo.data import DataConfig, DataConfigError, make_task
from fwpzoo.data.familiarity import FAMILIAR, FIRST_PATTERN, NOVEL
from fwpzoo.experiments import _sweep, familiarity


@pytest.mark.parametrize("R", [1, 5])
def test_the_stream_repeats_the_pattern_R_steps_back_once_and_never_shows_a_new_one_twice(R):
    task = make_task(
        DataConfig(task="familiarity", seq_len=48, vocab_size=80, repeat_interval=R), 3
    )
    batch = task.train_batch(0, 64)
    x, y, w = batch["inputs"], batch["targets"], batch["weights"]
    assert set(np.unique(y)) == {NOVEL, FAMILIAR} and x.min() >= FIRST_PATTERN
    np.testing.assert_array_equal(w, np.broadcast_to(np.arange(48) >= R, w.shape))
    for row, answers in zip(x, y, strict=True):
        for t, (pattern, answer) in enumerate(zip(row, answers, strict=True)):
            seen_before = pattern in row[:t]
            if answer == FAMILIAR:
                assert t >= R and row[t - R] == pattern and answers[t - R] == NOVEL
            else:
                assert not seen_before
    # a repeat is asked for with p = 1/2 where the pattern R back was new: p / (1 + p) = 1/3
    assert abs(np.mean(y[:, R:] == FAMILIAR) - 1 / 3) < 0.03


def test_an_eval_length_beyond_the_vocabulary_is_refused():
    task = make_task(DataConfig(task="familiarity", seq_len=32, vocab_size=40), 0)
    with pytest.raises(DataConfigError, match="data.vocab_size >= 53"):
        next(task.eval_batches("test", 2, 1, seq_len=50))


@pytest.mark.slow
def test_quick_experiment_records_the_interval_curve_and_the_learned_eta(tmp_path, capsys):
    argv = ["experiment", "familiarity", "--quick", "--workdir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 0
    out = tmp_path / "familiarity"
    records = json.loads((out / "familiarity.json").read_text())
    keys = (*familiarity.KEYS, *(k for k in _sweep.RUN_FIELDS if k not in familiarity.KEYS))
    assert all(tuple(r) == keys for r in records)
    accuracy = [r for r in records if r["metric"] == "accuracy"]
    assert {(r["model"], r["x"]) for r in accuracy} == {
        (m, x) for m in ("plastic", "delta_rule") for x in familiarity.QUICK_TEST
    }
    assert all(0 <= r["value"] <= 1 and r["setting"] == 2 and r["steps"] == 2 for r in accuracy)
    (eta,) = [r for r in records if r["metric"] == "learned_eta"]
    assert eta["model"] == "plastic" and eta["eta_sign"] == "learned" and eta["x"] is None
    assert eta["plastic_on"] == "input" and eta["plasticity"] == "hebb"
    assert 0 < eta["value"] * 32 < 6  # started at +5 / K; two small steps cannot flip it
    plastic = {r["x"]: r["value"] for r in accuracy if r["model"] == "plastic"}
    report = (out / "familiarity.md").read_text()
    assert "Recorded: 2 of 2 points." in report and "| plastic (eta learned) | 2 | 0 |" in report
    assert (out / "familiarity.png").stat().st_size > 0
    # the record's command recomputes the point alone: the same metrics, by name
    command = shlex.split(eta["command"])
    capsys.readouterr()
    assert cli.main(command[1:]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["learned_eta"] == eta["value"]
    assert {x: printed[f"accuracy@R{x}"] for x in plastic} == plastic
