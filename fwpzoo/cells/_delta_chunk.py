"""Chunkwise parallel form of the gated delta rule, shared by the three delta-rule families.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

Inside a chunk the writes are rewritten as S_t = e^{g_t} S_0 + sum_{i<=t} e^{g_t - g_i} k_i u_i^T
with pseudo-values U = T diag(beta) (V - diag(e^g) K S_0), T = (I + A)^{-1} the UT transform of
A = strictly-lower(diag(beta) (K K^T . Gamma)); then O = diag(e^g) Q S_0 + (Q K^T . Gamma) U and
S_C = e^{g_C} S_0 + (diag(e^{g_C - g}) K)^T U. A jax.custom_vjp supplies the hand-derived
backward, which keeps only the chunk-boundary states and recomputes each chunk's products.
Derivations: delta_rules.md.

A lax.scan walks the chunks in order, reading each one straight out of the [B, T, H, ...] inputs
and writing its outputs in place, so every intermediate is a few [B, H, C, C] or [B, H, C, K]
blocks that stay in cache; nothing sequence-sized is materialised besides the outputs and the
boundary states. (Computing every chunk's products at once as [N, B*H, C, ...] batched matmuls,
with only the state passing sequential, measured 1.6x slower forward + backward on CPU: those
intermediates go through main memory.)

Dimension letters: B batch, T time, H heads, K key dim, V value dim, C chunk, N chunks.
"""

import functools

import jax
import jax.numpy as jnp

from fwpzoo.cells._chunking import chunk_of, pad_time, put_chunk

# Diagonal blocks up to this size are inverted by forward substitution; larger ones by doubling.
# 8 measured fastest on CPU for chunk 64 (fewer sequential rows than 16, fewer merges than 4).
LEAF_SIZE = 8


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _lower_mask(size, *, strict):
    return jnp.tril(jnp.ones((size, size), bool), -1 if strict else 0)


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
    """From in-chunk cumulative log decays g [..., C]: Gamma [..., C, C] = e^{g_t - g_i} for
    i <= t (0 above), e^g (decay since the chunk start), e^{g_C - g} (decay to the chunk end) and
    e^{g_C} [...]. Only differences inside one chunk are exponentiated, so nothing overflows.
    g None (no decay) gives None for all four: every factor is 1 and is skipped."""
    if g is None:
        return None, None, None, None
    causal = _lower_mask(g.shape[-1], strict=False)
    gamma = jnp.exp(jnp.where(causal, g[..., :, None] - g[..., None, :], -jnp.inf))
    return gamma, jnp.exp(g), jnp.exp(g[..., -1:] - g), jnp.exp(g[..., -1])


def _masked(x, gamma, mask):
    """x [..., C, C] inside the mask, times Gamma when there is a decay; 0 outside."""
    return jnp.where(mask, x if gamma is None else x * gamma, 0.0)


def _rows(scale, x):
    """diag(scale) x for scale [..., C]; None means no scaling."""
    return x if scale is None else scale[..., None] * x


def _scaled(scale, s):
    """scale [B, H] times the state s [B, H, K, V]; None means 1."""
    return s if scale is None else scale[..., None, None] * s


class _Chunk:
    """One chunk's inputs [B, H, C, ...] in float32 and everything computed from them alone:
    P = Q K^T . Gamma, K K^T . Gamma below the diagonal, T = (I + A)^{-1} and the decays."""

    def __init__(self, inputs, n, size):
        q, k, v, beta, log_alpha = (chunk_of(x, n, size, jnp.float32) for x in inputs)
        g = None if log_alpha is None else jnp.cumsum(log_alpha, axis=-1)  # [B, H, C]
        self.q, self.k, self.v, self.beta = q, k, v, beta
        self.gamma, self.e, self.to_end, self.e_last = _decays(g)
        self.causal = _lower_mask(size, strict=False)
        self.strict = _lower_mask(size, strict=True)
        self.p = _masked(q @ _mT(k), self.gamma, self.causal)  # [B, H, C, C]
        self.kkg = _masked(k @ _mT(k), self.gamma, self.strict)  # [B, H, C, C]
        self.tri = unit_lower_inverse(beta[..., None] * self.kkg)  # [B, H, C, C]
        self.k_end = _rows(self.to_end, k)  # [B, H, C, K]: diag(e^{g_C - g}) K

    def pseudo_values(self, s):
        """U = T diag(beta) (V - diag(e^g) K S_0) [B, H, C, V] for the entering state s."""
        return self.tri @ (self.beta[..., None] * (self.v - _rows(self.e, self.k @ s)))

    def leaving_state(self, s, u):
        """S_C = e^{g_C} S_0 + K_end^T U [B, H, K, V]."""
        return _mT(self.k_end) @ u + _scaled(self.e_last, s)


