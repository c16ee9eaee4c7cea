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

from fwpzoo.cells._reference import initial_parts, reset_state, scan_steps, upcast
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
from fwpzoo.cells.chunked import autodiff
from fwpzoo.cells.chunked.chunking import Segments, keep, lower_mask
from fwpzoo.cells.chunked.precision import chunk_matmul

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
    state=State(parts=(("C", "K V"), ("n", "K"), ("m", "")), is_dict=True, transition=LOG_SCALE),
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


class _Chunks:
    """A batch of chunks [G B, ...] prepared (mlstm.md): the log weights D_ts = F_t - F_s +
    log_i_s of every write s <= t in the same segment (-inf elsewhere), where each token's
    segment starts, and the chunk's summary: F_C, the log weight of the entering state at the
    chunk end (-inf after a reset), and the writes' own part, stabilised by its largest log
    weight m_X (after a reset, m_X also counts the zero state the last segment starts from,
    entering with m = 0): X = sum_s e^{D_Cs - m_X} (k_s v_s^T, k_s). The state step is the
    max-plus combine of chunked/summary.py: m' = max(F_C + m_0, m_X), C' = e^{F_C + m_0 - m'}
    C_0 + e^{m_X - m'} X_C (n likewise). The outputs need every m_t, a max over the entering
    state's weight and the chunk's pairs, so they are computed from the entering state.
    q, k [G B, H, C, K], v [G B, H, C, V], log_f, log_i [G B, H, C], reset [G B, 1, C]."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, log_f, log_i = inputs
        size = q.shape[-2]
        F = jnp.cumsum(log_f, axis=-1)  # [G B, H, C]: log forget product since the chunk start
        pairs = lower_mask(size)  # [(G B, 1,) C, C]: s <= t, and no reset in (s, t]
        self.first = None
        F_start = jnp.zeros_like(F)  # [G B, H, C]: F before the segment of t starts
        if reset is not None:
            seg = Segments(reset)
            pairs = pairs & seg.same
            # a segment starting at r enters with m = 0 after F_{r-1}, the first with m_0
            starts = reset | (jnp.arange(size) == 0)  # [G B, 1, C]
            start_of = pairs & starts[..., None, :]  # [G B, 1, C, C]: (t, t's segment start)
            F_start = jnp.sum(jnp.where(start_of, (F - log_f)[..., None, :], 0.0), axis=-1)
            self.first = seg.first
        # D_ts = F_t - F_s + log_i_s: the log weight of write s in the state at t
        D = jnp.where(pairs, F[..., :, None] - F[..., None, :] + log_i[..., None, :], -jnp.inf)
        self.q, self.k, self.v, self.F, self.D = q, k, v, F - F_start, D
        # the leaving state's parts: the entering one reaches the end only with no reset
        through = jnp.ones(F.shape[:-1], bool) if reset is None else seg.through  # [G B, H | 1]
        carried = jnp.where(through, F[..., -1], -jnp.inf)  # [G B, H]
        m_x = jnp.max(D[..., -1, :], axis=-1)  # [G B, H]: the writes' largest log weight
        if reset is not None:  # the last segment's zero state, entering with m = 0
            m_x = jnp.where(through, m_x, jnp.maximum(m_x, self.F[..., -1]))
        written = m_x > -jnp.inf
        last = _weight(D[..., -1, :], jnp.where(written, m_x, 0.0)[..., None])[..., None] * k
        self.step = (carried, m_x, chunk_matmul(last.mT, v), jnp.sum(last, axis=-2))  # X_C, X_n

    def outputs(self, state, aux=None):
        """o [G B, H, C, V] from the entering states: every m_t exactly, then linear attention
        with the weights e^{D_ts - m_t} <= 1."""
        m0 = jnp.broadcast_to(state["m"][..., None], self.F.shape)  # [G B, H, C]
        D0 = self.F + (m0 if self.first is None else keep(self.first, m0, m0.dtype))
        m = jnp.maximum(D0, jnp.max(self.D, axis=-1))  # [G B, H, C]: the recurrent m_t
        P = jnp.exp(self.D - m[..., None])  # [G B, H, C, C], <= 1, 0 outside the pairs
        w0 = keep(self.first, jnp.exp(D0 - m), m.dtype)  # [G B, H, C]: the entering state's
        scores = chunk_matmul(self.q, self.k.mT) * P  # [G B, H, C, C]
        q = self.q
        numerator = w0[..., None] * chunk_matmul(q, state["C"]) + chunk_matmul(scores, self.v)
        denominator = w0 * jnp.sum(q * state["n"][..., None, :], -1) + jnp.sum(scores, -1)
        return numerator / jnp.maximum(jnp.abs(denominator), jnp.exp(-m))[..., None]


def _weight(log_weight, m):
    """e^{log_weight - m}, 0 where log_weight is -inf (m may then be -inf too): the inner select
    keeps -inf - -inf out of both the value and the gradient."""
    empty = log_weight == -jnp.inf
    return jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, log_weight - m)))


def _advance(step, state):
    """The max-plus combine of the chunk's summary with the entering state (C, n, m)."""
    carried, m_x, x_C, x_n = step
    carried = carried + state["m"]  # [B, H]: the entering state's log weight at the end
    m = jnp.maximum(carried, m_x)
    w0, wx = _weight(carried, m), _weight(m_x, m)  # [B, H]
    C = w0[..., None, None] * state["C"] + wx[..., None, None] * x_C
    return {"C": C, "n": w0[..., None] * state["n"] + wx[..., None] * x_n, "m": m}, None


RULE = autodiff.rule(autodiff.Math(prepare=_Chunks, advance=_advance))


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_f, log_i):
    """Stabilised linear attention inside each chunk of C tokens on the chunk engine, (C, n, m)
    scanned across. A padded token must leave m alone: log_i = -inf writes nothing (log_f = 0
    keeps m)."""
    (log_i,) = upcast(log_i)
    inputs = (q, k, v, log_f, log_i)
    fill = (None,) * 4 + (-jnp.inf,)
    state = initial_state(state, q, v)
    o, state = autodiff.run(RULE, inputs, reset, state, chunk_size, fill=fill)
    return o.astype(v.dtype), state
