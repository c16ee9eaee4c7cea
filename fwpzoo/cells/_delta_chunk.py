"""Chunkwise parallel form of the gated delta rule, shared by the three delta-rule families.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t

Inside a chunk the writes are rewritten as S_t = e^{g_t} S_0 + sum_{i<=t} e^{g_t - g_i} k_i u_i^T
with pseudo-values U = T (diag(beta) V - diag(beta e^g) K S_0), T = (I + A)^{-1} the UT transform
of A = strictly-lower(diag(beta) (K K^T . Gamma)); across chunks the state follows the linear
recurrence S_n = M_n S_{n-1} + X_n. A jax.custom_vjp supplies the hand-derived backward, which
keeps a few per-chunk matrices and the chunk-boundary states instead of everything autodiff would
store. Derivations: delta_rules.md.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, C chunk, N chunks,
G = B * H folded heads. Inside, every tensor is chunk-major, [N, G, C, ...]: the intra-chunk
products are single batched matmuls over N * G and the scan over chunks slices the leading axis.
"""

import jax
import jax.numpy as jnp

# Diagonal blocks up to this size are inverted by forward substitution; larger ones by doubling.
LEAF_SIZE = 16


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
        row = eye[t] - jnp.sum(a[..., t, :t, None] * inv[..., :t, :], axis=-2)  # [..., C]
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
    e^{g_C} [...]. Only differences inside one chunk are exponentiated, so nothing overflows."""
    causal = _lower_mask(g.shape[-1], strict=False)
    gamma = jnp.exp(jnp.where(causal, g[..., :, None] - g[..., None, :], -jnp.inf))
    return gamma, jnp.exp(g), jnp.exp(g[..., -1:] - g), jnp.exp(g[..., -1])


def _forward(q, k, v, beta, g, state):
    """q, k [N, G, C, K]; v [N, G, C, V]; beta, g [N, G, C]; state [G, K, V]."""
    V = v.shape[-1]
    strict = _lower_mask(q.shape[-2], strict=True)
    gamma, e, to_end, e_last = _decays(g)
    p = q @ _mT(k) * gamma  # [N, G, C, C], zero above the diagonal
    kkg = jnp.where(strict, k @ _mT(k) * gamma, 0.0)  # [N, G, C, C]
    tri = unit_lower_inverse(beta[..., None] * kkg)  # [N, G, C, C]
    # one product for both right-hand sides: [U~, W] = T [diag(beta) V, diag(beta e^g) K]
    rhs = beta[..., None] * jnp.concatenate([v, e[..., None] * k], axis=-1)  # [N, G, C, V + K]
    uw = tri @ rhs  # [N, G, C, V + K]
    u_tilde, w = uw[..., :V], uw[..., V:]
    x_m = _mT(to_end[..., None] * k) @ uw  # [N, G, K, V + K]
    eye = jnp.eye(k.shape[-1], dtype=k.dtype)
    m = e_last[..., None, None] * eye - x_m[..., V:]  # [N, G, K, K]

    def chunk_step(s, mx):
        return mx[0] @ s + mx[1], s

    final, s_prev = jax.lax.scan(chunk_step, state, (m, x_m[..., :V]))  # s_prev [N, G, K, V]
    u = u_tilde - w @ s_prev  # [N, G, C, V]
    o = (e[..., None] * q) @ s_prev + p @ u  # [N, G, C, V]
    return o, final, (q, k, v, beta, g, p, kkg, tri, uw, u, s_prev, m)


def _backward(res, cotangents):
    q, k, v, beta, g, p, kkg, tri, uw, u, s_prev, m = res
    do, d_final = cotangents
    V = v.shape[-1]
    strict = _lower_mask(q.shape[-2], strict=True)
    gamma, e, to_end, e_last = _decays(g)
    w = uw[..., V:]
    du_local = _mT(p) @ do  # [N, G, C, V]: dO's path through P U
    qe = e[..., None] * q
    y = _mT(qe) @ do - _mT(w) @ du_local  # [N, G, K, V]

    def chunk_step(ds, my):  # ds: gradient wrt the state leaving the chunk
        return _mT(my[0]) @ ds + my[1], ds

    d_state, ds_next = jax.lax.scan(chunk_step, d_final, (m, y), reverse=True)
    k_end = to_end[..., None] * k
    du = du_local + k_end @ ds_next  # [N, G, C, V]
    do_u = do @ _mT(u)  # [N, G, C, C]
    dqk = do_u * gamma
    dqe = do @ _mT(s_prev)  # [N, G, C, K]
    dk_end = u @ _mT(ds_next)  # [N, G, C, K]
    duw = jnp.concatenate([du, -(du @ _mT(s_prev))], axis=-1)  # [N, G, C, V + K]
    drhs = _mT(tri) @ duw  # [N, G, C, V + K]
    # d(I + A)^{-1} = -T^T dT T^T with dT = dUW RHS^T, and T RHS = UW
    da = -jnp.where(strict, drhs @ _mT(uw), 0.0)  # [N, G, C, C]
    dvb, dkbe = drhs[..., :V], drhs[..., V:]
    dkk = beta[..., None] * da * gamma  # [N, G, C, C]

    dq = dqk @ k + e[..., None] * dqe
    dk = (
        _mT(dqk) @ q
        + (dkk + _mT(dkk)) @ k
        + to_end[..., None] * dk_end
        + (beta * e)[..., None] * dkbe
    )
    dv = beta[..., None] * dvb
    k_dkbe = jnp.sum(k * dkbe, axis=-1)  # [N, G, C]
    dbeta = jnp.sum(v * dvb, axis=-1) + e * k_dkbe + jnp.sum(da * kkg, axis=-1)
    # g enters through Gamma (z = dGamma . Gamma), e^g, e^{g_C - g} and e^{g_C}
    z = do_u * p + beta[..., None] * da * kkg  # [N, G, C, C]
    to_end_dk = to_end * jnp.sum(k * dk_end, axis=-1)  # [N, G, C]
    dg = (
        jnp.sum(z, axis=-1)
        - jnp.sum(z, axis=-2)
        + jnp.sum(qe * dqe, axis=-1)
        + beta * e * k_dkbe
        - to_end_dk
    )
    d_last = jnp.sum(to_end_dk, axis=-1) + e_last * jnp.sum(s_prev * ds_next, axis=(-2, -1))
    dg = dg.at[..., -1].add(d_last)
    return dq, dk, dv, dbeta, dg, d_state


@jax.custom_vjp
def chunk_scan(q, k, v, beta, g, state):
    """o [N, G, C, V] and the final state [G, K, V] of the gated delta rule over chunked inputs.

    g [N, G, C] is the in-chunk cumulative sum of log decays (zeros for the plain delta rule).
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
    if log_alpha is None:
        g = jnp.zeros_like(beta)
    else:
        g = jnp.cumsum(_to_chunks(log_alpha, num_chunks, chunk), axis=-1)  # [N, G, C]
    if state is None:
        state = jnp.zeros((B * H, K, V), jnp.float32)
    else:
        state = state.astype(jnp.float32).reshape(B * H, K, V)
    o, state = chunk_scan(q, k, v, beta, g, state)
    return _from_chunks(o, B, T).astype(o_dtype), state.reshape(B, H, K, V)
