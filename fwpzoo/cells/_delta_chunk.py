"""Chunkwise parallel form of the gated delta rule, shared by the three delta-rule families.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

Inside a chunk the writes are rewritten as S_t = e^{g_t} S_0 + sum_{i<=t} e^{g_t - g_i} k_i u_i^T
with pseudo-values U = T (diag(beta) V - diag(beta e^g) K S_0), T = (I + A)^{-1} the UT transform
of A = strictly-lower(diag(beta) (K K^T . Gamma)); across chunks a scan passes the state,
U_n = U~_n - W_n S_{n-1} and S_n = e^{g_C} S_{n-1} + K_end^T U_n. A jax.custom_vjp supplies the
hand-derived backward, which keeps a few per-chunk matrices and the chunk-boundary states instead
of everything autodiff would store. Derivations: delta_rules.md.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, C chunk, N chunks,
G = B * H folded heads. Inside, every tensor is chunk-major, [N, G, C, ...]: the intra-chunk
products are single batched matmuls over N * G and the scan over chunks slices the leading axis.
"""

import jax
import jax.numpy as jnp

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


def _forward(q, k, v, beta, g, state):
    """q, k [N, G, C, K]; v [N, G, C, V]; beta [N, G, C]; g [N, G, C] or None; state [G, K, V]."""
    causal = _lower_mask(q.shape[-2], strict=False)
    strict = _lower_mask(q.shape[-2], strict=True)
    gamma, e, to_end, e_last = _decays(g)
    p = _masked(q @ _mT(k), gamma, causal)  # [N, G, C, C]
    kk = k @ _mT(k)  # [N, G, C, C]; kept raw: its consumers fuse the mask and the decay
    tri = unit_lower_inverse(beta[..., None] * _masked(kk, gamma, strict))  # [N, G, C, C]
    u_tilde = tri @ (beta[..., None] * v)  # [N, G, C, V]
    w = tri @ _rows(beta, _rows(e, k))  # [N, G, C, K]
    k_end = _rows(to_end, k)  # [N, G, C, K]

    def chunk_step(s, chunk):  # (6): the state through one chunk; U = U~ - W S on the way
        u_tilde, w, k_end, e_last = chunk
        u = u_tilde - w @ s  # [G, C, V]
        s_next = _mT(k_end) @ u + (s if e_last is None else e_last[..., None, None] * s)
        return s_next, (s, u)

    final, (s_prev, u) = jax.lax.scan(chunk_step, state, (u_tilde, w, k_end, e_last))
    o = _rows(e, q) @ s_prev + p @ u  # [N, G, C, V]
    return o, final, (q, k, v, beta, g, p, kk, tri, w, u, s_prev)


def _backward(res, cotangents):
    q, k, v, beta, g, p, kk, tri, w, u, s_prev = res
    do, d_final = cotangents
    causal = _lower_mask(q.shape[-2], strict=False)
    strict = _lower_mask(q.shape[-2], strict=True)
    gamma, e, to_end, e_last = _decays(g)
    du_local = _mT(p) @ do  # [N, G, C, V]: dO's path through P U
    qe = _rows(e, q)
    k_end = _rows(to_end, k)

    def chunk_step(ds, chunk):  # (7): ds is the cotangent of the state leaving the chunk
        du_local, y, w, k_end, e_last = chunk
        du = du_local + k_end @ ds  # [G, C, V]
        ds_prev = y - _mT(w) @ du + (ds if e_last is None else e_last[..., None, None] * ds)
        return ds_prev, (ds, du)

    y = _mT(qe) @ do  # [N, G, K, V]
    chunks = (du_local, y, w, k_end, e_last)
    d_state, (ds_next, du) = jax.lax.scan(chunk_step, d_final, chunks, reverse=True)
    do_u = do @ _mT(u)  # [N, G, C, C]
    dqk = _masked(do_u, gamma, causal)
    dqe = do @ _mT(s_prev)  # [N, G, C, K]
    dk_end = u @ _mT(ds_next)  # [N, G, C, K]
    dvb = _mT(tri) @ du  # [N, G, C, V]: cotangent of diag(beta) V, T^T dU~ with dU~ = dU
    # The cotangent of diag(beta e^g) K is T^T dW with dW = -dU S_0^T, that is -dV_b S_0^T, and
    # d(I + A)^{-1} = -T^T dT T^T with dT = dU~ (diag(beta) V)^T + dW (diag(beta e^g) K)^T is
    # -(dV_b U~^T - dV_b S_0^T W^T) = -dV_b U^T, as U = U~ - W S_0 (delta_rules.md, (8)).
    minus_dkb = dvb @ _mT(s_prev)  # [N, G, C, K]
    da = -jnp.where(strict, dvb @ _mT(u), 0.0)  # [N, G, C, C]
    dkk = _masked(beta[..., None] * da, gamma, strict)  # [N, G, C, C]
    kkg = _masked(kk, gamma, strict)

    dq = dqk @ k + _rows(e, dqe)
    dk = (
        _mT(dqk) @ q
        + (dkk + _mT(dkk)) @ k
        + _rows(to_end, dk_end)
        - _rows(beta, _rows(e, minus_dkb))
    )
    dv = beta[..., None] * dvb
    k_dkb = -jnp.sum(k * minus_dkb, axis=-1)  # [N, G, C]
    dbeta = jnp.sum(v * dvb, axis=-1) + _rows(e, k_dkb[..., None])[..., 0]
    dbeta = dbeta + jnp.sum(da * kkg, axis=-1)
    if g is None:
        return dq, dk, dv, dbeta, None, d_state
    # g enters through Gamma (z = dGamma . Gamma), e^g, e^{g_C - g} and e^{g_C}
    z = do_u * p + beta[..., None] * da * kkg  # [N, G, C, C]
    to_end_dk = to_end * jnp.sum(k * dk_end, axis=-1)  # [N, G, C]
    dg = (
        jnp.sum(z, axis=-1)
        - jnp.sum(z, axis=-2)
        + jnp.sum(qe * dqe, axis=-1)
        + beta * e * k_dkb
        - to_end_dk
    )
    d_last = jnp.sum(to_end_dk, axis=-1) + e_last * jnp.sum(s_prev * ds_next, axis=(-2, -1))
    return dq, dk, dv, dbeta, dg.at[..., -1].add(d_last), d_state


