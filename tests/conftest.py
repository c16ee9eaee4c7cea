"""Fixtures shared by the test modules."""

import zlib

import numpy as np
import pytest

from fwpzoo import cli


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
