"""Gated linear attention: data-dependent decay, scalar (Mamba-2 SSD) or per key (GLA).

    S_t = Diag(exp(log_alpha_t)) S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H] (scalar decay) or [B, T, H, K] (per-key
decay), log space, <= 0; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, scan_steps, to_f32

GATES: tuple[str, ...] = ("log_alpha",)


def decay_rows(log_alpha, ndim_key):
    """exp(log_alpha) shaped to scale the rows of S: [B, H] -> [B, H, 1, 1], [B, H, K] -> [B, H, K, 1]."""
    alpha = jnp.exp(log_alpha.astype(jnp.float32))
    return alpha[..., None] if alpha.ndim == ndim_key else alpha[..., None, None]


def step(state, q, k, v, *, log_alpha):
    """One token: q, k [B, H, K], v [B, H, V], log_alpha [B, H] or [B, H, K]."""
    q, k, v = to_f32(q, k, v)
    state = decay_rows(log_alpha, k.ndim) * state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, log_alpha):
    gates = {"log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates)
    return o.astype(v.dtype), state
