"""Fixtures shared by the test modules."""

import zlib

import jax
import numpy as np
import pytest

from fwpzoo import cli

# JAX's backends start now, with the devices the environment asks for: a CLI call made in-process
# (fwpzoo train, eval or a benchmark) then keeps them rather than splitting the CPU per core for
# every test that runs after it.
jax.devices()


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
