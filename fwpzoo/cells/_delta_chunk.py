"""Chunkwise parallel form of the gated delta rule, shared by the three delta-rule families.

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

Inside a chunk the writes are rewritten as S_t = e^{g_t} S_0 + sum_{i<=t} e^{g_t - g_i} k_i u_i^T
with pseudo-values U = T diag(beta) (V - diag(e^g) K S_0), T = (I + A)^{-1} the UT transform of
A = strictly-lower(diag(beta) (K K^T . Gamma)); then O = diag(e^g) Q S_0 + (Q K^T . Gamma) U and
S_C = e^{g_C} S_0 + (diag(e^{g_C - g}) K)^T U. A jax.custom_vjp supplies the hand-derived
backward, which keeps only the chunk-boundary states and recomputes each chunk's products.
Resets (reset [B, T], True where the state before a token is zeroed) mask Gamma to the chunk's
segments, e^g to the rows before its first reset and e^{g_C - g} to its last segment.
A per-key decay (alpha_t one factor per key row, Kimi Delta Attention) moves the decays inside
the key sums: K K^T . Gamma and Q K^T . Gamma become the per-key decayed scores of the
linear-attention chunk (its halving keeps every exponent <= 0), and e^g, e^{g_C - g} scale K and
Q elementwise. Derivations: delta_rules.md (sections 1, 2, 5 and 6).

A lax.scan walks the chunks in order, reading each one straight out of the [B, T, H, ...] inputs
and writing its outputs in place, so every intermediate is a few [B, H, C, C] or [B, H, C, K]
blocks that stay in cache; nothing sequence-sized is materialised besides the outputs and the
boundary states. (Computing every chunk's products at once as [chunks, B*H, C, ...] batched matmuls,
with only the state passing sequential, measured 1.6x slower forward + backward on CPU: those
intermediates go through main memory.)

DeltaProduct's N writes per token are the same recurrence over T * N sub-steps, read after each
token's last one: a chunk then holds whole tokens, its rows are the sub-steps of its slice of the
[B, T, H, N, ...] inputs, and queries meet only the rows they read (delta_rules.md, section 4).

Dimension letters: B batch, T time (tokens), H heads, K key dim, V value dim, N sub-steps per
token (1 for the delta rule), C = tokens * N rows of a chunk.
"""

import functools

import jax
import jax.numpy as jnp

from fwpzoo.cells._chunking import (
    Segments,
    by_flag,
    causal_decay,
    chunk_of,
    keep,
    lower_mask,
    pad_to_chunks,
    per_key_flags,
    put_chunk,
    reset_chunk,
)
from fwpzoo.cells._linear_chunk import FactoredScores, PerKeyScores, scaled, summed_to

# Diagonal blocks up to this size are inverted by forward substitution; larger ones by doubling.
# 8 measured fastest on CPU for chunk 64 (fewer sequential rows than 16, fewer merges than 4).
LEAF_SIZE = 8


def _forward_substitution(a):
    """(I + a)^{-1} for a strictly lower-triangular a [..., C, C], one row at a time."""
    size = a.shape[-1]
    eye = jnp.eye(size, dtype=a.dtype)
    inv = jnp.broadcast_to(eye, a.shape)
    for t in range(1, size):
        # row t of (I + a) inv = I:  inv_t = e_t - sum_{i<t} a_ti inv_i
        row = eye[t] - jnp.einsum("...i,...ij->...j", a[..., t, :t], inv[..., :t, :])  # [..., C]
        inv = inv.at[..., t, :].set(row)
    return inv