@jax.custom_vjp
def chunk_scan(q, k, v, beta, g, state):
    """o [N, G, C, V] and the final state [G, K, V] of the gated delta rule over chunked inputs.

    g [N, G, C] is the in-chunk cumulative sum of log decays, or None for no decay.
    """
    o, final, _ = _forward(q, k, v, beta, g, state)
    return o, final


def _chunk_scan_fwd(q, k, v, beta, g, state):
    o, final, res = _forward(q, k, v, beta, g, state)
    return (o, final), res


chunk_scan.defvjp(_chunk_scan_fwd, _backward)


def _to_chunks(x, num_chunks, chunk):
    """[B, T, H, ...] -> [N, G, C, ...], zero-padding the tail; zero k and beta (and log_alpha)
    make the padded steps identity transitions, so the final state is the last real token's."""
    B, T, H = x.shape[:3]
    pad = [(0, 0), (0, num_chunks * chunk - T)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x.astype(jnp.float32), pad).reshape(B, num_chunks, chunk, H, *x.shape[3:])
    x = jnp.moveaxis(x, (1, 3), (0, 2))  # [N, B, H, C, ...]
    return x.reshape(num_chunks, B * H, chunk, *x.shape[4:])


def _from_chunks(x, B, T):
    """[N, G, C, V] -> [B, T, H, V], dropping the padded tail."""
    N, G, C, V = x.shape
    x = jnp.moveaxis(x.reshape(N, B, G // B, C, V), (0, 2), (1, 3))  # [B, N, C, H, V]
    return x.reshape(B, N * C, G // B, V)[:, :T]


def chunkwise(q, k, v, beta, log_alpha, state, chunk_size):
    """The gated delta rule in chunks; log_alpha None means no decay (the plain delta rule).

    q, k [B, T, H, K]; v [B, T, H, V]; beta, log_alpha [B, T, H]; state [B, H, K, V] or None.
    Returns (o [B, T, H, V] in v's dtype, state [B, H, K, V] float32).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    chunk = min(chunk_size, T)
    num_chunks = -(-T // chunk)
    o_dtype = v.dtype
    q, k, v, beta = (_to_chunks(x, num_chunks, chunk) for x in (q, k, v, beta))
    g = None
    if log_alpha is not None:
        g = jnp.cumsum(_to_chunks(log_alpha, num_chunks, chunk), axis=-1)  # [N, G, C]
    if state is None:
        state = jnp.zeros((B * H, K, V), jnp.float32)
    else:
        state = state.astype(jnp.float32).reshape(B * H, K, V)
    o, state = chunk_scan(q, k, v, beta, g, state)
    return _from_chunks(o, B, T).astype(o_dtype), state.reshape(B, H, K, V)
