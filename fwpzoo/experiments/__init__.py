"""Experiments that reproduce the field's findings.

    fwpzoo experiment NAME [--quick] [--workdir DIR] [--no-progress]

Each public module NAME of this package is one experiment with a `main(argv)`; the runner below
finds them by name, so adding an experiment is adding a module.
"""

import importlib
import pkgutil

from fwpzoo.config import ConfigError


def names() -> list[str]:
    """The experiments: the public modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    """Runs fwpzoo.experiments.<argv[0]>.main(argv[1:]); ConfigError (exit 2) for a bad name."""
    valid = names()
    if not argv or argv[0] not in valid:
        given = f"unknown experiment {argv[0]!r}" if argv else "no experiment named"
        raise ConfigError(f"{given}; valid experiments: {', '.join(valid)}")
    module = importlib.import_module(f"{__name__}.{argv[0]}")
    if not hasattr(module, "main"):
        raise ConfigError(f"experiment {argv[0]!r} has no main(argv)")
    return module.main(argv[1:]) or 0