def _forward(inputs, state, size):
    """inputs (q, k, v, beta, log_alpha or None) [B, T, H, ...], T a multiple of size; state
    [B, H, K, V] float32. Returns o [B, T, H, V] in v's dtype, the final state and the state
    entering every chunk [N, B, H, K, V]."""
    q, _, v, _, _ = inputs
    o = jnp.zeros(q.shape[:3] + v.shape[3:], v.dtype)

    def chunk_step(carry, n):
        s, o = carry
        c = _Chunk(inputs, n, size)
        u = c.pseudo_values(s)  # [B, H, C, V]
        o = put_chunk(o, _rows(c.e, c.q) @ s + c.p @ u, n)
        return (c.leaving_state(s, u), o), s

    (final, o), entering = jax.lax.scan(chunk_step, (state, o), jnp.arange(q.shape[1] // size))
    return o, final, entering


def _backward(size, res, cotangents):
    inputs, entering = res
    do_all, d_final = cotangents
    q, k, v, beta, log_alpha = inputs

    def chunk_step(carry, xs):
        ds, grads = carry  # ds: cotangent of the state leaving chunk n
        n, s = xs  # s: the state entering chunk n
        c = _Chunk(inputs, n, size)
        do = chunk_of(do_all, n, size, jnp.float32)  # [B, H, C, V]
        u = c.pseudo_values(s)
        du = _mT(c.p) @ do + c.k_end @ ds  # (7): dO's path through P U, and ds's through S_C
        dvb = _mT(c.tri) @ du  # cotangent of diag(beta) V, T^T dU
        qe = _rows(c.e, c.q)
        ds_prev = _mT(qe) @ do - _mT(_rows(c.beta, _rows(c.e, c.k))) @ dvb + _scaled(c.e_last, ds)
        do_u = do @ _mT(u)  # [B, H, C, C]
        dqk = _masked(do_u, c.gamma, c.causal)
        dqe = do @ _mT(s)  # [B, H, C, K]
        dk_end = u @ _mT(ds)  # [B, H, C, K]
        # The cotangent of diag(beta e^g) K is T^T dW with dW = -dU S_0^T, that is -dV_b S_0^T,
        # and d(I + A)^{-1} = -T^T dT T^T regroups to -dV_b U^T (delta_rules.md, (8)).
        minus_dkb = dvb @ _mT(s)  # [B, H, C, K]
        da = -jnp.where(c.strict, dvb @ _mT(u), 0.0)  # [B, H, C, C]
        dkk = _masked(c.beta[..., None] * da, c.gamma, c.strict)
        dq = dqk @ c.k + _rows(c.e, dqe)
        dk = (
            _mT(dqk) @ c.q
            + (dkk + _mT(dkk)) @ c.k
            + _rows(c.to_end, dk_end)
            - _rows(c.beta, _rows(c.e, minus_dkb))
        )
        k_dkb = -jnp.sum(c.k * minus_dkb, axis=-1)  # [B, H, C]
        dbeta = jnp.sum(c.v * dvb, axis=-1) + _rows(c.e, k_dkb[..., None])[..., 0]
        dbeta = dbeta + jnp.sum(da * c.kkg, axis=-1)
        chunk_grads = [dq, dk, c.beta[..., None] * dvb, dbeta]
        if log_alpha is not None:
            # g enters through Gamma (z = dGamma . Gamma), e^g, e^{g_C - g} and e^{g_C}
            z = do_u * c.p + c.beta[..., None] * da * c.kkg  # [B, H, C, C]
            to_end_dk = c.to_end * jnp.sum(c.k * dk_end, axis=-1)  # [B, H, C]
            dg = (
                jnp.sum(z, axis=-1)
                - jnp.sum(z, axis=-2)
                + jnp.sum(qe * dqe, axis=-1)
                + c.beta * c.e * k_dkb
                - to_end_dk
            )
            d_last = jnp.sum(to_end_dk, axis=-1) + c.e_last * jnp.sum(s * ds, axis=(-2, -1))
            dg = dg.at[..., -1].add(d_last)
            # g is the in-chunk cumulative sum of log_alpha: its transpose is the reversed one
            chunk_grads.append(jax.lax.cumsum(dg, axis=dg.ndim - 1, reverse=True))
        grads = [put_chunk(g, x, n) for g, x in zip(grads, chunk_grads, strict=True)]
        return (ds_prev, grads), None

    n_chunks = q.shape[1] // size
    grads = [jnp.zeros(x.shape, x.dtype) for x in inputs if x is not None]
    xs = (jnp.arange(n_chunks), entering)
    (d_state, grads), _ = jax.lax.scan(chunk_step, (d_final, grads), xs, reverse=True)
    if log_alpha is None:
        grads.append(None)
    return (*grads, d_state)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def chunk_scan(q, k, v, beta, log_alpha, state, size):
    """o [B, T, H, V] and the final state [B, H, K, V] of the gated delta rule, T a multiple of
    size; log_alpha [B, T, H] or None for no decay."""
    o, final, _ = _forward((q, k, v, beta, log_alpha), state, size)
    return o, final


def _chunk_scan_fwd(q, k, v, beta, log_alpha, state, size):
    inputs = (q, k, v, beta, log_alpha)
    o, final, entering = _forward(inputs, state, size)
    return (o, final), (inputs, entering)


chunk_scan.defvjp(_chunk_scan_fwd, _backward)


def chunkwise(q, k, v, beta, log_alpha, state, chunk_size):
    """The gated delta rule in chunks; log_alpha None means no decay (the plain delta rule).

    q, k [B, T, H, K]; v [B, T, H, V]; beta, log_alpha [B, T, H]; state [B, H, K, V] or None.
    Returns (o [B, T, H, V] in v's dtype, state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    size = min(chunk_size, T)
    padded = -(-T // size) * size  # the padded steps are identities; their outputs are dropped
    q, k, v, beta, log_alpha = (pad_time(x, padded) for x in (q, k, v, beta, log_alpha))
    if state is None:
        state = jnp.zeros((B, H, K, V), jnp.float32)
    o, state = chunk_scan(q, k, v, beta, log_alpha, state.astype(jnp.float32), size)
    return o[:, :T], state
