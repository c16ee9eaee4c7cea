"""What both benchmarks share: argument types, timing, memory accounting and the machine line."""

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax

from fwpzoo.config import ConfigError


class BenchArgs(argparse.ArgumentParser):
    """argparse whose errors are one-line ConfigErrors (the CLI prints them, exit code 2)."""

    def error(self, message):
        raise ConfigError(message)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its error message


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


positive_float.__name__ = "positive number"


def int_list(text: str) -> tuple[int, ...]:
    return tuple(positive_int(part) for part in text.split(","))


int_list.__name__ = "comma-separated list of positive integers"


def footprint_bytes(compiled) -> int | None:
    """What running a compiled function holds at its peak, by XLA's own accounting."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend that does not report it
        return None
    held = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    return held - stats.alias_size_in_bytes


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def alternating_medians(runs: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument run: the runs take turns, and in each turn a run is
    called twice and timed the second time, so it finds its own buffers warm instead of the
    memory the previous run released (a run after one that held gigabytes otherwise pays its
    page faults), and the load of a shared machine falls on all runs alike."""
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            timed(run)
            seconds[name].append(timed(run))
    return {name: statistics.median(values) for name, values in seconds.items()}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
        "devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
    }
