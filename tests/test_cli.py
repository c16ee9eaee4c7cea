"""The command line end to end: train, eval, sample, list, resume after SIGKILL, and bad input.

Subprocesses are slow to start, so one module-scoped reference run serves several tests.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fwpzoo import cli

TINY_CONFIG = Path(__file__).parent / "fixtures" / "tiny.yaml"


def fwpzoo(*args, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "fwpzoo", *map(str, args)], capture_output=True, text=True
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def test_a_reader_that_leaves_early_stops_the_command_quietly():
    """`fwpzoo list | head -1`: a closed pipe ends the command with 128 + SIGPIPE, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails: the reader is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fwpzoo", "list"], stdout=write_end, stderr=subprocess.PIPE
        )
    finally:
        os.close(write_end)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == b""


def losses(workdir: Path) -> list[tuple[int, float]]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"]) for m in map(json.loads, lines)]


def snapshot(path: Path) -> dict:
    """Every file under `path` with a hash of its bytes (empty if `path` does not exist)."""
    if not path.exists():
        return {}
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


@pytest.fixture(scope="module")
def tiny_yaml() -> Path:
    return TINY_CONFIG


@pytest.fixture(scope="module")
def reference(tiny_yaml, tmp_path_factory) -> Path:
    """A workdir trained without interruption by `fwpzoo train`."""
    workdir = tmp_path_factory.mktemp("reference")
    fwpzoo("train", tiny_yaml, "--workdir", workdir, "--no-progress")
    return workdir


def test_train_writes_config_metrics_tensorboard_and_checkpoints(reference):
    assert json.loads((reference / "config.json").read_text())["train"]["steps"] == 30
    logged = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == list(range(1, 31))
    assert {"loss", "accuracy", "learning_rate", "tokens_per_sec"} <= set(logged[0])
    assert {"valid_loss", "valid_accuracy"} <= set(logged[9])
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    # keep 3 latest, plus the best by valid loss
    steps = sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-3:] == [20, 25, 30] and len(steps) <= 4


@pytest.mark.slow
def test_eval_rebuilds_the_model_from_the_checkpoint_alone(reference, tmp_path):
    # a copy keeps nothing but the checkpoints, so the stored config is all eval has
    alone = tmp_path / "alone"
    alone.mkdir()
    os.symlink(reference / "checkpoints", alone / "checkpoints")
    result = json.loads(
        fwpzoo("eval", "--workdir", alone, "--split", "valid").stdout.splitlines()[-1]
    )
    last = json.loads((reference / "metrics.jsonl").read_text().splitlines()[-1])
    assert result == {
        "step": 30,
        "split": "valid",
        "loss": last["valid_loss"],
        "accuracy": last["valid_accuracy"],
    }
    at_step = json.loads(
        fwpzoo("eval", "--workdir", reference, "--step", 25).stdout.splitlines()[-1]
    )
    assert at_step["step"] == 25 and at_step["split"] == "test"


@pytest.mark.slow
def test_sample_generates_the_asked_number_of_tokens(reference):
    out = fwpzoo("sample", "--workdir", reference, "--prompt", "1 9 2", "--num-tokens", 5)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["step"] == 30 and result["prompt"] == [1, 9, 2]
    assert len(result["tokens"]) == 5 and all(0 <= t < 16 for t in result["tokens"])


