"""Chunkwise parallel form of gated linear attention, shared by linear_attn and gated_linear_attn.

    S_t = Diag(e^{log_alpha_t}) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t

Inside a chunk, with g the cumulative log decay from the chunk start and S_0 the entering state,
O = (Q . e^g) S_0 + A V with the decayed causal scores A_ts = sum_k q_tk k_sk e^{g_tk - g_sk}
(s <= t), and S_C = Diag(e^{g_C}) S_0 + (K . e^{g_C - g})^T V. A jax.custom_vjp supplies the
hand-derived backward, which keeps only the chunk-entering states and recomputes each chunk's
products. Resets (reset [B, T], True where the state before a token is zeroed) cut the chunk into
segments: the decay factors are masked so that no pair of tokens across a reset interacts, the
entering state reaches only the rows before the first reset and the leaving state is built from
the last segment alone. Derivations and measurements: linear_attention.md.

It runs on the chunk engine (chunked/engine.py): _Chunks is the prepare stage for a batch of
chunks, holding each chunk's summary (transition e^{g_C}, write (K . e^{g_C - g})^T V), its
outputs from the entering state and its pullback; the engine scans the states between them.
On a CPU the engine takes one chunk per block, read straight out of the [B, T, H, ...] inputs
and written back in place, so every intermediate is a few [B, H, C, C] or [B, H, C, K] blocks
that stay in cache. (Computing every chunk's products at once as [B, H, N, C, ...] batched
matmuls measured 1.5-5x slower on CPU at T = 2048: those intermediates go through main memory
and cost page faults on every call; linear_attention.md, section 7.)

log_alpha is [B, T, H] (scalar decay), [B, T, H, K] (per-key decay) or None (no decay: plain
linear attention, every decay factor skipped). A per-key decay's scores are one product of
factored rows in a chunk whose decays allow it (FactoredScores), the halving otherwise
(PerKeyScores); the choice is made per block of the engine. Dimension letters: B batch,
T time, H heads, K key dim, V value dim, C chunk, N chunks, P blocks of a chunk (per-key scores).
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._chunking import (
    Segments,
    causal_decay,
    keep,
    lower_mask,
    pad_to_chunks,
    per_key_flags,
)
from fwpzoo.cells._reference import initial_state
from fwpzoo.cells.chunked import engine

# Per-key decay: blocks of at most this many tokens take the pairwise (non-matmul) form.
LEAF_SIZE = 8


def prefix_sum(x, reverse=False):
    """Cumulative sum of x [B, H, C] or [B, H, C, K] over C (from the end if reverse).

    A matmul with a triangle of ones: XLA:CPU lowers jnp.cumsum to a windowed reduction, and the
    matmul made the per-key forward and forward + backward 8-9% faster at T = 2048 (a chain of
    adds was no faster). With a key axis the triangle is broadcast over B and H, so that x keeps
    its layout (a [C, C] operand without those axes made XLA:CPU transpose x around the product:
    per-key gated linear attention fwd+bwd 65 ms against 72 ms at T = 2048). Highest precision,
    so accelerators that round matmul inputs to fewer bits keep the log decays in full float32."""
    size = x.shape[2]
    ones = jnp.tri(size, dtype=x.dtype)
    if reverse:
        ones = ones.T
    if x.ndim == 3:  # scalar decays: one [C, C] x [C, B H] product
        return jnp.einsum("ts,bhs->bht", ones, x, precision=jax.lax.Precision.HIGHEST)
    ones = jnp.broadcast_to(ones, x.shape[:2] + (size, size))
    return jnp.matmul(ones, x, precision=jax.lax.Precision.HIGHEST)


def scaled(decay, x):
    """x times decay broadcast over x's trailing axes; None means 1.

    A scalar decay [B, H, C] scales the rows of q, k [B, H, C, K]; a per-key one [B, H, C, K]
    scales them elementwise; e^{g_C} [B, H] or [B, H, K] scales the state [B, H, K, V]."""
    if decay is None:
        return x
    return decay.reshape(decay.shape + (1,) * (x.ndim - decay.ndim)) * x


def summed_to(x, like):
    """x summed over its trailing axes down to like's rank (a scalar decay's gradient sums K)."""
    return jnp.sum(x, axis=tuple(range(like.ndim, x.ndim)))


class _Causal:
    """A = Q K^T . Gamma, Gamma [B, H, C, C] zero above the diagonal (e^{g_t - g_s} for a scalar
    decay g, masked to segments where there are resets), or None: no decay and no resets, A is
    the lower triangle of Q K^T."""

    def __init__(self, q, k, gamma):
        self.gamma = gamma
        if gamma is None:
            self.a = jnp.where(lower_mask(q.shape[-2]), q @ k.mT, 0.0)  # [B, H, C, C]
        else:
            self.a = (q @ k.mT) * gamma  # [B, H, C, C]
        self.q, self.k = q, k

    def pullback(self, da):
        """(dQ, dK) [B, H, C, K] from dA [B, H, C, C] (zero above the diagonal)."""
        dp = da if self.gamma is None else da * self.gamma
        return dp @ self.k, dp.mT @ self.q


class PerKeyScores:
    """A_ts = sum_k q_tk k_sk e^{g_tk - g_sk} for s <= t, for a per-key decay g [B, H, C, K].

    Halving: with m = g at the end of the first half, the pairs (t in the second half, s in the
    first) are one matmul of Q . e^{g - m} with K . e^{m - g}, both exponents <= 0; the two
    diagonal blocks recurse as one batched call. Blocks of at most LEAF_SIZE tokens take the
    pairwise [C, C, K] form. With resets, `same` [B, 1, C, C] masks the pairs across a reset out
    of A (after the scores: g itself is finite everywhere, so no exponent turns positive).
    """

    def __init__(self, q, k, g, same=None):
        self.q, self.k = q[None], k[None]  # [1, B, H, C, K]: one block
        a, self.factors = _per_key_scores(self.q, self.k, g[None])
        self.same = same
        self.a = keep(same, a[0], a.dtype)  # [B, H, C, C]

    def pullback(self, da):
        """(dQ, dK) [B, H, C, K] from dA [B, H, C, C] (zero above the diagonal)."""
        da = keep(self.same, da, da.dtype)
        dq, dk = _per_key_pullback(da[None], self.q, self.k, self.factors)
        return dq[0], dk[0]


class FactoredScores:
    """PerKeyScores' A, restricted to `mask`, for a chunk whose decays factor (every key's
    log decay over the chunk at least -FACTORED_SPREAD, _chunking.factored_chunks): with
    m = g_C / 2 per key, e^{g'_t - g_s} = e^{g'_t - m} e^{m - g_s} and both factors lie within
    e^{+-FACTORED_SPREAD / 2}, so A = mask . ((Q . e^{g' - m}) (K . e^{m - g})^T), one product.

    q [B, H, Cq, K] with its log decays g_query (g when None: a query per row of k; DeltaProduct
    reads every N-th row); k, g [B, H, C, K]; mask [(B, 1,) Cq, C] bool, the pairs kept. Each kept
    entry is the sum of the same terms as the halving's; the pairs outside the mask never pass
    its select, in either direction."""

    def __init__(self, q, k, g, mask, g_query=None):
        g_query = g if g_query is None else g_query
        m = jax.lax.stop_gradient(g[..., -1:, :] / 2)  # [B, H, 1, K]: A does not depend on m
        self.q_decay, self.k_decay = jnp.exp(g_query - m), jnp.exp(m - g)  # [B, H, C(q), K]
        self.q, self.k = q * self.q_decay, k * self.k_decay
        self.mask = mask
        self.a = jnp.where(mask, self.q @ self.k.mT, 0.0)  # [B, H, Cq, C]

    def pullback(self, da):
        """(dQ [B, H, Cq, K], dK [B, H, C, K]) from dA [B, H, Cq, C]."""
        da = jnp.where(self.mask, da, 0.0)
        return (da @ self.k) * self.q_decay, (da.mT @ self.q) * self.k_decay


def _pad_rows(x, rows, mode="constant"):
    """x [..., C, K] padded at the end of its C axis to `rows` rows."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, rows - x.shape[-2]), (0, 0)], mode=mode)


def _halves(x):
    """x [P, B, H, 2h, K] -> [2P, B, H, h, K]: every block's first half, then every block's
    second half. The blocks share one leading axis at every depth, so the rank stays fixed
    (XLA:CPU aborts on dots of rank 8, which a new axis per depth reaches at chunk 128)."""
    h = x.shape[-2] // 2
    return jnp.concatenate([x[..., :h, :], x[..., h:, :]], axis=0)


def _first_second(x):
    """x [2P, ...] -> its first P and its last P blocks."""
    return x[: x.shape[0] // 2], x[x.shape[0] // 2 :]


def _per_key_scores(q, k, g, g_query=None, strict=False):
    """(A [P, B, H, C, C], the decay factors its pullback reuses) for q, k, g [P, B, H, C, K].

    A_ts = sum_k q_tk k_sk e^{g'_tk - g_sk} for s <= t (s < t when strict), with the query side's
    log decays g' = g_query (g when None). g' may run one step behind g (dplr reads the state
    before a token's own decay), as long as g'_t <= g_s for every pair kept: no exponent is
    positive."""
    g_query = g if g_query is None else g_query
    size = q.shape[-2]
    if size <= LEAF_SIZE:
        gap = g_query[..., :, None, :] - g[..., None, :, :]  # [..., C, C, K]
        decay = jnp.exp(jnp.where(lower_mask(size, strict=strict)[:, :, None], gap, -jnp.inf))
        return jnp.sum(q[..., :, None, :] * k[..., None, :, :] * decay, axis=-1), decay
    # An odd block gets one more row: q = k = 0 there adds nothing, and g repeats its last
    # value so that no exponent turns positive.
    h = -(-size // 2)
    q, k = _pad_rows(q, 2 * h), _pad_rows(k, 2 * h)
    g, g_query = _pad_rows(g, 2 * h, mode="edge"), _pad_rows(g_query, 2 * h, mode="edge")
    mid = g[..., h - 1 : h, :]  # [..., 1, K]: m, the log decay at the end of the first half
    q_decay = jnp.exp(g_query[..., h:, :] - mid)  # [..., h, K]
    k_decay = jnp.exp(mid - g[..., :h, :])  # [..., h, K]
    q_far, k_far = q[..., h:, :] * q_decay, k[..., :h, :] * k_decay
    diagonal, inner = _per_key_scores(
        _halves(q), _halves(k), _halves(g), _halves(g_query), strict
    )  # [2P, B, H, h, h]
    a11, a22 = _first_second(diagonal)
    top = jnp.concatenate([a11, jnp.zeros_like(a11)], axis=-1)
    bottom = jnp.concatenate([q_far @ k_far.mT, a22], axis=-1)
    a = jnp.concatenate([top, bottom], axis=-2)[..., :size, :size]
    return a, (q_far, k_far, q_decay, k_decay, inner)


def per_key_scores(q, k, g, g_query=None, strict=False):
    """A [P, B, H, C, C] of _per_key_scores alone, for chunk math that autodiff differentiates."""
    return _per_key_scores(q, k, g, g_query, strict)[0]


def _per_key_pullback(da, q, k, factors):
    """(dQ, dK) [P, B, H, C, K] of A = _per_key_scores(q, k, g) from dA [P, B, H, C, C]."""
    size = q.shape[-2]
    if size <= LEAF_SIZE:
        decay = factors  # [..., C, C, K]
        dq = jnp.sum(da[..., None] * k[..., None, :, :] * decay, axis=-2)
        dk = jnp.sum(da[..., None] * q[..., :, None, :] * decay, axis=-3)
        return dq, dk
    h = -(-size // 2)
    q, k = _pad_rows(q, 2 * h), _pad_rows(k, 2 * h)
    da = _pad_rows(_pad_rows(da.mT, 2 * h).mT, 2 * h)  # [..., 2h, 2h]
    q_far, k_far, q_decay, k_decay, inner = factors
    d21 = da[..., h:, :h]  # [..., h, h]
    diagonal = jnp.concatenate([da[..., :h, :h], da[..., h:, h:]], axis=0)  # [2P, B, H, h, h]
    dq_in, dk_in = _per_key_pullback(diagonal, _halves(q), _halves(k), inner)
    (dq1, dq2), (dk1, dk2) = _first_second(dq_in), _first_second(dk_in)
    dq = jnp.concatenate([dq1, dq2 + (d21 @ k_far) * q_decay], axis=-2)
    dk = jnp.concatenate([dk1 + (d21.mT @ q_far) * k_decay, dk2], axis=-2)
    return dq[..., :size, :], dk[..., :size, :]


class _Chunks:
    """A batch of chunks [G B, H, C, ...] (the engine's prepare stage) and everything computed
    from their inputs alone: the decays e^g, e^{g_C - g}, e^{g_C} (all exponents <= 0, None
    without decay), masked to each chunk's segments where it has resets, the scores A (a per-key
    decay's from factored rows when `factored`, by the halving otherwise), and the chunk's
    summary: its transition e^{g_C} (diagonal) and its write (K . e^{g_C - g})^T V."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, log_alpha = inputs
        size = q.shape[-2]
        dtype = q.dtype
        self.q, self.k, self.v = q, k, v
        self.g = None if log_alpha is None else prefix_sum(log_alpha)  # [G B, H, C(, K)]
        self.e = self.to_end = self.e_last = gamma = None
        if self.g is not None:
            g_last = self.g[:, :, -1]  # [G B, H(, K)]
            self.e = jnp.exp(self.g)
            self.to_end = jnp.exp(g_last[:, :, None] - self.g)
            self.e_last = jnp.exp(g_last)
        per_key = self.g is not None and self.g.ndim == q.ndim
        if self.g is not None and not per_key:
            gamma = causal_decay(self.g)  # [G B, H, C, C]
        same = None
        if reset is not None:
            seg = Segments(reset)
            self.e = keep(seg.first, self.e, dtype)
            self.to_end = keep(seg.last, self.to_end, dtype)
            self.e_last = keep(seg.through, self.e_last, dtype)
            same = seg.same if per_key else seg.same & lower_mask(size)
            gamma = None if per_key else keep(same, gamma, dtype)
        if not per_key:
            self.scores = _Causal(q, k, gamma)
        elif factored:  # the chunk's decays factor (FactoredScores): one product
            causal = lower_mask(size) if same is None else same & lower_mask(size)
            self.scores = FactoredScores(q, k, self.g, causal)
        else:
            self.scores = PerKeyScores(q, k, self.g, same)
        self.q_start = scaled(self.e, q)  # [G B, H, C, K]: Q . e^g reads the entering state
        self.k_end = scaled(
            self.to_end, k
        )  # [G B, H, C, K]: K . e^{g_C - g} writes the leaving one
        # the summary: S_C = Diag(e^{g_C}) S_0 + (K . e^{g_C - g})^T V
        self.step = (self.e_last, self.k_end.mT @ v)  # [G B, H(, K)] or None, [G B, H, K, V]

    def outputs(self, s, aux=None):
        """O = (Q . e^g) S_0 + A V [G B, H, C, V] for the entering states s [G B, H, K, V]."""
        return self.q_start @ s + self.scores.a @ self.v

    def pull(self, do):
        """The outputs' cotangent do [G B, H, C, V] pulled to the entering state: (Q . e^g)^T dO."""
        return self.q_start.mT @ do

    def pullback(self, s, ds, do):
        """[dq, dk, dv(, dlog_alpha)] [G B, H, C, ...] from the entering states s, the
        cotangents of the leaving states ds [G B, H, K, V] and of the outputs do."""
        size = self.q.shape[-2]
        da = jnp.where(lower_mask(size), do @ self.v.mT, 0.0)  # [G B, H, C, C]
        dq, dk = self.scores.pullback(da)
        d_q_start = do @ s.mT  # [G B, H, C, K]
        d_k_end = self.v @ ds.mT  # [G B, H, C, K]
        dq = dq + scaled(self.e, d_q_start)
        dk = dk + scaled(self.to_end, d_k_end)
        dv = self.scores.a.mT @ do + self.k_end @ ds  # [G B, H, C, V]
        grads = [dq, dk, dv]
        if self.g is not None:
            # A, Q . e^g and K . e^{g_C - g} depend on g only through q_t e^{g_t} and k_s e^{-g_s}
            # up to factors of the chunk end (segment masks are constant factors), so
            # dg = Q . dQ - K . dK plus the chunk end's terms (linear_attention.md, section 3)
            dg = summed_to(self.q * dq - self.k * dk, self.g)  # [G B, H, C(, K)]
            end = jnp.sum(self.k_end * d_k_end, axis=2)
            end = end + scaled(self.e_last, jnp.sum(s * ds, -1))
            dg = dg.at[:, :, -1].add(summed_to(end, self.e_last))
            # g is the in-chunk cumulative sum of log_alpha: its transpose is the reversed one
            grads.append(prefix_sum(dg, reverse=True))
        return grads


def _advance(step, s):
    e_last, write = step
    return scaled(e_last, s) + write, None


RULE = engine.Rule(
    prepare=_Chunks,
    advance=_advance,
    # a diagonal transition is its own transpose
    retreat=lambda step, ds, pulled: scaled(step[0], ds) + pulled,
    flags=lambda inputs, size: per_key_flags(inputs[0], inputs[3], size),
)


def chunkwise(q, k, v, log_alpha, state, chunk_size, reset=None, block=None):
    """Gated linear attention in chunks of chunk_size tokens; log_alpha None means no decay.

    q, k [B, T, H, K]; v [B, T, H, V]; log_alpha [B, T, H], [B, T, H, K] or None; state
    [B, H, K, V] or None (zeros); reset [B, T] bool or None; block: chunks per block of the
    engine (None: engine.default_block). Returns (o [B, T, H, V] in v's dtype, state [B, H, K, V]
    in float32, float64 for float64 inputs).
    """
    T = q.shape[1]
    size = min(chunk_size, T)
    block = block or engine.default_block(-(-T // size))
    state = initial_state(state, q, v)
    q, k, v, log_alpha, reset = (
        pad_to_chunks(x, size * block) for x in (q, k, v, log_alpha, reset)
    )
    o, state = engine.run_chunks(RULE, (q, k, v, log_alpha), reset, state, size, block)
    return o[:, :T], state
