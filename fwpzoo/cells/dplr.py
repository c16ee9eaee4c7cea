"""Diagonal-plus-low-rank transition: RWKV-7's generalised delta rule (Peng et al. 2025).

    S_t = (Diag(exp(log_w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t

RWKV-7 takes a = -kappa and b = kappa * (in-context learning rate), with kappa a normalised key:
the delta rule's I - beta k k^T, with a per-key decay in place of I. The cell takes a and b free;
the FWP layer ties them as RWKV-7 does (GATE_SPECS): a = kappa, a unit direction, and
b = -rate * kappa with per-key rates in (0, 1), so b a^T = -(rate * kappa) kappa^T is RWKV-7's
and the transition does not expand. (Free projections give |a^T b| ~ sqrt(K) at init, and the
state of a 64-token sequence overflows to inf before any training.)

q, k, a, b [B, T, H, K]; v [B, T, H, V]; log_w [B, T, H, K] (log per-key decay, <= 0); state S
[B, H, K, V] float32; o [B, T, H, V] in v's dtype. The chunkwise form (a UT transform of the
low-rank reads, with per-key decays; flash-linear-attention's chunked DPLR delta rule) and the
associative form are derived in dplr.md. A chunk whose decays stay within
_chunking.FACTORED_SPREAD gets its four score matrices from one product and a hand-derived
backward; a chunk of stronger decays takes the per-key halving, differentiated by autodiff.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._chunking import Segments, factored_chunks, keep
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._remat_chunks import scan_chunks, vjp_pullback
from fwpzoo.cells._spec import (
    AFFINE,
    DIRECTION,
    LOG_DECAY,
    NEGATIVE_UNIT,
    PER_TOKEN_KEY,
    Gate,
    Objective,
    gate_names,
)
from fwpzoo.cells.chunked.scores import per_key_scores, prefix_sum
from fwpzoo.cells.chunked.triangular import inverse_with_pullback, unit_lower_inverse

GATE_SPECS = (
    Gate("log_w", shape=PER_TOKEN_KEY, range=LOG_DECAY),
    Gate("a", shape=PER_TOKEN_KEY, range=DIRECTION),  # kappa
    Gate("b", shape=PER_TOKEN_KEY, range=NEGATIVE_UNIT, times="a"),  # -rate * kappa
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = (Diag(exp(log_w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T",
    loss=(
        "none for free a, b; with RWKV-7's a = -kappa, b = eta kappa: "
        "eta/2 ||S^T kappa||^2 - v^T S^T k at S_{t-1}, beside the per-key decay"
    ),
    step=AFFINE,
    decay="log_w",
    paper="Peng et al. 2025 (RWKV-7 Goose)",
)


def step(state, q, k, v, *, reset=None, log_w, a, b):
    """One token: q, k, a, b, log_w [B, H, K], v [B, H, V]."""
    state = reset_state(state, reset)
    q, k, v, log_w, a, b = upcast(q, k, v, log_w, a, b)
    read = jnp.einsum("bhkv,bhk->bhv", state, a)  # [B, H, V]: a^T S
    state = jnp.exp(log_w)[..., None] * state + b[..., :, None] * read[..., None, :]
    state = state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, log_w, a, b):
    gates = {"log_w": log_w, "a": a, "b": b}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def _halved_chunk(s, q, k, v, log_w, a, b, reset):
    """One chunk (dplr.md, sections 1-4) with the per-key scores by halving, for any decay: the
    reads u_t = S_{t-1}^T a_t by a UT transform, then the outputs and the leaving state as gated
    linear attention over the writes b u^T + k v^T. q, k, a, b, log_w [B, H, C, K], v [B, H, C,
    V], reset [B, 1, C] or None. Its backward is autodiff."""
    g = jnp.cumsum(log_w, axis=-2)  # [B, H, C, K]: log decay from the chunk start, t included
    g_before = g - log_w  # [B, H, C, K]: ... up to t - 1, the decay the read at t sees
    # per-key decayed scores: reads against earlier writes (s < t), queries against s <= t
    two = lambda x, y: jnp.stack([x, y])  # noqa: E731  [2, B, H, C, K]: one batched call
    gg, bk = two(g, g), two(b, k)
    a_b, a_k = per_key_scores(two(a, a), bk, gg, two(g_before, g_before), strict=True)
    q_b, q_k = per_key_scores(two(q, q), bk, gg)  # [B, H, C, C] each
    e_before, e, to_end = jnp.exp(g_before), jnp.exp(g), jnp.exp(g[..., -1:, :] - g)
    e_last = jnp.exp(g[..., -1, :])  # [B, H, K]
    if reset is not None:  # no pair across a reset; the states only where they reach
        seg, dtype = Segments(reset), s.dtype
        a_b, a_k, q_b, q_k = (keep(seg.same, x, dtype) for x in (a_b, a_k, q_b, q_k))
        e_before, e = keep(seg.first, e_before, dtype), keep(seg.first, e, dtype)
        to_end, e_last = keep(seg.last, to_end, dtype), keep(seg.through, e_last, dtype)
    # U = (I - A_ab)^{-1} ((A . e^{g_before}) S_0 + A_ak V): row t is u_t
    u = inverse_with_pullback(-a_b) @ ((a * e_before) @ s + a_k @ v)  # [B, H, C, V]
    o = (q * e) @ s + q_b @ u + q_k @ v  # [B, H, C, V]
    leaving = e_last[..., None] * s + (b * to_end).mT @ u + (k * to_end).mT @ v
    return leaving, o


class _Factored:
    """One chunk in the factored form (dplr.md, sections 5 and 6).

    With m = g_C / 2 per key, every decay e^{g'_t - g_s} splits into e^{g'_t - m} e^{m - g_s}
    (reads: g' = g_before; queries: g' = g), so the four score matrices are the blocks of one
    [2C, 2C] product X Y^T with X = [A; Q] . e^{g' - m} and Y = [B; K] . e^{m - g}: exact while
    the chunk's decay spread |g_C| stays within _chunking.FACTORED_SPREAD. Holds what both
    directions need: X, Y, the masked scores, the entering and leaving state's factors and the
    UT transform."""

    def __init__(self, q, k, log_w, a, b, reset):
        size = q.shape[-2]
        g = prefix_sum(log_w)  # [B, H, C, K]: log decay from the chunk start, t included
        m = jax.lax.stop_gradient(g[..., -1:, :] / 2)  # [B, H, 1, K]: the scores do not depend on m
        self.x_decay = jnp.exp(jnp.concatenate([g - log_w, g], axis=-2) - m)  # [B, H, 2C, K]
        self.y_decay = _twice(jnp.exp(m - g))  # [B, H, 2C, K]
        self.x = jnp.concatenate([a, q], axis=-2) * self.x_decay  # [B, H, 2C, K]: [A~; Q~]
        self.y = jnp.concatenate([b, k], axis=-2) * self.y_decay  # [B, H, 2C, K]: [B~; K~]
        half = jnp.exp(m)  # [B, H, 1, K]: e^{g_C / 2}
        self.e_last = half[..., 0, :] ** 2  # [B, H, K]: e^{g_C}
        self.pairs = jnp.asarray(_pairs(size))  # [2C, 2C]: reads s < t, queries s <= t
        self.reach_first = self.reach_last = half
        if reset is not None:  # no pair across a reset; the states only where they reach
            seg, dtype = Segments(reset), g.dtype
            self.pairs = self.pairs & _twice(_twice(seg.same), axis=-1)  # [B, 1, 2C, 2C]
            self.reach_first = keep(_twice(seg.first, axis=-1), half, dtype)  # [B, H, 2C, K]
            self.reach_last = keep(_twice(seg.last, axis=-1), half, dtype)
            self.e_last = keep(seg.through, self.e_last, dtype)
        self.x_start = self.x * self.reach_first  # [A . e^{g_before}; Q . e^g]: read S_0
        self.y_end = self.y * self.reach_last  # [B; K] . e^{g_C - g}: write S_C
        self.scores = jnp.where(self.pairs, self.x @ self.y.mT, 0.0)  # [B, H, 2C, 2C]
        self.t = unit_lower_inverse(-self.scores[..., :size, :size])  # (I - A_ab)^{-1}

    def reads(self, s, v, queries=True):
        """U = (I - A_ab)^{-1} (A~ S_0 + A_ak V) [B, H, C, V] for the entering state s
        [B, H, K, V], and the queries' reads of S_0 [B, H, C, V] (None unless asked)."""
        size = v.shape[-2]
        x_start = self.x_start if queries else self.x_start[..., :size, :]
        start = x_start @ s  # [B, H, 2C or C, V]
        u = self.t @ (start[..., :size, :] + self.scores[..., :size, size:] @ v)
        return u, start[..., size:, :] if queries else None

    def forward(self, s, v):
        """(leaving state, o [B, H, C, V]) from the entering state s [B, H, K, V]."""
        size = v.shape[-2]
        u, q_start = self.reads(s, v)
        w = jnp.concatenate([u, v], axis=-2)  # [B, H, 2C, V]: the writes' values [U; V]
        o = q_start + self.scores[..., size:, :] @ w
        return self.e_last[..., None] * s + self.y_end.mT @ w, o

    def pullback(self, s, v, log_w, ds, do):
        """(ds entering, [dq, dk, dv, dlog_w, da, db]) from the cotangents of the leaving state
        ds [B, H, K, V] and of the outputs do [B, H, C, V] (dplr.md, section 6)."""
        size = v.shape[-2]
        scores = self.scores
        u, _ = self.reads(s, v, queries=False)
        w = jnp.concatenate([u, v], axis=-2)  # [B, H, 2C, V]
        dw = scores[..., size:, :].mT @ do + self.y_end @ ds  # [B, H, 2C, V]: via O and S_C
        du = self.t.mT @ dw[..., :size, :]  # [B, H, C, V]: the UT transform's adjoint
        dz = jnp.concatenate([du, do], axis=-2)  # [B, H, 2C, V]: cotangent of every row's read
        dv = dw[..., size:, :] + scores[..., :size, size:].mT @ du
        d_scores = jnp.where(self.pairs, dz @ w.mT, 0.0)  # [B, H, 2C, 2C]
        d_start, d_end = dz @ s.mT, w @ ds.mT  # [B, H, 2C, K]: of x_start, y_end
        dx = d_scores @ self.y + d_start * self.reach_first  # [B, H, 2C, K]
        dy = d_scores.mT @ self.x + d_end * self.reach_last
        ds_prev = self.x_start.mT @ dz + self.e_last[..., None] * ds
        d_aq, d_bk = dx * self.x_decay, dy * self.y_decay
        # every factor is e^{+-g} up to constants: dg is the factor times its cotangent
        dgx, dgy = dx * self.x, dy * self.y  # [B, H, 2C, K]
        dg_before = dgx[..., :size, :]
        dg = dgx[..., size:, :] - dgy[..., :size, :] - dgy[..., size:, :]  # [B, H, C, K]
        # y_end and the carried state scale with e^{g_C}: g_C is in every suffix sum below
        dg_last = jnp.sum(d_end * self.y_end, axis=-2) + self.e_last * jnp.sum(s * ds, axis=-1)
        # g = cumsum(log_w), g_before = g - log_w
        dlog_w = prefix_sum(dg + dg_before, reverse=True) + dg_last[..., None, :] - dg_before
        grads = [d_aq[..., size:, :], d_bk[..., size:, :], dv, dlog_w]
        return ds_prev, grads + [d_aq[..., :size, :], d_bk[..., :size, :]]


def _twice(x, axis=-2):
    """x stacked twice along axis: the layout of the [A; Q] and [B; K] rows."""
    return jnp.concatenate([x, x], axis=axis)


@functools.cache
def _pairs(size):
    """[2C, 2C] bool: the pairs the scores keep. Rows: C reads (strictly earlier writes), then C
    queries (writes up to their own token); columns: C b-writes, then C k-writes."""
    strict, lower = np.tri(size, k=-1, dtype=bool), np.tri(size, dtype=bool)
    return np.block([[strict, strict], [lower, lower]])


def _chunk(s, q, k, v, log_w, a, b, reset, factored):
    """One chunk -> (leaving state, o [B, H, C, V]): factored where the decays allow (factored
    [1, 1, C]: its chunk's flag from _chunking.factored_chunks on every token), halved
    otherwise."""

    def by_factors(s, q, k, v, log_w, a, b, reset):
        return _Factored(q, k, log_w, a, b, reset).forward(s, v)

    args = (s, q, k, v, log_w, a, b, reset)
    return jax.lax.cond(factored[0, 0, 0], by_factors, _halved_chunk, *args)


def _pullback(cotangents, s, q, k, v, log_w, a, b, reset, factored):
    """The chunk's backward (scan_chunks' contract): hand-derived for a factored chunk, autodiff
    of the halved one otherwise."""

    def by_factors(cotangents, s, q, k, v, log_w, a, b, reset):
        ds, do = cotangents
        return _Factored(q, k, log_w, a, b, reset).pullback(s, v, log_w, ds, do)

    args = (cotangents, s, q, k, v, log_w, a, b, reset)
    return jax.lax.cond(factored[0, 0, 0], by_factors, vjp_pullback(_halved_chunk), *args)


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_w, a, b):
    """Per chunk of C tokens: the low-rank reads by a unit-triangular inverse, the rest as
    per-key gated linear attention; the state carried across chunks. Padded tokens are
    identities (no decay, no write, a = b = 0)."""
    resets = None if reset is None else reset[:, :, None]  # [B, T, 1]: one row for all heads
    size = min(chunk_size, q.shape[1])
    factored = jnp.repeat(factored_chunks(log_w, size), size)[None, : q.shape[1], None]  # [1, T, 1]
    inputs = (q, k, v, log_w, a, b, resets, factored)
    state = initial_state(state, q, v)
    return scan_chunks(_chunk, inputs, state, chunk_size, pullback=_pullback)


def associative(q, k, v, *, state=None, reset=None, log_w, a, b):
    """Each token as the affine map (Diag(w) + b a^T, k v^T) [K, K], [K, V]; a reset zeroes the
    map's linear part, so nothing before it reaches later states."""
    log_w, a, b = upcast(log_w, a, b)
    m = jnp.exp(log_w)[..., :, None] * jnp.eye(a.shape[-1], dtype=a.dtype)  # [B, T, H, K, K]
    m = m + b[..., :, None] * a[..., None, :]
    if reset is not None:
        m = jnp.where(reset[:, :, None, None, None], 0.0, m)
    k32, v32 = upcast(k, v)
    x = k32[..., :, None] * v32[..., None, :]  # [B, T, H, K, V]
    return _delta_assoc.scan(q, (m, x), state, v.dtype)
