"""mLSTM (xLSTM's matrix memory): a gated outer-product memory with a normaliser, kept in a
max-stabilised scale (Beck et al. 2024).

    m_t = max(log_f_t + m_{t-1}, log_i_t)
    f_t = exp(log_f_t + m_{t-1} - m_t),   i_t = exp(log_i_t - m_t)
    C_t = f_t C_{t-1} + i_t k_t v_t^T,     n_t = f_t n_{t-1} + i_t k_t
    o_t = C_t^T q_t / max(|n_t^T q_t|, exp(-m_t))

(C_t, n_t) are the unstabilised memory and normaliser times e^{-m_t}, so no gate is ever
exponentiated to more than 1 however large log_i grows. The zero state is C = 0, n = 0, m = 0.

q, k [B, T, H, K]; v [B, T, H, V]; log_f [B, T, H] (log forget gate, <= 0); log_i [B, T, H]
(log input gate, any real); state {"C": [B, H, K, V], "n": [B, H, K], "m": [B, H]} float32;
o [B, T, H, V] in v's dtype. The chunkwise form (Beck et al. 2025, "Tiled Flash Linear
Attention") is derived in mlstm.md; it computes every m_t exactly, so it returns the same state.
"""

import jax.numpy as jnp

from fwpzoo.cells._chunking import Segments, keep, lower_mask
from fwpzoo.cells._reference import initial_parts, reset_state, scan_steps, upcast
from fwpzoo.cells._remat_chunks import scan_chunks
from fwpzoo.cells._spec import (
    GRADIENT,
    LOG_DECAY,
    LOG_SCALE,
    REAL,
    Gate,
    Objective,
    State,
    gate_names,
    negative_correlation,
)

GATE_SPECS = (Gate("log_f", range=LOG_DECAY), Gate("log_i", range=REAL))
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update=(
        "C_t = f_t C_{t-1} + i_t k_t v_t^T, n_t = f_t n_{t-1} + i_t k_t, both scaled by e^{-m_t}; "
        "o_t = C_t^T q_t / max(|n_t^T q_t|, e^{-m_t})"
    ),
    loss="-v_t^T C^T k_t (on the unscaled memory e^{m} C)",
    step=GRADIENT,
    loss_fn=negative_correlation,
    lr="log_i",
    decay="log_f",
    state=State(
        parts=(("C", "K V"), ("n", "K"), ("m", "")), is_dict=True, transition=LOG_SCALE
    ),
    weights="C",
    log_scale="m",
    paper="Beck et al. 2024 (xLSTM); chunkwise: Beck et al. 2025 (Tiled Flash Linear Attention)",
)


def initial_state(state, q, v):
    """{"C": [B, H, K, V], "n": [B, H, K], "m": [B, H]}; None means the zero state."""
    return initial_parts(OBJECTIVE.state, state, q, v)


def read(C, n, m, q):
    """o = C^T q / max(|n^T q|, e^{-m}) for C [..., K, V], n, q [..., K], m [...]."""
    numerator = jnp.einsum("...kv,...k->...v", C, q)
    denominator = jnp.maximum(jnp.abs(jnp.sum(n * q, axis=-1)), jnp.exp(-m))
    return numerator / denominator[..., None]


def step(state, q, k, v, *, reset=None, log_f, log_i):
    """One token: q, k [B, H, K], v [B, H, V], log_f, log_i [B, H]."""
    state = reset_state(state, reset)
    q, k, v, log_f, log_i = upcast(q, k, v, log_f, log_i)
    C, n, m_prev = state["C"], state["n"], state["m"]
    m = jnp.maximum(log_f + m_prev, log_i)  # [B, H]
    f, i = jnp.exp(log_f + m_prev - m), jnp.exp(log_i - m)  # [B, H], both <= 1
    C = f[..., None, None] * C + (i[..., None] * k)[..., :, None] * v[..., None, :]
    n = f[..., None] * n + i[..., None] * k
    return {"C": C, "n": n, "m": m}, read(C, n, m, q)


def recurrent(q, k, v, *, state=None, reset=None, log_f, log_i):
    gates = {"log_f": log_f, "log_i": log_i}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def _chunk(state, q, k, v, log_f, log_i, reset):
    """One chunk (mlstm.md): every m_t as a max over the chunk's pairs, then linear attention
    with the weights e^{D_ts - m_t} <= 1. q, k [B, H, C, K], v [B, H, C, V], log_f, log_i
    [B, H, C], reset [B, 1, C] or None."""
    size = q.shape[-2]
    F = jnp.cumsum(log_f, axis=-1)  # [B, H, C]: log forget product since the chunk start
    seg = None if reset is None else Segments(reset)
    pairs = lower_mask(size)  # [(B, 1,) C, C]: s <= t, and no reset in (s, t]
    if seg is not None:
        pairs = pairs & seg.same
    # D_ts = F_t - F_s + log_i_s: the log weight of write s in the state at t
    D = jnp.where(pairs, F[..., :, None] - F[..., None, :] + log_i[..., None, :], -jnp.inf)
    m0 = jnp.broadcast_to(state["m"][..., None], F.shape)  # [B, H, C]
    if seg is None:
        D0 = F + m0  # the entering state's log weight at t
    else:
        # a segment starting at r enters with m = 0 after F_{r-1}, the first with m_0
        starts = reset | (jnp.arange(size) == 0)  # [B, 1, C]
        start_of = pairs & starts[..., None, :]  # [B, 1, C, C]: (t, the start of t's segment)
        F_start = jnp.sum(jnp.where(start_of, (F - log_f)[..., None, :], 0.0), axis=-1)
        D0 = F - F_start + keep(seg.first, m0, F.dtype)
    m = jnp.maximum(D0, jnp.max(D, axis=-1))  # [B, H, C]: exactly the recurrent m_t
    P = jnp.exp(D - m[..., None])  # [B, H, C, C], <= 1, 0 outside the pairs
    w0 = jnp.exp(D0 - m)  # [B, H, C]: the entering state's weight, <= 1
    if seg is not None:
        w0 = keep(seg.first, w0, w0.dtype)
    scores = (q @ k.mT) * P  # [B, H, C, C]
    C0, n0 = state["C"], state["n"]
    numerator = w0[..., None] * (q @ C0) + scores @ v  # [B, H, C, V]
    denominator = w0 * jnp.sum(q * n0[..., None, :], -1) + jnp.sum(scores, -1)  # [B, H, C]
    o = numerator / jnp.maximum(jnp.abs(denominator), jnp.exp(-m))[..., None]
    last = P[..., -1, :, None]  # [B, H, C, 1]: each write's weight in the leaving state
    w_last = w0[..., -1]  # [B, H]
    leaving = {
        "C": w_last[..., None, None] * C0 + (last * k).mT @ v,
        "n": w_last[..., None] * n0 + jnp.sum(last * k, axis=-2),
        "m": m[..., -1],
    }
    return leaving, o


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_f, log_i):
    """Stabilised linear attention inside each chunk of C tokens, (C, n, m) carried across."""
    T = q.shape[1]
    size = min(chunk_size, T)
    # A padded token must leave m alone: log_i = -inf writes nothing (log_f = 0 keeps m).
    (log_i,) = upcast(log_i)
    if T % size:
        log_i = jnp.pad(log_i, [(0, 0), (0, size - T % size), (0, 0)], constant_values=-jnp.inf)
    resets = None if reset is None else reset[:, :, None]  # [B, T, 1]: one row for all heads
    inputs = (q, k, v, log_f, log_i, resets)
    return scan_chunks(_chunk, inputs, initial_state(state, q, v), chunk_size)
