"""The form lookup: a family's recurrent, chunkwise or associative form by name, and one call
that runs it over a sequence (what the mixers of fwpzoo.layers use).

Dimension letters: B batch, T time, H heads, K key dim, V value dim.
"""

from fwpzoo.cells import FORMS, get
from fwpzoo.cells.chunked.precision import matmul_precision


def form_fn(cell: str, form: str):
    """The function of `form` in the family `cell`; a ValueError naming what is wrong otherwise."""
    module = get(cell)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid forms: {', '.join(FORMS)}")
    if not hasattr(module, form):
        valid = ", ".join(f for f in FORMS if hasattr(module, f))
        raise ValueError(f"cell {cell!r} has no {form!r} form; its forms: {valid}")
    return getattr(module, form)


def reset_option(reset) -> dict:
    """The `reset` keyword for a cell form or step: only where there are resets to pass."""
    return {} if reset is None else {"reset": reset}


def run_form(
    cell: str, form: str, chunk_size: int, q, k, v, state, gates, reset=None, precision="default"
):
    """The cell's `form` over a whole sequence (segment resets [B, T] or None), its chunk
    matmuls at `precision` (model.matmul_precision: chunked/precision.py)
    -> (o [B, T, H, V], state [B, H, K, V])."""
    options = {"chunk_size": chunk_size} if form == "chunkwise" else {}
    fn = form_fn(cell, form)
    with matmul_precision(precision):
        return fn(q, k, v, state=state, **options, **reset_option(reset), **gates)
