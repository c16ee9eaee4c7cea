"""Fixtures shared by the test modules."""

import os
import shutil
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest

# Tests check what is computed, on tiny shapes: compiling is most of their time. So, for the
# xdist workers and the CLI subprocesses the tests start too (both inherit the environment of
# the process that loads this file first):
# - one on-disk cache of compiled XLA programs for this run: a program that several tests or
#   processes build is compiled once; it is removed when the run ends, so every run starts cold;
# - XLA skips its backend optimisations;
# - XLA:CPU emits fusions with its elemental emitters, which compile these small programs about
#   2.5 times faster than the MLIR fusion emitters, and compiles each program as one LLVM module
#   rather than splitting it for parallel codegen: the xdist workers already fill the cores, and
#   the split costs test_cells.py about 15 % more CPU time; both where this XLA has the flags.
OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="fwpzoo-test-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
    flags = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()
    probe = [sys.executable, "-c", "import jax; jax.devices()"]  # XLA aborts on unknown flags
    known = subprocess.run(probe, env={**os.environ, "XLA_FLAGS": flags}, capture_output=True)
    if known.returncode == 0:
        os.environ["XLA_FLAGS"] = flags

import jax  # noqa: E402

from fwpzoo import cli  # noqa: E402

# JAX's backends start now, with the devices the environment asks for: a CLI call made in-process
# (fwpzoo train, eval or a benchmark) then keeps them rather than splitting the CPU per core for
# every test that runs after it.
jax.devices()


def pytest_unconfigure(config):
    if OWN_CACHE and not hasattr(config, "workerinput"):  # the first process, after the workers
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id, so every test draws its own fixed numbers."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def refused(capsys):
    """check(argv, culprit): the CLI refuses argv with exit code 2, nothing on stdout and one
    line on stderr naming the culprit."""

    def check(argv, culprit):
        assert cli.main(argv) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.strip().splitlines()) == 1
        assert culprit in captured.err

    return check
