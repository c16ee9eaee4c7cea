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
Q elementwise. Derivations: delta_rules.md (sections 1, 2, 5, 6 and 7).

It runs on the chunk engine (chunked/engine.py): _Chunks is the prepare stage for a batch of
chunks, holding each chunk's summary in factored form (the state step S_C = e^{g_C} S_0 +
K_end^T (U' - W S_0), delta_rules.md section 7), its outputs and its pullback. On a CPU the
engine takes one chunk per block, read straight out of the [B, T, H, ...] inputs and written back
in place, so every intermediate is a few [B, H, C, C] or [B, H, C, K] blocks that stay in cache.
(Computing every chunk's products at once as [chunks, B*H, C, ...] batched matmuls measured 1.6x
slower forward + backward on CPU: those intermediates go through main memory.)

DeltaProduct's N writes per token are the same recurrence over T * N sub-steps, read after each
token's last one: a chunk then holds whole tokens, its rows are the sub-steps of its slice of the
[B, T, H, N, ...] inputs, and queries meet only the rows they read (delta_rules.md, section 4).

Dimension letters: B batch, T time (tokens), H heads, K key dim, V value dim, N sub-steps per
token (1 for the delta rule), C = tokens * N rows of a chunk.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fwpzoo.cells.chunked import engine
from fwpzoo.cells.chunked.chunking import (
    Segments,
    causal_decay,
    keep,
    lower_mask,
    pad_to_chunks,
    per_key_flags,
)
from fwpzoo.cells.chunked.precision import chunk_matmul, state_matmul
from fwpzoo.cells.chunked.scores import FactoredScores, PerKeyScores, scaled, summed_to
from fwpzoo.cells.chunked.triangular import unit_lower_inverse


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
        self.a = _masked(chunk_matmul(x, y.mT), gamma, mask)  # [B, H, Cx, C]

    def pullback(self, da):
        """(dX, dY) from dA: dX reads with X's decay factor, dY writes with Y's."""
        dp = _masked(da, self.gamma, self.mask)
        return chunk_matmul(dp, self.y), chunk_matmul(dp.mT, self.x)


class _PerKeyProducts:
    """A_ti = sum_k x_tk y_ik e^{g_tk - g_ik} on a mask (0 outside) for a per-key decay
    g [B, H, C, K]: from factored rows where the chunk's decays allow (`factored`,
    chunked/scores.FactoredScores), else by the halving of the linear-attention chunk (every
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


def _on_first_sub_step(x, sub):
    """x [B, H, tokens, ...] per token as [B, H, C, ...] per sub-step: each token's value on its
    first sub-step, zero (False) on the others."""
    x = jnp.expand_dims(x, 3)  # [B, H, tokens, 1, ...]
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, sub - 1)] + [(0, 0)] * (x.ndim - 4))  # [.., tokens, N, ..]
    return x.reshape(*x.shape[:2], -1, *x.shape[4:])


def _merged(x, split):
    """x [B, H, tokens, N, ...] (split) as [B, H, C, ...], C = tokens * N sub-steps in the order
    of the recurrence (sub-step j of token t at t N + j); x as it is otherwise."""
    return x.reshape(*x.shape[:2], -1, *x.shape[4:]) if split else x


def _parted(x, sub, split):
    """The inverse of _merged: [B, H, C, ...] as [B, H, tokens, N, ...] when split."""
    return x.reshape(*x.shape[:2], -1, sub, *x.shape[3:]) if split else x


class _Chunks:
    """A batch of chunks (the engine's prepare stage) in float32 and everything computed from
    their inputs alone: the decayed products P (Q with K, causal, on the rows that are read) and
    K K^T (strictly below the diagonal), T = (I + A)^{-1}, the decay factors, masked to each
    chunk's segments where it has resets, and the chunk's summary in factored form: with
    W = T diag(beta) (K . e^g) and U' = T diag(beta) V the pseudo-values are U = U' - W S_0, so
    S_C = (Diag(e^{g_C}) - K_C^T W) S_0 + K_C^T U' (delta_rules.md, section 7).

    A chunk is `tokens` tokens of N sub-steps each, C = tokens * N rows: k, v [G B, H, tokens,
    (N,) ...], beta [G B, H, tokens(, N)] as the engine lays them out; the decay (and a reset)
    rides on each token's first sub-step and the query reads after its last, so q [G B, H,
    tokens, K] meets only the rows `read` (every N-th, from N - 1). The decay is scalar
    (g [G B, H, C]) or per key (g [G B, H, C, K]); a per-key decay's products come from factored
    rows when `factored` (the block's flag from factored_chunks). `fused` (one chunk per
    block): the step keeps T, diag(beta) and K . e^g instead of W and U', so that the state step
    computes U = T diag(beta) (V - (K . e^g) S_0) with no product for W at all."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, beta, log_alpha = inputs
        self.split = beta.ndim == 4
        sub = beta.shape[3] if self.split else 1
        k, v, beta = (_merged(x, self.split) for x in (k, v, beta))  # [G B, H, C, ...]
        self.g = None
        if log_alpha is not None:
            self.g = jnp.cumsum(_on_first_sub_step(log_alpha, sub), axis=2)  # [G B, H, C(, K)]
        per_key = self.g is not None and self.g.ndim == k.ndim
        self.q, self.k, self.v, self.beta = q, k, v, beta
        self.e, self.to_end, self.e_last = _decays(self.g)
        gamma = None if self.g is None or per_key else causal_decay(self.g)  # [G B, H, C, C]
        size = k.shape[-2]
        self.sub = sub
        self.read = slice(sub - 1, None, sub)  # the rows queries read
        causal, self.strict = lower_mask(size), lower_mask(size, strict=True)
        if reset is not None:  # a token's reset zeroes the state before its first sub-step
            seg = Segments(_on_first_sub_step(reset, sub))
            gamma = None if per_key else keep(seg.same, gamma, jnp.float32)
            self.e = keep(seg.first, self.e, jnp.float32)
            self.to_end = keep(seg.last, self.to_end, jnp.float32)
            self.e_last = keep(seg.through, self.e_last, jnp.float32)
            causal, self.strict = causal & seg.same, self.strict & seg.same  # [G B, 1, C, C]
        self.e_read = None if self.e is None else self.e[:, :, self.read]
        if per_key:
            read = None if sub == 1 else self.read
            self.qk = _PerKeyProducts(q, k, self.g, causal, read, factored)
            self.kk = _PerKeyProducts(k, k, self.g, self.strict, factored=factored)
        else:
            gamma_read = None if gamma is None else gamma[:, :, self.read]
            self.qk = _ScalarProducts(q, k, gamma_read, causal[..., self.read, :])
            self.kk = _ScalarProducts(k, k, gamma, self.strict)
        self.p, self.kkg = self.qk.a, self.kk.a  # [G B, H, tokens, C], [G B, H, C, C]
        self.tri = unit_lower_inverse(beta[..., None] * self.kkg)  # [G B, H, C, C]
        self.q_start = scaled(self.e_read, q)  # [G B, H, tokens, K]: Q . e^g reads S_0
        self.k_start = scaled(self.e, k)  # [G B, H, C, K]: K . e^g, the writes' reads of S_0
        self.k_end = scaled(self.to_end, k)  # [G B, H, C, K]: K . e^{g_C - g}
        self.beta_k_start = scaled(beta, self.k_start)  # [G B, H, C, K]
        if fused:
            self.step = _Fused(self.e_last, self.k_end, self.tri, self.beta_k_start, v, beta)
        else:
            w = chunk_matmul(self.tri, self.beta_k_start)  # [G B, H, C, K]: W
            u_free = chunk_matmul(self.tri, scaled(beta, v))  # [G B, H, C, V]: U'
            self.step = _Factored(self.e_last, self.k_end, w, u_free)

    def outputs(self, s, u):
        """O = (Q . e^g) S_0 + P U [G B, H, tokens, V] from the entering states s and the
        pseudo-values u the state scan made."""
        return chunk_matmul(self.q_start, s) + chunk_matmul(self.p, u)

    def pull(self, do):
        """((Q . e^g)^T dO, P^T dO): the outputs' pull on the entering state is
        (Q . e^g)^T dO - W^T P^T dO, and the second factor meets K_C dS in _retreat."""
        return chunk_matmul(self.q_start.mT, do), chunk_matmul(self.p.mT, do)

    def pullback(self, s, ds, do):
        """[dq, dk, dv, dbeta(, dlog_alpha)] laid out as the inputs, from the entering states s,
        the cotangents of the leaving states ds [G B, H, K, V] and of the outputs do."""
        written = self.beta[..., None] * self.v - chunk_matmul(self.beta_k_start, s)
        u = chunk_matmul(self.tri, written)  # [G B, H, C, V]
        # (7): dO's path through P U, and ds's through S_C
        du = chunk_matmul(self.p.mT, do) + chunk_matmul(self.k_end, ds)
        dvb = chunk_matmul(self.tri.mT, du)  # cotangent of diag(beta) (V - (K . e^g) S_0), T^T dU
        dvb_s = chunk_matmul(dvb, s.mT)  # [G B, H, C, K]
        # d(I + A)^{-1} = -T^T dT T^T regroups to -dV_b U^T (delta_rules.md, (8))
        da = -jnp.where(self.strict, chunk_matmul(dvb, u.mT), 0.0)  # [G B, H, C, C]
        # every product splits into a reading side (rows t, decayed by e^{g_t}) and a writing
        # side (rows i, by e^{-g_i}); d log_alpha needs the two apart (delta_rules.md, section 6)
        dq_p, dk_p = self.qk.pullback(chunk_matmul(do, u.mT))
        dk_kk_read, dk_kk_write = self.kk.pullback(self.beta[..., None] * da)
        dq = dq_p + scaled(self.e_read, chunk_matmul(do, s.mT))
        dk_end = chunk_matmul(u, ds.mT)  # [G B, H, C, K]: cotangent of K_end
        dk_read = dk_kk_read - scaled(self.e, scaled(self.beta, dvb_s))
        dk_write = dk_p + dk_kk_write + scaled(self.to_end, dk_end)
        dbeta = jnp.sum(self.v * dvb, axis=-1) - jnp.sum(self.k_start * dvb_s, axis=-1)
        dbeta = dbeta + jnp.sum(da * self.kkg, axis=-1)
        per_sub_step = [dk_read + dk_write, scaled(self.beta, dvb), dbeta]
        grads = [dq] + [_parted(x, self.sub, self.split) for x in per_sub_step]
        if self.g is not None:
            # g_t enters as e^{g_t} on a reading row and e^{-g_t} on a writing one, up to the
            # chunk end's e^{g_C} (segment masks are constant factors), so
            # dg = Q . dQ + K . (dK_read - dK_write) plus the chunk end's terms
            dg = summed_to(self.k * (dk_read - dk_write), self.g)  # [G B, H, C(, K)]
            dg = dg.at[:, :, self.read].add(summed_to(self.q * dq, self.g))
            end = jnp.sum(self.k_end * dk_end, axis=2)
            end = end + scaled(self.e_last, jnp.sum(s * ds, -1))
            dg = dg.at[:, :, -1].add(summed_to(end, self.e_last))
            # g is the in-chunk cumulative sum of the sub-steps' log decays, each token's on its
            # first sub-step: the transpose is the reversed cumulative sum, read there
            d_sub = jax.lax.cumsum(dg, axis=2, reverse=True)  # [G B, H, C(, K)]
            grads.append(d_sub[:, :, :: self.sub])  # [G B, H, tokens(, K)]
        return grads


class _Factored(NamedTuple):
    """A chunk's step as state-sized factors: S_C = Diag(e^{g_C}) S_0 + K_C^T (U' - W S_0)."""

    e_last: jax.Array | None  # [B, H(, K)]
    k_end: jax.Array  # [B, H, C, K]: K_C = K . e^{g_C - g}
    w: jax.Array  # [B, H, C, K]: W = T diag(beta) (K . e^g)
    u_free: jax.Array  # [B, H, C, V]: U' = T diag(beta) V

    def pseudo_values(self, s):
        return self.u_free - state_matmul(self.w, s)

    def through_writes(self, a):
        """W^T a for a [B, H, C, V]."""
        return state_matmul(self.w.mT, a)


class _Fused(NamedTuple):
    """A chunk's step with its matrices as they are (one chunk per block, no inner loop)."""

    e_last: jax.Array | None
    k_end: jax.Array
    tri: jax.Array  # [B, H, C, C]: T
    beta_k_start: jax.Array  # [B, H, C, K]: diag(beta) (K . e^g)
    v: jax.Array  # [B, H, C, V]
    beta: jax.Array  # [B, H, C]

    def pseudo_values(self, s):
        written = self.beta[..., None] * self.v - state_matmul(self.beta_k_start, s)
        return state_matmul(self.tri, written)

    def through_writes(self, a):
        return state_matmul(self.beta_k_start.mT, state_matmul(self.tri.mT, a))


def _advance(step, s):
    """S_C = Diag(e^{g_C}) S_0 + K_C^T U; the pseudo-values U are kept for the outputs."""
    u = step.pseudo_values(s)  # [B, H, C, V]
    return scaled(step.e_last, s) + state_matmul(step.k_end.mT, u), u


def _retreat(step, ds, pulled):
    """M^T dS + R = Diag(e^{g_C}) dS + (Q . e^g)^T dO - W^T (P^T dO + K_C dS), the sum in the
    order the pullback forms it (dU), so that one chunk per block computes it once."""
    q_do, p_do = pulled
    return scaled(step.e_last, ds) + q_do - step.through_writes(p_do + state_matmul(step.k_end, ds))


RULE = engine.Rule(
    prepare=_Chunks,
    advance=_advance,
    retreat=_retreat,
    flags=lambda inputs, size: per_key_flags(inputs[0], inputs[4], size),
)


def chunkwise(q, k, v, beta, log_alpha, state, chunk_size, reset=None, block=None):
    """The gated delta rule in chunks; log_alpha None means no decay (the plain delta rule).

    q [B, T, H, K]; log_alpha [B, T, H] (scalar) or [B, T, H, K] (per key); state [B, H, K, V]
    or None; reset [B, T] or None; k [B, T, H, K], v [B, T, H, V], beta [B, T, H] for one write
    per token, or k [B, T, H, N, K], v [B, T, H, N, V], beta [B, T, H, N] for N sub-steps per
    token (DeltaProduct), where chunk_size counts sub-steps and is rounded down to whole tokens;
    block: chunks per block of the engine (None: engine.default_block). Returns (o [B, T, H, V]
    in v's dtype, state float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    sub = beta.shape[3] if beta.ndim == 4 else 1
    tokens = max(1, min(chunk_size // sub, T))
    block = block or engine.default_block(-(-T // tokens))
    # the padded steps are identities; their outputs are dropped
    padded = tuple(pad_to_chunks(x, tokens * block) for x in (q, k, v, beta, log_alpha))
    reset = pad_to_chunks(reset, tokens * block)
    if state is None:
        state = jnp.zeros((B, H, K, V), jnp.float32)
    o, state = engine.run_chunks(RULE, padded, reset, state.astype(jnp.float32), tokens, block)
    return o[:, :T], state
