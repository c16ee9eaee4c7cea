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
chunked/chunking.FACTORED_SPREAD gets its four score matrices from one product and a hand-derived
backward; a chunk of stronger decays takes the per-key halving, differentiated by autodiff.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
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
from fwpzoo.cells.chunked import autodiff, engine
from fwpzoo.cells.chunked.chunking import Segments, factored_chunks, keep
from fwpzoo.cells.chunked.precision import chunk_matmul, state_matmul
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


class _Halved:
    """One batch of chunks with the per-key scores by halving, for any decay (dplr.md,
    sections 1-4), in _Factored's layout: the scores [2C, 2C] of the reads [A; Q] (rows)
    against the writes [B; K] (columns), the entering state's read factors x_start, the
    leaving state's write factors y_end, e^{g_C} and the UT transform of the reads. Its
    backward is autodiff (the inverse's own pullback inside). q, k, a, b, log_w
    [G B, H, C, K], reset [G B, 1, C] or None."""

    def __init__(self, q, k, log_w, a, b, reset):
        g = jnp.cumsum(log_w, axis=-2)  # [G B, H, C, K]: log decay from the chunk start
        g_before = g - log_w  # [G B, H, C, K]: ... up to t - 1, the decay the read at t sees
        # per-key decayed scores: reads against earlier writes (s < t), queries against s <= t
        two = lambda x, y: jnp.stack([x, y])  # noqa: E731  [2, G B, H, C, K]: one batched call
        gg, bk = two(g, g), two(b, k)
        a_b, a_k = per_key_scores(two(a, a), bk, gg, two(g_before, g_before), strict=True)
        q_b, q_k = per_key_scores(two(q, q), bk, gg)  # [G B, H, C, C] each
        e_before, e, to_end = jnp.exp(g_before), jnp.exp(g), jnp.exp(g[..., -1:, :] - g)
        self.e_last = jnp.exp(g[..., -1, :])  # [G B, H, K]
        if reset is not None:  # no pair across a reset; the states only where they reach
            seg, dtype = Segments(reset), g.dtype
            a_b, a_k, q_b, q_k = (keep(seg.same, x, dtype) for x in (a_b, a_k, q_b, q_k))
            e_before, e = keep(seg.first, e_before, dtype), keep(seg.first, e, dtype)
            to_end = keep(seg.last, to_end, dtype)
            self.e_last = keep(seg.through, self.e_last, dtype)
        rows = lambda x, y: jnp.concatenate([x, y], axis=-1)  # noqa: E731
        self.scores = jnp.concatenate([rows(a_b, a_k), rows(q_b, q_k)], axis=-2)  # [.., 2C, 2C]
        self.x_start = jnp.concatenate([a * e_before, q * e], axis=-2)  # [G B, H, 2C, K]
        self.y_end = jnp.concatenate([b * to_end, k * to_end], axis=-2)
        self.t = inverse_with_pullback(-a_b)  # (I - A_ab)^{-1}


