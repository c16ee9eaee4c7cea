"""DeltaProduct: per token an optional decay, then N delta-rule sub-steps (N Householder factors).

    S_t^(0) = alpha_t S_{t-1}
    S_t^(j) = (I - beta_tj k_tj k_tj^T) S_t^(j-1) + beta_tj k_tj v_tj^T,   j = 1..N
    S_t = S_t^(N),   o_t = S_t^T q_t

q [B, T, H, K]; k [B, T, H, N, K]; v [B, T, H, N, V]; beta [B, T, H, N]; log_alpha [B, T, H] or
None (no decay); state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, scan_steps, to_f32
from fwpzoo.cells.delta_rule import delta_update

GATES: tuple[str, ...] = ("beta", "log_alpha")


def step(state, q, k, v, *, beta, log_alpha=None):
    """One token: q [B, H, K], k [B, H, N, K], v [B, H, N, V], beta [B, H, N], log_alpha [B, H]."""
    q, k, v, beta = to_f32(q, k, v, beta)
    if log_alpha is not None:
        state = jnp.exp(log_alpha.astype(jnp.float32))[..., None, None] * state
    for j in range(k.shape[-2]):
        state = delta_update(state, k[..., j, :], v[..., j, :], beta[..., j])
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, beta, log_alpha=None):
    gates = {"beta": beta} if log_alpha is None else {"beta": beta, "log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v[..., 0, :]), q, k, v, gates)
    return o.astype(v.dtype), state
