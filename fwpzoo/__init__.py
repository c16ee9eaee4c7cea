"""fwpzoo: a functional JAX/Flax model zoo of fast weight programmers."""

from fwpzoo.platform import choose_platform

__version__ = "0.1.0"

choose_platform()  # before JAX starts: where libtpu is installed without a TPU, no TPU probe
