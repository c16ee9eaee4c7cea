"""Gated linear attention: data-dependent decay, scalar (Mamba-2 SSD) or per key (GLA).

    S_t = Diag(exp(log_alpha_t)) S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H] (scalar decay) or [B, T, H, K] (per-key
decay), log space, <= 0; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
The parallel forms are derived in linear_attention.md.
"""

import jax.numpy as jnp

from fwpzoo.cells._chunking import diagonal_recurrence, from_chunks, to_chunks
from fwpzoo.cells._reference import initial_state, scan_steps, to_f32

GATES: tuple[str, ...] = ("log_alpha",)


def decay_rows(log_alpha, ndim_key):
    """exp(log_alpha) shaped to scale the rows of S.

    [B, H] -> [B, H, 1, 1] (scalar decay), [B, H, K] -> [B, H, K, 1] (per-key decay).
    """
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


def per_key_axis(log_alpha, q):
    """log_alpha with a trailing key axis: [..., K] stays, a scalar decay [...] becomes [..., 1]."""
    log_alpha = log_alpha.astype(jnp.float32)
    return log_alpha if log_alpha.ndim == q.ndim else log_alpha[..., None]


def chunkwise(q, k, v, *, state=None, chunk_size=64, log_alpha):
    """Decayed causal attention inside each chunk of C tokens, the state carried across chunks.

    Only decays between two positions of one chunk are exponentiated (exponents <= 0); the
    chunk-to-chunk recurrence keeps its decays in log space.
    """
    T, dtype = q.shape[1], v.dtype
    S0 = initial_state(state, q, v)
    log_alpha = per_key_axis(log_alpha, q)  # [B, T, H, K|1]
    q, k, v = (to_chunks(x, chunk_size) for x in to_f32(q, k, v))  # [B, H, N, C, K|V]
    g = jnp.cumsum(to_chunks(log_alpha, chunk_size), axis=3)  # [B, H, N, C, K|1] from chunk start
    g_end = g[..., -1:, :]  # [B, H, N, 1, K|1] log decay over the whole chunk
    writes = (k * jnp.exp(g_end - g)).mT @ v  # [B, H, N, K, V]
    states = diagonal_recurrence(g_end.mT, writes, S0, axis=2)  # [B, H, N + 1, K, V]
    o_inter = (q * jnp.exp(g)) @ states[:, :, :-1]  # [B, H, N, C, V]
    o = intra_chunk_scores(q, k, g) @ v + o_inter
    return from_chunks(o, T).astype(dtype), states[:, :, -1]


def intra_chunk_scores(q, k, g):
    """A_ts = sum_k q_tk k_sk exp(g_tk - g_sk) for s <= t, else 0: [B, H, N, C, C].

    The decay exponent is masked to -inf above the diagonal before exp, so neither the value nor
    its gradient ever sees exp of a positive number.
    """
    C = q.shape[-2]
    causal = jnp.tril(jnp.ones((C, C), bool))
    gap = g[..., :, None, :] - g[..., None, :, :]  # [B, H, N, C, C, K|1]
    decay = jnp.exp(jnp.where(causal[:, :, None], gap, -jnp.inf))
    if g.shape[-1] == 1:  # scalar decay: one matmul, then a [C, C] mask
        return (q @ k.mT) * decay[..., 0]
    return jnp.einsum("...tk,...sk,...tsk->...ts", q, k, decay)


def associative(q, k, v, *, state=None, log_alpha):
    """Every S_t by an associative scan of (log decay, write) pairs; memory O(T K V)."""
    S0 = initial_state(state, q, v)
    q32, k, v32 = to_f32(q, k, v)
    writes = k[..., :, None] * v32[..., None, :]  # [B, T, H, K, V]
    log_decay = per_key_axis(log_alpha, q)[..., None]  # [B, T, H, K|1, 1]
    states = diagonal_recurrence(log_decay, writes, S0, axis=1)  # [B, T + 1, H, K, V]
    o = jnp.einsum("bthkv,bthk->bthv", states[:, 1:], q32)
    return o.astype(v.dtype), states[:, -1]
