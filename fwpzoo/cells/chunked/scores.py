"""Score matrices of a chunk: A_ts = sum_k q_tk k_sk e^{g_tk - g_sk} over the pairs s <= t (or
a mask), for no decay, a scalar decay (CausalScores: Q K^T times Gamma) or a per-key decay (by
factored rows, FactoredScores, or by the halving, PerKeyScores), each with its pullback
(dQ, dK) from dA; and the small helpers the chunk math shares (prefix_sum, scaled, summed_to).
Derivations: linear_attention.md, sections 2-4.

Dimension letters: B batch, H heads, C chunk, K key dim, V value dim, P blocks of a chunk.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells.chunked.chunking import keep, lower_mask
from fwpzoo.cells.chunked.precision import chunk_matmul

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
    with jax.named_scope("decay_cumsum"):  # named for profiles and the dtype test
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


class CausalScores:
    """A = Q K^T . Gamma, Gamma [B, H, C, C] zero above the diagonal (e^{g_t - g_s} for a scalar
    decay g, masked to segments where there are resets), or None: no decay and no resets, A is
    the lower triangle of Q K^T."""

    def __init__(self, q, k, gamma):
        self.gamma = gamma
        if gamma is None:
            self.a = jnp.where(lower_mask(q.shape[-2]), chunk_matmul(q, k.mT), 0.0)  # [B, H, C, C]
        else:
            self.a = chunk_matmul(q, k.mT) * gamma  # [B, H, C, C]
        self.q, self.k = q, k

    def pullback(self, da):
        """(dQ, dK) [B, H, C, K] from dA [B, H, C, C] (zero above the diagonal)."""
        dp = da if self.gamma is None else da * self.gamma
        return chunk_matmul(dp, self.k), chunk_matmul(dp.mT, self.q)


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
    log decay over the chunk at least -FACTORED_SPREAD, chunking.factored_chunks): with
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
        self.a = jnp.where(mask, chunk_matmul(self.q, self.k.mT), 0.0)  # [B, H, Cq, C]

    def pullback(self, da):
        """(dQ [B, H, Cq, K], dK [B, H, C, K]) from dA [B, H, Cq, C]."""
        da = jnp.where(self.mask, da, 0.0)
        dq, dk = chunk_matmul(da, self.k), chunk_matmul(da.mT, self.q)
        return dq * self.q_decay, dk * self.k_decay


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
    bottom = jnp.concatenate([chunk_matmul(q_far, k_far.mT), a22], axis=-1)
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
    dq = jnp.concatenate([dq1, dq2 + chunk_matmul(d21, k_far) * q_decay], axis=-2)
    dk = jnp.concatenate([dk1 + chunk_matmul(d21.mT, q_far) * k_decay, dk2], axis=-2)
    return dq[..., :size, :], dk[..., :size, :]
