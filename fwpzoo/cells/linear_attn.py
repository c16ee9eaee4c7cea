"""Linear attention, the vanilla fast weight programmer (Hebbian update).

    S_t = S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, scan_steps, to_f32

GATES: tuple[str, ...] = ()


def step(state, q, k, v):
    """One token: q, k [B, H, K], v [B, H, V] -> (S [B, H, K, V], o [B, H, V])."""
    q, k, v = to_f32(q, k, v)
    state = state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None):
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, {})
    return o.astype(v.dtype), state