class _Factored:
    """One chunk in the factored form (dplr.md, sections 5 and 6).

    With m = g_C / 2 per key, every decay e^{g'_t - g_s} splits into e^{g'_t - m} e^{m - g_s}
    (reads: g' = g_before; queries: g' = g), so the four score matrices are the blocks of one
    [2C, 2C] product X Y^T with X = [A; Q] . e^{g' - m} and Y = [B; K] . e^{m - g}: exact while
    the chunk's decay spread |g_C| stays within chunking.FACTORED_SPREAD. Holds what both
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
        self.scores = jnp.where(self.pairs, chunk_matmul(self.x, self.y.mT), 0.0)  # [B, H, 2C, 2C]
        self.t = unit_lower_inverse(-self.scores[..., :size, :size])  # (I - A_ab)^{-1}

    def reads(self, s, v, queries=True):
        """U = (I - A_ab)^{-1} (A~ S_0 + A_ak V) [B, H, C, V] for the entering state s
        [B, H, K, V], and the queries' reads of S_0 [B, H, C, V] (None unless asked)."""
        size = v.shape[-2]
        x_start = self.x_start if queries else self.x_start[..., :size, :]
        start = chunk_matmul(x_start, s)  # [B, H, 2C or C, V]
        unsolved = start[..., :size, :] + chunk_matmul(self.scores[..., :size, size:], v)
        u = chunk_matmul(self.t, unsolved)  # [B, H, C, V]
        return u, start[..., size:, :] if queries else None

    def pullback(self, s, v, log_w, ds, do, du):
        """[dq, dk, dv, dlog_w, da, db] from the entering state s [B, H, K, V], the cotangents
        of the leaving state ds [B, H, K, V], of the outputs do [B, H, C, V] and of the reads
        du [B, H, C, V] (the UT transform's adjoint of both, _Chunks.pullback; dplr.md,
        section 6). The entering state's cotangent is the engine's (_Chunks.pull, _retreat)."""
        size = v.shape[-2]
        scores = self.scores
        u, _ = self.reads(s, v, queries=False)
        w = jnp.concatenate([u, v], axis=-2)  # [B, H, 2C, V]
        dz = jnp.concatenate([du, do], axis=-2)  # [B, H, 2C, V]: cotangent of every row's read
        dv = chunk_matmul(scores[..., size:, size:].mT, do)  # [B, H, C, V]: via O, S_C, U
        dv = dv + chunk_matmul(self.y_end[..., size:, :], ds)
        dv = dv + chunk_matmul(scores[..., :size, size:].mT, du)
        d_scores = jnp.where(self.pairs, chunk_matmul(dz, w.mT), 0.0)  # [B, H, 2C, 2C]
        d_start, d_end = chunk_matmul(dz, s.mT), chunk_matmul(w, ds.mT)  # [B, H, 2C, K]
        dx = chunk_matmul(d_scores, self.y) + d_start * self.reach_first  # [B, H, 2C, K]
        dy = chunk_matmul(d_scores.mT, self.x) + d_end * self.reach_last
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
        return grads + [d_aq[..., :size, :], d_bk[..., :size, :]]


def _twice(x, axis=-2):
    """x stacked twice along axis: the layout of the [A; Q] and [B; K] rows."""
    return jnp.concatenate([x, x], axis=axis)


@functools.cache
def _pairs(size):
    """[2C, 2C] bool: the pairs the scores keep. Rows: C reads (strictly earlier writes), then C
    queries (writes up to their own token); columns: C b-writes, then C k-writes."""
    strict, lower = np.tri(size, k=-1, dtype=bool), np.tri(size, dtype=bool)
    return np.block([[strict, strict], [lower, lower]])


