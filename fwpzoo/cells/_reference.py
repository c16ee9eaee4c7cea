"""Shared plumbing of the reference forms: the sequential scan over `step`.

Dimension letters: B batch, T time, H heads, K key dim, V value dim.
"""

import jax
import jax.numpy as jnp


def initial_state(state, q, v):
    """The float32 fast-weight matrix S [B, H, K, V]; None means zeros."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    if state is None:
        return jnp.zeros((B, H, K, V), jnp.float32)
    return state.astype(jnp.float32)


def scan_steps(step, state, q, k, v, gates):
    """Runs `step` token by token; inputs are [B, T, ...], returns (o [B, T, H, V], state)."""

    def body(S, xs):
        q_t, k_t, v_t, gates_t = xs
        return step(S, q_t, k_t, v_t, **gates_t)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  [B, T, ...] -> [T, B, ...]
    xs = jax.tree.map(time_major, (q, k, v, gates))
    state, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state  # [B, T, H, V]


def to_f32(*xs):
    return tuple(x.astype(jnp.float32) for x in xs)
