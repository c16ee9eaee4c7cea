"""Associative-scan form of the delta-rule families (Blelloch 1990; derivation in delta_rules.md).

Every step is affine in the state, S_t = M_t S_{t-1} + X_t, and affine maps compose associatively:
applying (M1, X1) then (M2, X2) is (M2 M1, M2 X1 + X2). jax.lax.associative_scan turns the T
compositions into O(log T) parallel levels. M is K x K here, so each combine costs O(K^2 (K + V))
and the scan holds T of them: exact, but heavy in memory for large T * K^2.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N sub-steps.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, upcast


def elements(k, v, beta):
    """One delta write as an affine map: M = I - beta k k^T [..., K, K], X = beta k v^T [..., K, V].

    k [..., K], v [..., V], beta [...].
    """
    k, v, beta = upcast(k, v, beta)
    bk = beta[..., None] * k  # [..., K]
    m = jnp.eye(k.shape[-1], dtype=k.dtype) - bk[..., :, None] * k[..., None, :]
    return m, bk[..., :, None] * v[..., None, :]


def decayed(elems, log_alpha):
    """Precedes the map (M [..., K, K], X) by S <- Diag(alpha) S: (M Diag(alpha), X), for a
    scalar log_alpha [...] or a per-key one [..., K]; None means no decay."""
    m, x = elems
    if log_alpha is None:
        return m, x
    (alpha,) = upcast(jnp.exp(log_alpha))
    # a scalar scales all of M; a per-key decay scales its columns
    return m * (alpha[..., None, :] if alpha.ndim == m.ndim - 1 else alpha[..., None, None]), x


def combine(earlier, later):
    """The map `earlier` followed by `later`."""
    m1, x1 = earlier
    m2, x2 = later
    return m2 @ m1, m2 @ x1 + x2


def prefix_maps(elems, reset=None):
    """The prefix compositions (M_t', X_t') [B, T, H, ...] of elements [B, T, H, ...]: S_t =
    M_t' S_0 + X_t'. A reset [B, T] replaces M_t by 0 (S_t = X_t); a select, so no gradient
    reaches the state before it."""
    if reset is not None:
        m, x = elems
        elems = jnp.where(reset[:, :, None, None, None], 0.0, m), x
    return jax.lax.associative_scan(combine, elems, axis=1)


def scan(q, elems, state, v_dtype, reset=None):
    """Outputs and final state of S_t = M_t S_{t-1} + X_t for elements [B, T, H, K, K | V].

    o_t = S_t^T q_t = X_t'^T q_t + S_0^T (M_t'^T q_t) with the prefix maps (M_t', X_t'), so the T
    intermediate states are never formed. reset [B, T] or None, as in prefix_maps.
    """
    m, x = prefix_maps(elems, reset)  # [B, T, H, K, K], [B, T, H, K, V]
    state = initial_state(state, q, x[..., 0, :])
    q = q.astype(jnp.float32)
    mq = jnp.einsum("bthjk,bthj->bthk", m, q)  # [B, T, H, K]
    o = jnp.einsum("bthkv,bthk->bthv", x, q) + jnp.einsum("bhkv,bthk->bthv", state, mq)
    return o.astype(v_dtype), m[:, -1] @ state + x[:, -1]
