"""Experiments that reproduce the field's findings.

    fwpzoo experiment NAME [--quick] [--workdir DIR] [--no-progress]
    fwpzoo experiment --help                    # the experiments; NAME --help: one's options

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


def usage() -> str:
    """What `fwpzoo experiment --help` prints: the command line and the experiments."""
    return (
        "usage: fwpzoo experiment NAME [--quick] [--workdir DIR] [--cpu-devices N] "
        "[--allow-dirty] [--point P | --list | --report-only | --only GLOB] [--no-progress]\n"
        f"experiments: {', '.join(names())}\n"
        "fwpzoo experiment NAME --help describes each option."
    )


def main(argv: list[str]) -> int:
    """Runs the sweep of fwpzoo.experiments.<argv[0]>.EXPERIMENT with the arguments after it;
    -h/--help alone prints the usage and the experiments; ConfigError (exit 2) for a bad name."""
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        return 0
    valid = names()
    if not argv or argv[0] not in valid:
        given = f"unknown experiment {argv[0]!r}" if argv else "no experiment named"
        raise ConfigError(f"{given}; valid experiments: {', '.join(valid)}")
    module = importlib.import_module(f"{__name__}.{argv[0]}")
    if not hasattr(module, "EXPERIMENT"):
        raise ConfigError(f"experiment {argv[0]!r} has no EXPERIMENT (a grid and a report)")
    from fwpzoo.experiments import _sweep  # the engine imports JAX: only once a sweep runs

    return _sweep.main(module.EXPERIMENT, argv[1:])
