"""Experiments that reproduce the field's findings.

    fwpzoo experiment NAME [--quick] [--workdir DIR] [--no-progress]

Each public module NAME of this package is one experiment: its EXPERIMENT, a grid and a report,
which the sweep engine (_sweep.py) computes, records and reports; the runner below finds them by
name, so adding an experiment is adding a module (how: _sweep.py's docstring).
"""

import importlib
import pkgutil

from fwpzoo.config import ConfigError


def names() -> list[str]:
    """The experiments: the public modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    """Runs the sweep of fwpzoo.experiments.<argv[0]>.EXPERIMENT with the arguments after it;
    ConfigError (exit 2) for a bad name."""
    valid = names()
    if not argv or argv[0] not in valid:
        given = f"unknown experiment {argv[0]!r}" if argv else "no experiment named"
        raise ConfigError(f"{given}; valid experiments: {', '.join(valid)}")
    module = importlib.import_module(f"{__name__}.{argv[0]}")
    if not hasattr(module, "EXPERIMENT"):
        raise ConfigError(f"experiment {argv[0]!r} has no EXPERIMENT (a grid and a report)")
    from fwpzoo.experiments import _sweep  # the engine imports JAX: only once a sweep runs

    return _sweep.main(module.EXPERIMENT, argv[1:])
