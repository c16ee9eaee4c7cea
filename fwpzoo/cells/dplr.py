"""Diagonal-plus-low-rank transition: RWKV-7's generalised delta rule (Peng et al. 2025).

    S_t = (Diag(exp(log_w_t)) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t

RWKV-7 takes a = -kappa and b = kappa * (in-context learning rate), with kappa a normalised key:
the delta rule's I - beta k k^T, with a per-key decay in place of I. Here a and b are free.

q, k, a, b [B, T, H, K]; v [B, T, H, V]; log_w [B, T, H, K] (log per-key decay, <= 0); state S
[B, H, K, V] float32; o [B, T, H, V] in v's dtype. The chunkwise form (a UT transform of the
low-rank reads, with per-key decays; flash-linear-attention's chunked DPLR delta rule) and the
associative form are derived in dplr.md.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._chunking import Segments, keep
from fwpzoo.cells._delta_chunk import unit_lower_inverse
from fwpzoo.cells._linear_chunk import per_key_scores
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._remat_chunks import scan_chunks
from fwpzoo.cells._spec import AFFINE, LOG_DECAY, PER_TOKEN_KEY, REAL, Gate, Objective, gate_names

GATE_SPECS = (
    Gate("log_w", shape=PER_TOKEN_KEY, range=LOG_DECAY),
    Gate("a", shape=PER_TOKEN_KEY, range=REAL),
    Gate("b", shape=PER_TOKEN_KEY, range=REAL),
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


@jax.custom_vjp
def _inverse(a):
    """unit_lower_inverse(a) = (I + a)^{-1} whose backward is dA = -T^T dT T^T (strictly lower),
    instead of autodiff through the blocked doubling (1.4x faster chunk fwd+bwd at T = 2048)."""
    return unit_lower_inverse(a)


def _inverse_fwd(a):
    t = unit_lower_inverse(a)
    return t, t


def _inverse_bwd(t, dt):
    return (jnp.tril(-(t.mT @ dt @ t.mT), -1),)


_inverse.defvjp(_inverse_fwd, _inverse_bwd)


def _chunk(s, q, k, v, log_w, a, b, reset):
    """One chunk (dplr.md): the reads u_t = S_{t-1}^T a_t by a UT transform, then the outputs
    and the leaving state as gated linear attention over the writes b u^T + k v^T. q, k, a, b,
    log_w [B, H, C, K], v [B, H, C, V], reset [B, 1, C] or None."""
    g = jnp.cumsum(log_w, axis=-2)  # [B, H, C, K]: log decay from the chunk start, t included
    g_before = g - log_w  # [B, H, C, K]: ... up to t - 1, the decay the read at t sees
    # per-key decayed scores: reads against earlier writes (s < t), queries against s <= t
    two = lambda x, y: jnp.stack([x, y])  # noqa: E731  [2, B, H, C, K]: one batched call
    gg, bk = two(g, g), two(b, k)
    a_b, a_k = per_key_scores(two(a, a), bk, gg, two(g_before, g_before), strict=True)
    q_b, q_k = per_key_scores(two(q, q), bk, gg)  # [B, H, C, C] each
    e_before, e, to_end = jnp.exp(g_before), jnp.exp(g), jnp.exp(g[..., -1:, :] - g)
    e_last = jnp.exp(g[..., -1, :])  # [B, H, K]
    if reset is not None:  # no pair across a reset; the states only where they reach
        seg, dtype = Segments(reset), s.dtype
        a_b, a_k, q_b, q_k = (keep(seg.same, x, dtype) for x in (a_b, a_k, q_b, q_k))
        e_before, e = keep(seg.first, e_before, dtype), keep(seg.first, e, dtype)
        to_end, e_last = keep(seg.last, to_end, dtype), keep(seg.through, e_last, dtype)
    # U = (I - A_ab)^{-1} ((A . e^{g_before}) S_0 + A_ak V): row t is u_t
    u = _inverse(-a_b) @ ((a * e_before) @ s + a_k @ v)  # [B, H, C, V]
    o = (q * e) @ s + q_b @ u + q_k @ v  # [B, H, C, V]
    leaving = e_last[..., None] * s + (b * to_end).mT @ u + (k * to_end).mT @ v
    return leaving, o


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_w, a, b):
    """Per chunk of C tokens: the low-rank reads by a unit-triangular inverse, the rest as
    per-key gated linear attention; the state carried across chunks. Padded tokens are
    identities (no decay, no write, a = b = 0)."""
    resets = None if reset is None else reset[:, :, None]  # [B, T, 1]: one row for all heads
    inputs = (q, k, v, log_w, a, b, resets)
    return scan_chunks(_chunk, inputs, initial_state(state, q, v), chunk_size)


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
