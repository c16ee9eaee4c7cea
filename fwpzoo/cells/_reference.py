"""Shared plumbing of the reference forms: the sequential scan over `step`, and segment resets.

Dimension letters: B batch, T time, H heads, K key dim, V value dim.

Resets: `reset` [B, T] bool (or [B] for one `step`). Where reset[b, t] is True the state of row b
before token t is replaced by the cell's zero state, so token t and later ones never see what came
before it in that row (packed sequences); the initial state is used only until the first reset.
"""

import jax
import jax.numpy as jnp


def state_dtype(*xs):
    """float32 for float32 and lower-precision inputs, so bf16 inputs never lower the state's
    precision; float64 when an input is float64 (under jax_enable_x64, for gradient checks)."""
    return jnp.result_type(jnp.float32, *(x for x in jax.tree.leaves(xs) if x is not None))


def initial_state(state, q, v):
    """The fast-weight matrix S [B, H, K, V] in state_dtype; None means zeros."""
    B, _, H, K = q.shape
    V = v.shape[-1]
    dtype = state_dtype(q, v, state)
    if state is None:
        return jnp.zeros((B, H, K, V), dtype)
    return state.astype(dtype)


def initial_parts(parts, state, q, v):
    """A dict state (parts: the cell's _spec.State) in state_dtype; None means its zeros."""
    B, _, H, K = q.shape
    dtype = state_dtype(q, v, state)
    if state is None:
        return parts.zeros(B, H, K, v.shape[-1], dtype)
    return {name: state[name].astype(dtype) for name, _ in parts.parts}


def reset_state(state, reset):
    """The state (an array or a dict of arrays, batch first) with the rows where reset [B] is
    True replaced by zeros; reset None leaves it as it is.

    A select, not a multiplication by 0: a non-finite value in a reset row does not leak, and the
    gradient w.r.t. the replaced state is exactly zero."""
    if reset is None:
        return state

    def zero_rows(s):
        rows = reset.reshape(reset.shape + (1,) * (s.ndim - 1))  # [B, 1, ...]
        return jnp.where(rows, jnp.zeros((), s.dtype), s)

    return jax.tree.map(zero_rows, state)


def scan_steps(step, state, q, k, v, gates, reset=None):
    """Runs `step` token by token; inputs are [B, T, ...], reset [B, T] bool or None; returns
    (o [B, T, H, V], state)."""

    def body(S, xs):
        q_t, k_t, v_t, gates_t, reset_t = xs
        return step(S, q_t, k_t, v_t, reset=reset_t, **gates_t)

    time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731  [B, T, ...] -> [T, B, ...]
    xs = jax.tree.map(time_major, (q, k, v, gates, reset))
    state, o = jax.lax.scan(body, state, xs)
    return jnp.moveaxis(o, 0, 1), state  # [B, T, H, V]


def upcast(*xs):
    """Each input in at least float32 (float64 stays float64)."""
    return tuple(x.astype(state_dtype(x)) for x in xs)
