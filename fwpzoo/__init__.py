"""fwpzoo: a functional JAX/Flax model zoo of fast weight programmers."""

__version__ = "0.1.0"
