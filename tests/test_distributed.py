"""Data parallelism: 1 device, 4 simulated CPU devices, the CPU split in 2 by --cpu-devices (over
XLA_FLAGS asking for 1), and 2 processes x 2 devices (one 4-device mesh over JAX's distributed
runtime on 127.0.0.1) train to the same losses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

TINY_CONFIG = Path(__file__).parent / "fixtures" / "tiny.yaml"
TIMEOUT = 600
pytestmark = pytest.mark.slow  # trains in subprocesses, several at once


def command(config: Path, workdir: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fwpzoo",
        "train",
        str(config),
        "--workdir",
        str(workdir),
        "--no-progress",
        *map(str, extra),
    ]


def environment(devices: int) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags.strip()}


def logged(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The tests' tiny run cut to 6 steps, with a checkpoint and an evaluation every 3."""
    cfg = yaml.safe_load(TINY_CONFIG.read_text())
    cfg["train"]["steps"] = 6
    cfg["checkpoint"]["every"] = cfg["eval"]["every"] = 3
    path = tmp_path_factory.mktemp("configs") / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(config, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """(workdir, stderr) of the same config trained three ways, the processes started together."""
    root = tmp_path_factory.mktemp("runs")
    port = free_port()
    launches = {
        "1 device": [(command(config, root / "one"), environment(1))],
        "4 devices": [(command(config, root / "four"), environment(4))],
        "--cpu-devices 2": [(command(config, root / "split", "--cpu-devices", 2), environment(1))],
        "2 processes": [
            (
                command(
                    config,
                    root / "two",
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    2,
                    "--process-id",
                    i,
                ),
                environment(2),
            )
            for i in range(2)
        ],
    }
    started = {
        name: [
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for argv, env in group
        ]
        for name, group in launches.items()
    }
    results = {}
    try:
        for name, processes in started.items():
            outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
            for process, (_, err) in zip(processes, outputs, strict=True):
                assert process.returncode == 0, f"{name}: {err}"
            results[name] = outputs[0][1]
    finally:
        for processes in started.values():
            for process in processes:
                process.kill()
    return {
        "1 device": (root / "one", results["1 device"]),
        "4 devices": (root / "four", results["4 devices"]),
        "--cpu-devices 2": (root / "split", results["--cpu-devices 2"]),
        "2 processes": (root / "two", results["2 processes"]),
    }


def test_each_run_sees_the_mesh_it_asked_for(runs):
    assert "training on 1 cpu devices in 1 processes" in runs["1 device"][1]
    assert "training on 4 cpu devices in 1 processes" in runs["4 devices"][1]
    assert "training on 2 cpu devices in 1 processes" in runs["--cpu-devices 2"][1]
    assert "training on 4 cpu devices in 2 processes" in runs["2 processes"][1]


@pytest.mark.parametrize("name", ["4 devices", "--cpu-devices 2", "2 processes"])
def test_data_parallel_losses_equal_the_single_device_run(runs, name):
    reference, other = logged(runs["1 device"][0]), logged(runs[name][0])
    assert [m["step"] for m in other] == [m["step"] for m in reference] == list(range(1, 7))
    # Only the order of the gradient sum differs: float32 rounding, nothing more.
    np.testing.assert_allclose(
        [m["loss"] for m in other], [m["loss"] for m in reference], rtol=1e-5
    )
    np.testing.assert_allclose(
        [m["valid_loss"] for m in other if "valid_loss" in m],
        [m["valid_loss"] for m in reference if "valid_loss" in m],
        rtol=1e-5,
    )


def test_two_processes_equal_one_process_on_the_same_mesh(runs):
    four, two = logged(runs["4 devices"][0]), logged(runs["2 processes"][0])
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in four], rtol=1e-6)


def test_the_two_process_run_writes_one_workdir_once(runs):
    workdir = runs["2 processes"][0]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3, 6]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 6  # written once


def test_ctrl_c_on_one_process_stops_every_process_at_one_saved_step(config, tmp_path):
    """SIGINT reaches one process (a terminal's Ctrl-C); JAX's preemption service, which hears
    SIGTERM, makes every process stop after the same step and save it once."""
    port, workdir = free_port(), tmp_path / "run"
    long_run = ("train.steps=100000", "checkpoint.every=100000", "eval.every=100000")
    processes = [
        subprocess.Popen(
            command(config, workdir, *long_run, "--coordinator", f"127.0.0.1:{port}")
            + ["--num-processes", "2", "--process-id", str(i)],
            env=environment(1),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (workdir / "metrics.jsonl").exists() or not logged(workdir)[1:]:
            assert time.monotonic() < deadline and processes[0].poll() is None
            time.sleep(0.1)
        processes[0].send_signal(signal.SIGINT)
        errors = [p.communicate(timeout=TIMEOUT)[1] for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [130, 143]
    last = [err.strip().splitlines()[-1] for err in errors]
    step = int(last[0].split("after step ")[1].split(";")[0])
    for line, name in zip(last, ("SIGINT", "SIGTERM"), strict=True):
        assert f"stopped by {name} after step {step}; saved checkpoint {step}" in line
    assert "Traceback" not in errors[0] + errors[1]
    assert str(step) in os.listdir(workdir / "checkpoints")
    assert [m["step"] for m in logged(workdir)] == list(range(1, step + 1))
