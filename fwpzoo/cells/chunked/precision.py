"""The chunk engine's dtype policy: which products round their operands, and to what.

    chunk matmuls   every product of the prepare and outputs stages and of their pullbacks
                    (scores Q K^T and K K^T, the writes K^T V, W = T diag(beta) K, the outputs'
                    A V, P U and Q S, ...): operands rounded to the compute dtype, accumulated
                    and returned in float32 (chunk_matmul)
    float32         the state carried by the scan and every product in its loop body
                    (state_matmul); at HIGHEST precision on every platform, the decay cumsums
                    and their exponentials (prefix_sum), products of decays (decay_matmul),
                    the triangular inverses (triangular.py) and mesa's Cholesky solves
                    (cells/_cholesky.py)

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
at most 1.4 x 2^-8 at C = 16 for outputs and state, 2.5 x 2^-8 for gradients (gdn2's
d log_alpha); 2.5 x 2^-8 at C = 64).

Dimension letters: as in engine.py.
"""

import contextlib
import contextvars
import functools
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
    (float32 for bfloat16 inputs laid out in float32). Outside the engine: a @ b.

    Where it rounds, its derivative is a chunk matmul too (_rounded): the rules whose chunk
    backward is autodiff (chunked/autodiff.py) then pull back as the hand-derived ones do, on
    rounded operands with float32 accumulation and float32 cotangents, where jax's own
    transpose would multiply a float32 cotangent by a bfloat16 operand (a float32 product on an
    accelerator) and round the operand's cotangent to bfloat16."""
    policy = _ACTIVE.get()
    if policy is None:
        return a @ b
    if jnp.result_type(a, b) == jnp.dtype(policy.compute):  # nothing to round
        return _matmul(a, b, policy.compute, policy.precision)
    return _rounded(a, b, policy.compute, policy.precision)


def _matmul(a, b, compute, precision):
    out = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = a.astype(compute), b.astype(compute)
    return jnp.matmul(a, b, precision=_LAX[precision], preferred_element_type=out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rounded(a, b, compute, precision):
    return _matmul(a, b, compute, precision)


def _rounded_fwd(a, b, compute, precision):
    return _matmul(a, b, compute, precision), (a, b)


def _rounded_bwd(compute, precision, res, dc):
    """(dA, dB) = (dC B^T, A^T dC), each a chunk matmul, in A's and B's dtypes. a, b
    [..., M, N] and [..., N, P] (or broadcast batch axes, summed back to each operand's)."""
    a, b = res
    da = _matmul(dc, jnp.swapaxes(b, -1, -2), compute, precision)
    db = _matmul(jnp.swapaxes(a, -1, -2), dc, compute, precision)
    return _unbroadcast(da, a), _unbroadcast(db, b)


def _unbroadcast(d, like):
    """d summed over the batch axes jnp.matmul broadcast `like` over, in like's dtype."""
    lead = d.ndim - like.ndim
    d = jnp.sum(d, axis=tuple(range(lead))) if lead else d
    axes = tuple(i for i in range(like.ndim - 2) if like.shape[i] == 1 and d.shape[i] != 1)
    return (jnp.sum(d, axis=axes, keepdims=True) if axes else d).astype(like.dtype)


_rounded.defvjp(_rounded_fwd, _rounded_bwd)


def state_matmul(a, b):
    """a @ b in its own dtype (float32: the state's), at the policy's precision."""
    policy = _ACTIVE.get()
    if policy is None:
        return a @ b
    return jnp.matmul(a, b, precision=_LAX[policy.precision])


def decay_matmul(a, b):
    """a @ b of decay factors (sums of products of e^{g_t - g_s}, momentum_delta's weights of
    every write in every state) in float32 at HIGHEST precision on every platform, whatever the
    policy: decays keep their float32 bits as the cumsums they come from do (scores.prefix_sum)."""
    with jax.named_scope("decay_product"):  # named for profiles and the dtype test
        return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
