"""DeltaProduct: per token an optional decay, then N delta-rule sub-steps (N Householder factors).

    S_t^(0) = alpha_t S_{t-1}
    S_t^(j) = (I - beta_tj k_tj k_tj^T) S_t^(j-1) + beta_tj k_tj v_tj^T,   j = 1..N
    S_t = S_t^(N),   o_t = S_t^T q_t

q [B, T, H, K]; k [B, T, H, N, K]; v [B, T, H, N, V]; beta [B, T, H, N]; log_alpha [B, T, H] or
None (no decay); state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import functools

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc, _delta_chunk
from fwpzoo.cells._reference import initial_state, scan_steps, upcast
from fwpzoo.cells.delta_rule import delta_update

GATES: tuple[str, ...] = ("beta", "log_alpha")


def step(state, q, k, v, *, beta, log_alpha=None):
    """One token: q [B, H, K], k [B, H, N, K], v [B, H, N, V], beta [B, H, N], log_alpha [B, H]."""
    q, k, v, beta = upcast(q, k, v, beta)
    if log_alpha is not None:
        state = jnp.exp(upcast(log_alpha)[0])[..., None, None] * state
    for j in range(k.shape[-2]):
        state = delta_update(state, k[..., j, :], v[..., j, :], beta[..., j])
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, beta, log_alpha=None):
    gates = {"beta": beta} if log_alpha is None else {"beta": beta, "log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v[..., 0, :]), q, k, v, gates)
    return o.astype(v.dtype), state


def interleave(q, k, v, beta, log_alpha):
    """The N sub-steps of each token as one delta-rule sequence of T * N steps.

    [B, T, H, N, ...] -> [B, T * N, H, ...], sub-step j of token t at position t * N + j; the
    decay rides on each token's first sub-step and the query on its last, the only one read.
    """
    B, T, H, N, K = k.shape

    def flat(x):  # [B, T, H, N, ...] -> [B, T * N, H, ...]
        return jnp.moveaxis(x, 3, 2).reshape(B, T * N, H, *x.shape[4:])

    q_sub = jnp.zeros((B, T, N, H, K), q.dtype).at[:, :, -1].set(q)  # [B, T, N, H, K]
    if log_alpha is not None:
        log_alpha = jnp.zeros((B, T, N, H), log_alpha.dtype).at[:, :, 0].set(log_alpha)
        log_alpha = log_alpha.reshape(B, T * N, H)
    return q_sub.reshape(B, T * N, H, K), flat(k), flat(v), flat(beta), log_alpha


def chunkwise(q, k, v, *, state=None, chunk_size=64, beta, log_alpha=None):
    """Chunks run over the interleaved T * N sub-steps, so chunk_size counts sub-steps."""
    B, T, H, N, _ = k.shape
    q, k, v, beta, log_alpha = interleave(q, k, v, beta, log_alpha)
    o, state = _delta_chunk.chunkwise(q, k, v, beta, log_alpha, state, chunk_size)
    return o.reshape(B, T, N, H, -1)[:, :, -1], state


def associative(q, k, v, *, state=None, beta, log_alpha=None):
    """A token's N sub-steps compose into one affine map (M, X) before the scan over T."""
    m, x = _delta_assoc.elements(k, v, beta)  # [B, T, H, N, K, K], [B, T, H, N, K, V]
    sub_steps = [(m[..., j, :, :], x[..., j, :, :]) for j in range(k.shape[-2])]
    token = _delta_assoc.decayed(functools.reduce(_delta_assoc.combine, sub_steps), log_alpha)
    return _delta_assoc.scan(q, token, state, v.dtype)
