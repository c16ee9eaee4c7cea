"""The fast-weight math: one module per update-rule family, pure JAX, no parameters.

Every family module exposes GATES, step, recurrent (the reference), chunkwise and associative;
see each module's docstring for its recurrence and shapes; the derivations of the fast forms are in
linear_attention.md (linear_attn, gated_linear_attn) and delta_rules.md (the delta-rule families).
"""

from types import ModuleType

from fwpzoo.cells import (
    delta_product,
    delta_rule,
    gated_delta_rule,
    gated_linear_attn,
    linear_attn,
)

CELLS: dict[str, ModuleType] = {
    "linear_attn": linear_attn,
    "gated_linear_attn": gated_linear_attn,
    "delta_rule": delta_rule,
    "gated_delta_rule": gated_delta_rule,
    "delta_product": delta_product,
}

FORMS: tuple[str, ...] = ("recurrent", "chunkwise", "associative")


def get(name: str) -> ModuleType:
    """The family module called `name`; a ValueError listing the valid names otherwise."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; valid cells: {', '.join(CELLS)}")
    return CELLS[name]
