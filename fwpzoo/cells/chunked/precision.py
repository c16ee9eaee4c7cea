"""The chunk engine's dtype policy: which products round their operands, and to what.

    chunk matmuls   every product of the prepare and outputs stages and of their pullbacks
                    (scores Q K^T and K K^T, the writes K^T V, W = T diag(beta) K, the outputs'
                    A V, P U and Q S, ...): operands rounded to the compute dtype, accumulated
                    and returned in float32 (chunk_matmul)
    float32         the state carried by the scan and every product in its loop body
                    (state_matmul), the decay cumsums and their exponentials (prefix_sum), the
                    triangular inverses (triangular.py, at HIGHEST precision on every platform)

The compute dtype is the inputs' own: q, k and v of bfloat16 (a model trained with
train.compute_dtype=bfloat16) make bfloat16 chunk matmuls; float32 inputs round nothing, and
their products are the same as before this policy existed. Gates are laid out in float32
whatever their dtype, so the decays never lose bits before the cumsum.

`matmul_precision` (model.matmul_precision: default | high | highest) is jax's `precision=` of
every chunk and scan product (on a TPU DEFAULT rounds float32 operands to one bfloat16 pass,
HIGH to three, HIGHEST keeps float32; an NVIDIA GPU since Ampere takes TF32 for DEFAULT; the
CPU ignores it).

Error bound (delta_rules.md section 8; tests/test_cells.py, chunk_bf16_tolerance): bfloat16
has 8 mantissa bits, so a rounded operand is off by at most 2^-9 relative and a product of two
by about 2^-8. A chunk sums C such products, whose independent errors grow as sqrt(C), and the
delta rules spread them through (I + A)^{-1}; the state the scan carries is never rounded, so
no chunk's error compounds the next one's. On the same rounded inputs the outputs, the final
state and the gradients stay within 2^-8 sqrt(C) relative RMS of float32 arithmetic (measured
at most 1.4 x 2^-8 at C = 16 for outputs and state, 2.3 x 2^-8 for gradients; 2.5 x 2^-8 at
C = 64).

Dimension letters: as in engine.py.
"""

import contextlib
import contextvars
from dataclasses import dataclass

import jax
import jax.numpy as jnp

PRECISIONS: tuple[str, ...] = ("default", "high", "highest")
_LAX = {
    "default": jax.lax.Precision.DEFAULT,
    "high": jax.lax.Precision.HIGH,
    "highest": jax.lax.Precision.HIGHEST,
}
_REQUESTED = contextvars.ContextVar("fwpzoo_matmul_precision", default="default")
_ACTIVE = contextvars.ContextVar("fwpzoo_chunk_policy", default=None)


def check_precision(name: str) -> None:
    if name not in PRECISIONS:
        raise ValueError(f"unknown matmul precision {name!r}; valid: {', '.join(PRECISIONS)}")


@contextlib.contextmanager
def matmul_precision(name: str):
    """Within it, chunkwise forms traced take `name` (one of PRECISIONS) as the precision of
    their chunk and scan products. Read when a form is traced: put it inside what you jit."""
    check_precision(name)
    token = _REQUESTED.set(name)
    try:
        yield
    finally:
        _REQUESTED.reset(token)


@dataclass(frozen=True)
class Policy:
    """compute: the dtype chunk matmuls round their operands to (a numpy dtype name);
    precision: one of PRECISIONS."""

    compute: str
    precision: str


def policy_for(q, k, v) -> Policy:
    """The policy of a run on q, k, v: their promoted dtype, the precision of the scope."""
    return Policy(jnp.result_type(q, k, v).name, _REQUESTED.get())


@contextlib.contextmanager
def active(policy: Policy):
    """The engine's stages are traced within it: chunk_matmul and state_matmul follow policy."""
    token = _ACTIVE.set(policy)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def chunk_matmul(a, b):
    """a @ b with both operands in the compute dtype, accumulated in a @ b's own dtype
    (float32 for bfloat16 inputs laid out in float32). Outside the engine: a @ b."""
    policy = _ACTIVE.get()
    if policy is None:
        return a @ b
    out = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = a.astype(policy.compute), b.astype(policy.compute)
    return jnp.matmul(a, b, precision=_LAX[policy.precision], preferred_element_type=out)


def state_matmul(a, b):
    """a @ b in its own dtype (float32: the state's), at the policy's precision."""
    policy = _ACTIVE.get()
    if policy is None:
        return a @ b
    return jnp.matmul(a, b, precision=_LAX[policy.precision])