def test_inspect_draws_the_fast_weights_of_a_layer(reference, tmp_path, capsys):
    out = tmp_path / "fw.png"
    argv = ["inspect", "--workdir", str(reference), "--prompt", "1 9 2 4 3", "--head", "1"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["layer"] == 0 and summary["mixer"] == "fwp" and summary["head"] == 1
    assert summary["state_shape"] == [2, 8, 8] and summary["prompt_tokens"] == 5
    assert summary["gates"] == ["beta"] and summary["steps_drawn"] == [0, 1, 3, 4]
    assert 1 <= summary["final_effective_rank"] <= 8


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (["--layer", "1"], "layer 1 (attention) has no fast-weight matrix to draw; layers with"),
        (["--layer", "2"], "--layer 2 is out of range; the model has layers 0..1"),
        (["--head", "2"], "--head 2 is out of range; valid heads: 0..1"),
        (["--out", "x.jpg"], "must name a .png file"),
    ],
)
def test_inspect_refuses_bad_input_and_writes_nothing(reference, tmp_path, refused, flags, culprit):
    out = tmp_path / "fw.png"
    default_out = [] if "--out" in flags else ["--out", str(out)]
    argv = ["inspect", "--workdir", str(reference), *default_out, *flags]
    before = snapshot(reference)
    refused(argv, culprit)
    assert not out.exists() and snapshot(reference) == before


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(reference, tiny_yaml, tmp_path):
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "fwpzoo", "train", str(tiny_yaml), "--workdir", str(workdir)]
    process = subprocess.Popen(
        [*command, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = workdir / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert killed_at < 30
    subprocess.run([*command, "--no-progress"], check=True, capture_output=True)
    assert losses(workdir) == losses(reference)  # bit-exact, and no line logged twice


def test_list_names_cells_mixers_tasks_and_configs():
    out = fwpzoo("list").stdout
    assert re.search(r"^cells: .*delta_rule", out, re.M)
    assert re.search(r"^mixers: .*attention", out, re.M)
    assert re.search(r"^tasks: .*mqar", out, re.M)
    assert re.search(r"^configs: .*mqar\.yaml", out, re.M)


def test_bad_input_from_the_real_entry_point_is_one_line_and_exit_2(tiny_yaml, tmp_path):
    done = fwpzoo("train", tiny_yaml, "--workdir", tmp_path / "w", "model.cell=nope", check=False)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert "unknown model.cell 'nope'; valid choices: linear_attn" in done.stderr
    assert not (tmp_path / "w").exists()


BAD_TRAIN_ARGS = [
    (["train.stepz=3"], "unknown key train.stepz; valid keys in train"),
    (["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["train.learning_rate=[1]"], "train.learning_rate: expected a number"),
    (["model.cell=delta"], "unknown model.cell 'delta'; valid choices: linear_attn"),
    (["model.feature_map=elu"], "unknown model.feature_map 'elu'; valid choices: identity"),
    (["model.mixers=[fwp,rnn]"], "unknown model.mixers[1] 'rnn'; valid choices: fwp"),
    (["data.task=sort"], "unknown data.task 'sort'; valid tasks: mqar"),
    (["model.plasticity=bcm"], "unknown model.plasticity 'bcm'; valid choices: hebb, oja, neuro"),
    (["model.plastic_on=soma"], "unknown model.plastic_on 'soma'; valid choices: input, recurrent"),
    (["checkpoint.best_metric=bpc"], "checkpoint.best_metric 'bpc' is not an eval metric"),
    (["model.mixers=[srwm]", "model.feature_map=elu1"], "srwm needs a probability feature map"),
    (
        ["model.mixers=[{mixer: attention, cell: delta_rule}]"],
        "model.mixers[0].cell is not read by the attention mixer or its block",
    ),
    (["data.task=formal_language", "data.language=anbn"], "unknown data.language 'anbn'"),
    (
        ["data.task=formal_language", "data.language=abab_star", "data.max_len=16"]
        + ["eval.lengths=[17]"],
        "abab_star has no strings of lengths 17..17",
    ),
    (["train.steps"], "override 'train.steps' is not of the form key=value"),
    (
        ["--coordinator", "127.0.0.1:1"],
        "--coordinator, --num-processes and --process-id go together",
    ),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--cpu-devices", "0"], "--cpu-devices must be >= 1, got 0"),
]


def run_cli(capsys, argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(err: str, fragment: str):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err


@pytest.mark.parametrize("extra, fragment", BAD_TRAIN_ARGS, ids=[f for _, f in BAD_TRAIN_ARGS])
def test_bad_train_input_changes_nothing(capsys, tiny_yaml, reference, extra, fragment):
    before = snapshot(reference)
    code, err = run_cli(capsys, ["train", tiny_yaml, "--workdir", reference, *extra])
    assert code == 2
    assert_one_line(err, fragment)
    assert snapshot(reference) == before


def test_a_different_architecture_is_refused_naming_the_keys(capsys, tiny_yaml, reference):
    before = snapshot(reference)
    argv = ["train", tiny_yaml, "--workdir", reference, "model.cell=linear_attn", "train.seed=3"]
    code, err = run_cli(capsys, argv)
    assert code == 2
    assert_one_line(
        err, "holds a run with a different config; differing keys: model.cell, train.seed"
    )
    assert snapshot(reference) == before


MQAR = str(Path(__file__).parents[1] / "configs" / "mqar.yaml")


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "missing.yaml"], "config file not found: missing.yaml"),
        (["train", "MALFORMED"], "malformed YAML in"),
        (["eval", "--workdir", "EMPTY"], "no checkpoint in"),
        (["sample", "--workdir", "EMPTY"], "no checkpoint in"),
        (["eval"], "the following arguments are required: --workdir"),
        (["sample", "--workdir", "EMPTY", "--num-tokens", "0"], "--num-tokens must be >= 1"),
        (["bench", "nonesuch"], "unknown benchmark 'nonesuch'; valid benchmarks:"),
        (
            ["train", MQAR, "--workdir", "EMPTY", "model.decay=per_key"],
            "per-key decay, and cell 'delta_rule' has none",
        ),
        (["frobnicate"], "unknown verb 'frobnicate'; valid verbs: train, eval, sample"),
        ([], "no verb given"),
    ],
)
def test_other_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, fragment):
    (tmp_path / "bad.yaml").write_text("model: {cell: [unclosed\n")
    (tmp_path / "empty").mkdir()
    subs = {"MALFORMED": tmp_path / "bad.yaml", "EMPTY": tmp_path / "empty"}
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, [subs.get(a, a) for a in argv])
    assert code == 2
    assert_one_line(err, fragment)
    assert snapshot(tmp_path) == before


def test_a_bad_prompt_is_refused(capsys, reference):
    code, err = run_cli(capsys, ["sample", "--workdir", reference, "--prompt", "1 99"])
    assert code == 2
    assert_one_line(err, "--prompt tokens [99] are outside the vocabulary 0..15")
