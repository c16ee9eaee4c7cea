"""Fixtures shared by the test modules."""

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id, so every test draws its own fixed numbers."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
