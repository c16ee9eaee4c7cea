"""Gated linear attention: data-dependent decay, scalar (Mamba-2 SSD) or per key (GLA).

    S_t = Diag(exp(log_alpha_t)) S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H] (scalar decay) or [B, T, H, K] (per-key
decay), log space, <= 0; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
The parallel forms are derived in linear_attention.md.
"""

import math

import jax.numpy as jnp

from fwpzoo.cells._chunking import associative_states, chunk_states, from_chunks, to_chunks
from fwpzoo.cells._reference import initial_state, scan_steps, upcast

GATES: tuple[str, ...] = ("log_alpha",)
SUB_CHUNK = 8  # per-key decay: pairs closer than this take the pairwise (non-matmul) form


def decay_rows(log_alpha, ndim_key):
    """exp(log_alpha) shaped to scale the rows of S.

    [B, H] -> [B, H, 1, 1] (scalar decay), [B, H, K] -> [B, H, K, 1] (per-key decay).
    """
    (alpha,) = upcast(jnp.exp(log_alpha))
    return alpha[..., None] if alpha.ndim == ndim_key else alpha[..., None, None]


def step(state, q, k, v, *, log_alpha):
    """One token: q, k [B, H, K], v [B, H, V], log_alpha [B, H] or [B, H, K]."""
    q, k, v = upcast(q, k, v)
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
    q, k, v = (to_chunks(x, chunk_size) for x in upcast(q, k, v))  # [B, H, N, C, K|V]
    g = jnp.cumsum(to_chunks(log_alpha, chunk_size), axis=3)  # [B, H, N, C, K|1] from chunk start
    g_end = g[..., -1:, :]  # [B, H, N, 1, K|1] log decay over the whole chunk
    writes = (k * jnp.exp(g_end - g)).mT @ v  # [B, H, N, K, V]
    entering, final = chunk_states(g_end.mT, writes, S0)  # [B, H, N, K, V], [B, H, K, V]
    o_inter = (q * jnp.exp(g)) @ entering  # [B, H, N, C, V]
    o = intra_chunk_scores(q, k, g) @ v + o_inter
    return from_chunks(o, T).astype(dtype), final


def intra_chunk_scores(q, k, g):
    """A_ts = sum_k q_tk k_sk exp(g_tk - g_sk) for s <= t, else 0: [B, H, N, C, C].

    g [B, H, N, C, K|1] is the log decay from the chunk start. Scalar decay: one matmul times a
    [C, C] decay matrix. Per-key decay: the pairwise [C, C, K] decays would cost C K per token
    outside any matmul, so the chunk is cut into sub-chunks of c tokens: pairs in different
    sub-chunks go through a matmul, each factor decayed to the boundary between them (both
    exponents <= 0), and only pairs inside one sub-chunk take the pairwise form (c K per token).
    """
    if g.shape[-1] == 1:
        return (q @ k.mT) * causal_decay(g)[..., 0]
    *lead, C, K = q.shape
    c = math.gcd(C, SUB_CHUNK)
    M = C // c
    qs, ks, gs = (x.reshape(*lead, M, c, K) for x in (q, k, g))  # [B, H, N, M, c, K]
    # log decay from the chunk start to the end of the previous sub-chunk (0 for the first)
    g_edge = jnp.concatenate([jnp.zeros_like(gs[..., :1, -1, :]), gs[..., :-1, -1, :]], axis=-2)
    q_far = qs * jnp.exp(gs - g_edge[..., None, :])  # [B, H, N, M, c, K]
    before_edge = jnp.arange(C) < c * jnp.arange(M)[:, None]  # [M, C]: s in an earlier sub-chunk
    to_edge = g_edge[..., None, :] - g[..., None, :, :]  # [B, H, N, M, C, K]
    k_far = k[..., None, :, :] * jnp.exp(jnp.where(before_edge[:, :, None], to_edge, -jnp.inf))
    across = (q_far @ k_far.mT).reshape(*lead, M, c, M, c)  # [B, H, N, M, c, M, c]
    within = jnp.einsum("...tk,...sk,...tsk->...ts", qs, ks, causal_decay(gs))  # [.., M, c, c]
    blocks = across + jnp.eye(M)[:, None, :, None] * within[..., :, :, None, :]
    return blocks.reshape(*lead, C, C)


def causal_decay(g):
    """exp(g_t - g_s) for s <= t, else 0: [..., C, C, K|1] from g [..., C, K|1].

    The exponent is masked to -inf above the diagonal before exp, so neither the value nor its
    gradient ever sees exp of a positive number.
    """
    C = g.shape[-2]
    causal = jnp.tril(jnp.ones((C, C), bool))
    gap = g[..., :, None, :] - g[..., None, :, :]  # [..., C, C, K|1]
    return jnp.exp(jnp.where(causal[:, :, None], gap, -jnp.inf))


def associative(q, k, v, *, state=None, log_alpha):
    """Every S_t by an associative scan of (log decay, write) pairs; memory O(T K V)."""
    S0 = initial_state(state, q, v)
    q32, k, v32 = upcast(q, k, v)
    writes = k[..., :, None] * v32[..., None, :]  # [B, T, H, K, V]
    log_decay = per_key_axis(log_alpha, q)[..., None]  # [B, T, H, K|1, 1]
    states = associative_states(log_decay, writes, S0, axis=1)  # [B, T + 1, H, K, V]
    o = jnp.einsum("bthkv,bthk->bthv", states[:, 1:], q32)
    return o.astype(v.dtype), states[:, -1]