def unit_lower_inverse(a):
    """(I + a)^{-1} for a strictly lower-triangular a [..., C, C] by blocked doubling.

    [[L11, 0], [L21, L22]]^{-1} = [[T11, 0], [-T22 L21 T11, T22]]: only products of inverses of
    unit-triangular blocks, never a division or a power series, so it stays as well conditioned
    as the inverse itself. Leaf blocks use forward substitution; no batched triangular solve.
    """
    size = a.shape[-1]
    if size <= LEAF_SIZE:
        return _forward_substitution(a)
    h = size // 2
    a11, a21, a22 = a[..., :h, :h], a[..., h:, :h], a[..., h:, h:]
    if size % 2 == 0:  # both halves in one batched call
        t11, t22 = unit_lower_inverse(jnp.stack([a11, a22]))
    else:
        t11, t22 = unit_lower_inverse(a11), unit_lower_inverse(a22)
    t21 = -(t22 @ (a21 @ t11))
    top = jnp.concatenate([t11, jnp.zeros(t11.shape[:-1] + (size - h,), a.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([t21, t22], axis=-1)], axis=-2)


def _decays(g):
    """From in-chunk cumulative log decays g [B, H, C] (scalar) or [B, H, C, K] (per key): e^g
    (decay since the chunk start), e^{g_C - g} (decay to the chunk end) and e^{g_C} [B, H(, K)].
    Only differences inside one chunk are exponentiated, all <= 0, so nothing overflows. g None
    (no decay) gives None for all three: every factor is 1 and is skipped."""
    if g is None:
        return None, None, None
    g_last = g[:, :, -1]  # [B, H(, K)]
    return jnp.exp(g), jnp.exp(g_last[:, :, None] - g), jnp.exp(g_last)


def _masked(x, gamma, mask):
    """x [..., C, C] inside the mask, times Gamma when there is a decay; 0 outside."""
    return jnp.where(mask, x if gamma is None else x * gamma, 0.0)


class _ScalarProducts:
    """A = X Y^T . Gamma on a mask (0 outside): rows of X meet rows of Y decayed by a scalar
    Gamma_ti = e^{g_t - g_i} [B, H, Cx, C] (segment-masked where there are resets), or by
    nothing (gamma None)."""

    def __init__(self, x, y, gamma, mask):
        self.x, self.y, self.gamma, self.mask = x, y, gamma, mask
        self.a = _masked(x @ y.mT, gamma, mask)  # [B, H, Cx, C]

    def pullback(self, da):
        """(dX, dY) from dA: dX reads with X's decay factor, dY writes with Y's."""
        dp = _masked(da, self.gamma, self.mask)
        return dp @ self.y, dp.mT @ self.x


class _PerKeyProducts:
    """A_ti = sum_k x_tk y_ik e^{g_tk - g_ik} on a mask (0 outside) for a per-key decay
    g [B, H, C, K]: from factored rows where the chunk's decays allow (`factored`,
    _linear_chunk.FactoredScores), else by the halving of the linear-attention chunk (every
    exponent <= 0). X has a row for every one of Y's C rows; with `read`, only those rows of A
    are kept (DeltaProduct's queries: X is given on the read rows, which the factored product
    takes as they are and the halving places on zero rows)."""

    def __init__(self, x, y, g, mask, read=None, factored=False):
        self.read, self.mask, self.factored = read, mask, factored
        if factored:
            rows = mask if read is None else mask[..., read, :]
            g_x = None if read is None else g[:, :, read]
            self.scores = FactoredScores(x, y, g, rows, g_query=g_x)
            self.a = self.scores.a  # [B, H, Cx, C]
            return
        if read is not None:
            x = jnp.zeros(y.shape[:-1] + x.shape[-1:], x.dtype).at[:, :, read].set(x)
        self.scores = PerKeyScores(x, y, g)
        a = jnp.where(mask, self.scores.a, 0.0)  # [B, H, C, C]
        self.a = a if read is None else a[:, :, read]

    def pullback(self, da):
        """(dX, dY) from dA [B, H, Cx, C]: dX reads with X's decay factor, dY writes with Y's."""
        if self.factored:
            return self.scores.pullback(da)
        if self.read is not None:  # back to a row per row of Y, zero on the rows not read
            rows = jnp.zeros(da.shape[:-2] + (da.shape[-1],) * 2, da.dtype)  # [B, H, C, C]
            da = rows.at[:, :, self.read].set(da)
        dx, dy = self.scores.pullback(jnp.where(self.mask, da, 0.0))
        return (dx if self.read is None else dx[:, :, self.read]), dy


def _sub_steps(x, n, tokens, split):
    """Chunk n of x [B, T, H, N, ...] (split) or [B, T, H, ...] as float32 [B, H, C, ...],
    C = tokens * N sub-steps in the order of the recurrence (sub-step j of token t at t N + j)."""
    x = chunk_of(x, n, tokens, jnp.float32)  # [B, H, tokens, (N,) ...]
    return x.reshape(*x.shape[:2], -1, *x.shape[4:]) if split else x


def _on_first_sub_step(x, sub):
    """x [B, H, tokens, ...] per token as [B, H, C, ...] per sub-step: each token's value on its
    first sub-step, zero (False) on the others."""
    x = jnp.expand_dims(x, 3)  # [B, H, tokens, 1, ...]
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, sub - 1)] + [(0, 0)] * (x.ndim - 4))  # [.., tokens, N, ..]
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _put_sub_steps(buffer, x, n, split):
    """buffer [B, T, H, N, ...] (split) or [B, T, H, ...], chunk n replaced by x [B, H, C, ...]."""
    if split:
        x = x.reshape(*x.shape[:2], -1, *buffer.shape[3:])  # [B, H, tokens, N, ...]
    return put_chunk(buffer, x, n)


