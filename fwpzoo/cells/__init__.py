"""The fast-weight math: one module per update-rule family, pure JAX, no parameters.

Every family module exposes GATES, step, recurrent (the reference), chunkwise and associative
(where exact); see each module's docstring for its recurrence and shapes; the derivations of the
fast forms are in linear_attention.md (linear_attn, gated_linear_attn), delta_rules.md (the
delta-rule families), learning_rules.md (momentum_delta, oja, longhorn), dplr.md, mesa.md
and mlstm.md. Each module also declares its gates and its objective as data (_spec.py).

PROGRAMMED holds the cells whose programmer reads its own past (the Recurrent DeltaNet and the
self-referential weight matrix): their slow weights act inside the scan, so they take their own
inputs, have only `step`, `recurrent` and two memory-lean backwards (`reversible`,
`checkpointed`), and are not in CELLS (programmed/recurrent_fwp.md). They live in programmed/,
beside plastic.py (plastic networks: HebbFF, differentiable plasticity, backpropamine), of that
kind too: it takes a slow drive and presynaptic activity, not q, k, v (docs/plasticity.md).

The chunk engine that runs every chunkwise form, its shared pieces (chunking and segments,
triangular inverses, score matrices, rules differentiated by autodiff) and the chunk summaries
are in chunked/; the deep cells (a fast net trained at test time) in deep/.
"""

from types import ModuleType

from fwpzoo.cells import (
    comba,
    delta_product,
    delta_rule,
    dplr,
    gated_delta_rule,
    gated_linear_attn,
    gdn2,
    linear_attn,
    longhorn,
    mesa,
    mlstm,
    momentum_delta,
    oja,
)
from fwpzoo.cells.deep import deep, ttt_linear
from fwpzoo.cells.programmed import recurrent_delta, srwm

CELLS: dict[str, ModuleType] = {
    "linear_attn": linear_attn,
    "gated_linear_attn": gated_linear_attn,
    "delta_rule": delta_rule,
    "gated_delta_rule": gated_delta_rule,
    "delta_product": delta_product,
    "momentum_delta": momentum_delta,
    "oja": oja,
    "longhorn": longhorn,
    "dplr": dplr,
    "mesa": mesa,
    "mlstm": mlstm,
    "gdn2": gdn2,
    "comba": comba,
    "ttt_linear": ttt_linear,
    "deep": deep,
}

PROGRAMMED: dict[str, ModuleType] = {"recurrent_delta": recurrent_delta, "srwm": srwm}

FORMS: tuple[str, ...] = ("recurrent", "chunkwise", "associative")


def get(name: str) -> ModuleType:
    """The family module called `name`; a ValueError listing the valid names otherwise."""
    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; valid cells: {', '.join(CELLS)}")
    return CELLS[name]