class _Chunks:
    """A batch of chunks [G B, ...] (the engine's prepare stage): _Factored's scores where the
    block's decays allow, _Halved's otherwise, and the chunk's state step in factored form
    (dplr.md, section 8): the reads U = T (A~ S_0 + A_ak V) from the entering state, then
    S_C = Diag(e^{g_C}) S_0 + (B . e^{g_C - g})^T U + (K . e^{g_C - g})^T V: products of
    [C, K] rows with the state; `fused` (one chunk per block) keeps T and the unsolved rows,
    the accelerator layout forms T A~ and T A_ak V in the prepare stage. The outputs and the
    cotangent step are hand-derived for both kinds of chunk; the pullback of the inputs is too
    for a factored chunk (_Factored.pullback), autodiff of this class for a halved one.
    q, k, a, b, log_w [G B, H, C, K], v [G B, H, C, V], reset [G B, 1, C] or None."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, log_w, a, b = inputs
        self.inputs, self.reset, self.factored, self.fused = inputs, reset, factored, fused
        kind = _Factored if factored else _Halved
        self.core = core = kind(q, k, log_w, a, b, reset)
        size = q.shape[-2]
        self.v, self.size = v, size
        reads = core.x_start[..., :size, :]  # [G B, H, C, K]: A~, the reads of S_0
        written = chunk_matmul(core.scores[..., :size, size:], v)  # [G B, H, C, V]: A_ak V
        solve = core.t
        if not fused:
            reads, written = chunk_matmul(solve, reads), chunk_matmul(solve, written)
            solve = None
        writes_b = core.y_end[..., :size, :]  # [G B, H, C, K]: B . e^{g_C - g}
        x_k = chunk_matmul(core.y_end[..., size:, :].mT, v)  # [G B, H, K, V]: (K . e^{g_C - g})^T V
        self.step = (core.e_last, solve, reads, written, writes_b, x_k)

    def outputs(self, s, u):
        """O = (Q . e^g) S_0 + A_qb U + A_qk V [G B, H, C, V] from the entering states s and the
        reads u [G B, H, C, V]."""
        size, scores = self.size, self.core.scores
        q_start = self.core.x_start[..., size:, :]
        o = chunk_matmul(q_start, s) + chunk_matmul(scores[..., size:, :size], u)
        return o + chunk_matmul(scores[..., size:, size:], self.v)

    def pull(self, do):
        """The outputs' cotangent on the entering state: (Q . e^g)^T dO + A~^T T^T A_qb^T dO.
        Keeps T^T A_qb^T dO, the reads' cotangent from the outputs, for pullback."""
        size, core = self.size, self.core
        self.du = chunk_matmul(core.t.mT, chunk_matmul(core.scores[..., size:, :size].mT, do))
        x_start = core.x_start  # [G B, H, 2C, K]
        return chunk_matmul(x_start[..., size:, :].mT, do) + chunk_matmul(
            x_start[..., :size, :].mT, self.du
        )

    def pullback(self, s, ds, do):
        """[dq, dk, dv, dlog_w, da, db] [G B, H, C, ...] from the entering states s, the leaving
        states' cotangents ds and the outputs' do."""
        q, k, v, log_w, a, b = self.inputs
        if self.factored:
            # the reads' cotangent: pull's from dO, and the leaving state's, T^T (B . e^{g_C -
            # g}) dS, as _retreat computes it on one chunk per block (the same products when
            # nothing is rounded)
            writes_b = self.core.y_end[..., : self.size, :]  # [G B, H, C, K]
            du = chunk_matmul(self.core.t.mT, chunk_matmul(writes_b, ds))
            return self.core.pullback(s, v, log_w, ds, do, self.du + du)

        def run(*inputs):
            chunks = _Chunks(inputs, self.reset, False, self.fused)
            leaving, u = _advance(chunks.step, s)
            return leaving, chunks.outputs(s, u)

        _, vjp = jax.vjp(run, *self.inputs)
        return list(vjp((ds, do)))


def _advance(step, s):
    """(S_C, U [B, H, C, V]) from the entering state s [B, H, K, V]."""
    e_last, solve, reads, written, writes_b, x_k = step
    u = state_matmul(reads, s) + written  # [B, H, C, V]
    u = u if solve is None else state_matmul(solve, u)
    return e_last[..., None] * s + state_matmul(writes_b.mT, u) + x_k, u


def _retreat(step, ds, pulled):
    """dS_0 = e^{g_C} dS_C + A~^T T^T (B . e^{g_C - g}) dS_C + R."""
    e_last, solve, reads, _, writes_b, _ = step
    du = state_matmul(writes_b, ds)  # [B, H, C, V]
    du = du if solve is None else state_matmul(solve.mT, du)
    return e_last[..., None] * ds + state_matmul(reads.mT, du) + pulled


RULE = engine.Rule(
    prepare=_Chunks,
    advance=_advance,
    retreat=_retreat,
    flags=lambda inputs, size: factored_chunks(inputs[3], size),
)


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_w, a, b):
    """Chunks of C tokens on the chunk engine: the low-rank reads by a unit-triangular inverse
    prepared beside each chunk, the state scanned, the rest as per-key gated linear attention
    from each chunk's entering state. Padded tokens are identities (no decay, no write,
    a = b = 0)."""
    state = initial_state(state, q, v)
    o, state = autodiff.run(RULE, (q, k, v, log_w, a, b), reset, state, chunk_size)
    return o.astype(v.dtype), state


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
