"""Gated linear attention: data-dependent decay, scalar (Mamba-2 SSD) or per key (GLA).

    S_t = Diag(exp(log_alpha_t)) S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H] (scalar decay) or [B, T, H, K] (per-key
decay), log space, <= 0; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
The parallel forms are derived in linear_attention.md.
"""

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    DECAY,
    GRADIENT,
    LOG_DECAY,
    SCALAR_OR_PER_KEY,
    Gate,
    Objective,
    State,
    gate_names,
    negative_correlation,
)
from fwpzoo.cells.chunked import linear as linear_chunks
from fwpzoo.cells.chunked.chunking import associative_states, resets_as_rows

GATE_SPECS = (Gate("log_alpha", SCALAR_OR_PER_KEY, LOG_DECAY),)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T",
    loss="-v_t^T S^T k_t",
    step=GRADIENT,
    loss_fn=negative_correlation,
    decay="log_alpha",
    state=State(transition=DECAY),
    paper="Yang et al. 2024 (GLA); Dao & Gu 2024 (Mamba-2)",
)


def decay_rows(log_alpha, ndim_key):
    """exp(log_alpha) shaped to scale the rows of S.

    [B, H] -> [B, H, 1, 1] (scalar decay), [B, H, K] -> [B, H, K, 1] (per-key decay).
    """
    (alpha,) = upcast(jnp.exp(log_alpha))
    return alpha[..., None] if alpha.ndim == ndim_key else alpha[..., None, None]


def step(state, q, k, v, *, reset=None, log_alpha):
    """One token: q, k [B, H, K], v [B, H, V], log_alpha [B, H] or [B, H, K]."""
    state = reset_state(state, reset)
    q, k, v = upcast(q, k, v)
    state = decay_rows(log_alpha, k.ndim) * state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, log_alpha):
    gates = {"log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def per_key_axis(log_alpha, q):
    """log_alpha with a trailing key axis: [..., K] stays, a scalar decay [...] becomes [..., 1]."""
    log_alpha = log_alpha.astype(jnp.float32)
    return log_alpha if log_alpha.ndim == q.ndim else log_alpha[..., None]


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_alpha):
    """Decayed causal attention inside each chunk of C tokens, the state carried across chunks.

    Only decays between two positions of one chunk are exponentiated (exponents <= 0).
    """
    return linear_chunks.chunkwise(q, k, v, log_alpha, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None, log_alpha):
    """Every S_t by an associative scan of (log decay, write) pairs; memory O(T K V)."""
    S0 = initial_state(state, q, v)
    q32, k, v32 = upcast(q, k, v)
    writes = k[..., :, None] * v32[..., None, :]  # [B, T, H, K, V]
    log_decay = per_key_axis(log_alpha, q)[..., None]  # [B, T, H, K|1, 1]
    reset = resets_as_rows(reset)  # [B, T, 1, 1, 1]
    states = associative_states(log_decay, writes, S0, axis=1, reset=reset)  # [B, T+1, H, K, V]
    o = jnp.einsum("bthkv,bthk->bthv", states[:, 1:], q32)
    return o.astype(v.dtype), states[:, -1]
