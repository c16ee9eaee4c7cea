"""Shared plumbing of the reference forms: the sequential scan over `step`.

Dimension letters: B batch, T time, H heads, K key dim, V value dim.
"""

import jax
import jax.numpy as jnp


def state_dtype(*xs):
    """float32 for float32 and lower-precision inputs, so bf16 inputs never lower the state's
    precision; float64 when an input is float64 (under jax_enable_x64, for gradient checks)."""
    return jnp.result_type(jnp.float32, *(x for x in xs if x is not None))


def initial_state(state, q, v):
    """The fast-weight matrix S [B, H, K, V] in state_dtype; None means zeros."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    dtype = state_dtype(q, v, state)
    if state is None:
        return jnp.zeros((B, H, K, V), dtype)
    return state.astype(dtype)


def scan_steps(step, state, q, k, v, gates):
    """Runs `step` token by token; inputs are [B, T, ...], returns (o [B, T, H, V], state)."""

    def body(S, xs):
        q_t, k_t, v_t, gates_t = xs
        return step(S, q_t, k_t, v_t, **gates_t)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  [B, T, ...] -> [T, B, ...]
    xs = jax.tree.map(time_major, (q, k, v, gates))
    state, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state  # [B, T, H, V]


def upcast(*xs):
    """Each input in at least float32 (float64 stays float64)."""
    return tuple(x.astype(state_dtype(x)) for x in xs)
