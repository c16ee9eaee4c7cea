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

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state
from fwpzoo.cells.chunked import engine
from fwpzoo.cells.chunked.chunking import (
    Segments,
    causal_decay,
    keep,
    lower_mask,
    pad_to_chunks,
    per_key_flags,
)
from fwpzoo.cells.chunked.precision import chunk_matmul
from fwpzoo.cells.chunked.scores import (
    CausalScores,
    FactoredScores,
    PerKeyScores,
    prefix_sum,
    scaled,
    summed_to,
)


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
            self.scores = CausalScores(q, k, gamma)
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
        # [G B, H(, K)] or None, [G B, H, K, V]
        self.step = (self.e_last, chunk_matmul(self.k_end.mT, v))

    def outputs(self, s, aux=None):
        """O = (Q . e^g) S_0 + A V [G B, H, C, V] for the entering states s [G B, H, K, V]."""
        return chunk_matmul(self.q_start, s) + chunk_matmul(self.scores.a, self.v)

    def pull(self, do):
        """The outputs' cotangent do [G B, H, C, V] pulled to the entering state: (Q . e^g)^T dO."""
        return chunk_matmul(self.q_start.mT, do)

    def pullback(self, s, ds, do):
        """[dq, dk, dv(, dlog_alpha)] [G B, H, C, ...] from the entering states s, the
        cotangents of the leaving states ds [G B, H, K, V] and of the outputs do."""
        size = self.q.shape[-2]
        da = jnp.where(lower_mask(size), chunk_matmul(do, self.v.mT), 0.0)  # [G B, H, C, C]
        dq, dk = self.scores.pullback(da)
        d_q_start = chunk_matmul(do, s.mT)  # [G B, H, C, K]
        d_k_end = chunk_matmul(self.v, ds.mT)  # [G B, H, C, K]
        dq = dq + scaled(self.e, d_q_start)
        dk = dk + scaled(self.to_end, d_k_end)
        dv = chunk_matmul(self.scores.a.mT, do) + chunk_matmul(self.k_end, ds)  # [G B, H, C, V]
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