def _sub_step_layout(beta):
    """(split, N): whether k, v, beta carry a sub-step axis (beta [B, T, H, N]) and N, which is 1
    for one write per token (beta [B, T, H])."""
    return (True, beta.shape[3]) if beta.ndim == 4 else (False, 1)


class _Chunk:
    """One chunk's inputs in float32 and everything computed from them alone: the decayed
    products P (Q with K, causal, on the rows that are read) and K K^T (strictly below the
    diagonal), T = (I + A)^{-1} and the decay factors, masked to the chunk's segments where it
    has resets.

    A chunk is `tokens` tokens of N sub-steps each, C = tokens * N rows: k, v [B, H, C, ...],
    beta [B, H, C]; the decay (and a reset) rides on each token's first sub-step and the query
    reads after its last, so q [B, H, tokens, K] meets only the rows `read` (every N-th, from
    N - 1). The decay is scalar (g [B, H, C]) or per key (g [B, H, C, K]); a per-key decay's
    products come from factored rows when `factored` (the chunk's flag from factored_chunks)."""

    def __init__(self, inputs, reset, n, tokens, factored=False):
        q, k, v, beta, log_alpha = inputs
        split, sub = _sub_step_layout(beta)
        q = chunk_of(q, n, tokens, jnp.float32)  # [B, H, tokens, K]
        k, v, beta = (_sub_steps(x, n, tokens, split) for x in (k, v, beta))  # [B, H, C, ...]
        self.g = None
        if log_alpha is not None:
            la = chunk_of(log_alpha, n, tokens, jnp.float32)  # [B, H, tokens(, K)]
            self.g = jnp.cumsum(_on_first_sub_step(la, sub), axis=2)  # [B, H, C(, K)]
        per_key = self.g is not None and self.g.ndim == k.ndim
        self.q, self.k, self.v, self.beta = q, k, v, beta
        self.e, self.to_end, self.e_last = _decays(self.g)
        gamma = None if self.g is None or per_key else causal_decay(self.g)  # [B, H, C, C]
        size = k.shape[-2]
        self.sub = sub
        self.read = slice(sub - 1, None, sub)  # the rows queries read
        causal, self.strict = lower_mask(size), lower_mask(size, strict=True)
        if reset is not None:  # a token's reset zeroes the state before its first sub-step
            seg = Segments(_on_first_sub_step(reset_chunk(reset, n, tokens), sub))
            gamma = None if per_key else keep(seg.same, gamma, jnp.float32)
            self.e = keep(seg.first, self.e, jnp.float32)
            self.to_end = keep(seg.last, self.to_end, jnp.float32)
            self.e_last = keep(seg.through, self.e_last, jnp.float32)
            causal, self.strict = causal & seg.same, self.strict & seg.same  # [B, 1, C, C]
        self.e_read = None if self.e is None else self.e[:, :, self.read]
        if per_key:
            read = None if sub == 1 else self.read
            self.qk = _PerKeyProducts(q, k, self.g, causal, read, factored)
            self.kk = _PerKeyProducts(k, k, self.g, self.strict, factored=factored)
        else:
            gamma_read = None if gamma is None else gamma[:, :, self.read]
            self.qk = _ScalarProducts(q, k, gamma_read, causal[..., self.read, :])
            self.kk = _ScalarProducts(k, k, gamma, self.strict)
        self.p, self.kkg = self.qk.a, self.kk.a  # [B, H, tokens, C], [B, H, C, C]
        self.tri = unit_lower_inverse(beta[..., None] * self.kkg)  # [B, H, C, C]
        self.q_start = scaled(self.e_read, q)  # [B, H, tokens, K]: Q . e^g reads S_0
        self.k_start = scaled(self.e, k)  # [B, H, C, K]: K . e^g, the writes' reads of S_0
        self.k_end = scaled(self.to_end, k)  # [B, H, C, K]: K . e^{g_C - g}

    def pseudo_values(self, s):
        """U = T diag(beta) (V - (K . e^g) S_0) [B, H, C, V] for the entering state s."""
        return self.tri @ scaled(self.beta, self.v - self.k_start @ s)

    def outputs(self, s, u):
        """O = (Q . e^g) S_0 + P U [B, H, tokens, V]."""
        return self.q_start @ s + self.p @ u

    def leaving_state(self, s, u):
        """S_C = Diag(e^{g_C}) S_0 + K_end^T U [B, H, K, V]."""
        return self.k_end.mT @ u + scaled(self.e_last, s)


def _forward(inputs, reset, state, tokens):
    """inputs q [B, T, H, K], k [B, T, H, (N,) K], v [B, T, H, (N,) V], beta [B, T, H, (N)],
    log_alpha [B, T, H(, K)] or None, T a multiple of tokens; reset [B, T] or None; state
    [B, H, K, V] float32. Returns o [B, T, H, V] in v's dtype, the final state and the state
    entering every chunk [chunks, B, H, K, V]."""
    q, _, v, _, log_alpha = inputs
    o = jnp.zeros(q.shape[:3] + v.shape[-1:], v.dtype)
    flags = per_key_flags(q, log_alpha, tokens)

    def chunk_step(carry, n):
        s, o = carry

        def run(factored):
            c = _Chunk(inputs, reset, n, tokens, factored)
            u = c.pseudo_values(s)  # [B, H, C, V]
            return c.leaving_state(s, u), c.outputs(s, u)

        leaving, o_chunk = by_flag(flags, n, run)
        return (leaving, put_chunk(o, o_chunk, n)), s  # [B, H, tokens, V] written

    chunks = jnp.arange(q.shape[1] // tokens)
    (final, o), entering = jax.lax.scan(chunk_step, (state, o), chunks)
    return o, final, entering


def _pullback(inputs, reset, n, tokens, s, ds, do, factored):
    """(ds entering, [dq, dk, dv, dbeta(, dlog_alpha)]) of chunk n from its entering state s
    and the cotangents of its leaving state ds and of its outputs do [B, H, tokens, V]."""
    c = _Chunk(inputs, reset, n, tokens, factored)
    u = c.pseudo_values(s)
    du = c.p.mT @ do + c.k_end @ ds  # (7): dO's path through P U, and ds's through S_C
    dvb = c.tri.mT @ du  # cotangent of diag(beta) (V - (K . e^g) S_0), T^T dU
    ds_prev = c.q_start.mT @ do - scaled(c.beta, c.k_start).mT @ dvb + scaled(c.e_last, ds)
    dvb_s = dvb @ s.mT  # [B, H, C, K]
    # d(I + A)^{-1} = -T^T dT T^T regroups to -dV_b U^T (delta_rules.md, (8))
    da = -jnp.where(c.strict, dvb @ u.mT, 0.0)  # [B, H, C, C]
    # every product splits into a reading side (rows t, decayed by e^{g_t}) and a writing
    # side (rows i, by e^{-g_i}); d log_alpha needs the two apart (delta_rules.md, section 6)
    dq_p, dk_p = c.qk.pullback(do @ u.mT)
    dk_kk_read, dk_kk_write = c.kk.pullback(c.beta[..., None] * da)
    dq = dq_p + scaled(c.e_read, do @ s.mT)
    dk_end = u @ ds.mT  # [B, H, C, K]: cotangent of K_end
    dk_read = dk_kk_read - scaled(c.e, scaled(c.beta, dvb_s))
    dk_write = dk_p + dk_kk_write + scaled(c.to_end, dk_end)
    dbeta = jnp.sum(c.v * dvb, axis=-1) - jnp.sum(c.k_start * dvb_s, axis=-1)
    dbeta = dbeta + jnp.sum(da * c.kkg, axis=-1)
    chunk_grads = [dq, dk_read + dk_write, scaled(c.beta, dvb), dbeta]
    if c.g is not None:
        # g_t enters as e^{g_t} on a reading row and e^{-g_t} on a writing one, up to the
        # chunk end's e^{g_C} (segment masks are constant factors), so
        # dg = Q . dQ + K . (dK_read - dK_write) plus the chunk end's terms
        dg = summed_to(c.k * (dk_read - dk_write), c.g)  # [B, H, C(, K)]
        dg = dg.at[:, :, c.read].add(summed_to(c.q * dq, c.g))
        end = jnp.sum(c.k_end * dk_end, axis=2) + scaled(c.e_last, jnp.sum(s * ds, -1))
        dg = dg.at[:, :, -1].add(summed_to(end, c.e_last))
        # g is the in-chunk cumulative sum of the sub-steps' log decays, each token's on its
        # first sub-step: the transpose is the reversed cumulative sum, read there
        d_sub = jax.lax.cumsum(dg, axis=2, reverse=True)  # [B, H, C(, K)]
        chunk_grads.append(d_sub[:, :, :: c.sub])  # [B, H, tokens(, K)]
    return ds_prev, chunk_grads


def _backward(tokens, res, cotangents):
    inputs, reset, entering = res
    do_all, d_final = cotangents
    q, _, _, beta, log_alpha = inputs
    put_sub_steps = functools.partial(_put_sub_steps, split=_sub_step_layout(beta)[0])
    # dq [B, T, H, K] and d log_alpha [B, T, H(, K)] are per token; dk, dv, dbeta per sub-step
    puts = (put_chunk, put_sub_steps, put_sub_steps, put_sub_steps, put_chunk)
    flags = per_key_flags(q, log_alpha, tokens)

    def chunk_step(carry, xs):
        ds, grads = carry  # ds: cotangent of the state leaving chunk n
        n, s = xs  # s: the state entering chunk n
        do = chunk_of(do_all, n, tokens, jnp.float32)  # [B, H, tokens, V]

        def run(factored):
            return _pullback(inputs, reset, n, tokens, s, ds, do, factored)

        ds_prev, chunk_grads = by_flag(flags, n, run)
        puts_used = puts[: len(grads)]  # no d log_alpha without a decay
        grads = [put(g, x, n) for put, g, x in zip(puts_used, grads, chunk_grads, strict=True)]
        return (ds_prev, grads), None

    n_chunks = q.shape[1] // tokens
    grads = [jnp.zeros(x.shape, x.dtype) for x in inputs if x is not None]
    xs = (jnp.arange(n_chunks), entering)
    (d_state, grads), _ = jax.lax.scan(chunk_step, (d_final, grads), xs, reverse=True)
    if log_alpha is None:
        grads.append(None)
    return (*grads, None, d_state)  # reset: no cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def chunk_scan(q, k, v, beta, log_alpha, reset, state, tokens):
    """o [B, T, H, V] and the final state [B, H, K, V] of the gated delta rule with N sub-steps
    per token (shapes as in _forward), in chunks of `tokens` tokens; T a multiple of tokens."""
    o, final, _ = _forward((q, k, v, beta, log_alpha), reset, state, tokens)
    return o, final


def _chunk_scan_fwd(q, k, v, beta, log_alpha, reset, state, tokens):
    inputs = (q, k, v, beta, log_alpha)
    o, final, entering = _forward(inputs, reset, state, tokens)
    return (o, final), (inputs, reset, entering)


chunk_scan.defvjp(_chunk_scan_fwd, _backward)


def chunkwise(q, k, v, beta, log_alpha, state, chunk_size, reset=None):
    """The gated delta rule in chunks; log_alpha None means no decay (the plain delta rule).

    q [B, T, H, K]; log_alpha [B, T, H] (scalar) or [B, T, H, K] (per key); state [B, H, K, V]
    or None; reset [B, T] or None; k [B, T, H, K], v [B, T, H, V], beta [B, T, H] for one write
    per token, or k [B, T, H, N, K], v [B, T, H, N, V], beta [B, T, H, N] for N sub-steps per
    token (DeltaProduct), where chunk_size counts sub-steps and is rounded down to whole tokens.
    Returns (o [B, T, H, V] in v's dtype, state float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    sub = _sub_step_layout(beta)[1]
    tokens = max(1, min(chunk_size // sub, T))
    # the padded steps are identities; their outputs are dropped
    padded = (pad_to_chunks(x, tokens) for x in (q, k, v, beta, log_alpha, reset))
    if state is None:
        state = jnp.zeros((B, H, K, V), jnp.float32)
    o, state = chunk_scan(*padded, state.astype(jnp.float32), tokens)
    return o[:, :T], state
