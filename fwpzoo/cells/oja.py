"""Oja's subspace rule with decay: the key is the presynaptic, the value the postsynaptic activity.

    S'_t = alpha_t S_{t-1},   alpha_t = exp(log_alpha_t)
    S_t  = S'_t + beta_t (k_t - S'_t v_t) v_t^T
    o_t  = S_t^T q_t

It is one gradient step on the reconstruction loss 1/2 ||S v_t - k_t||^2 (Oja 1982, 1989): the
post-synaptic activity v_t is an input, not S^T k_t, so the step is exact gradient descent. Its
transpose R = S^T [V, K] follows the gated delta rule with keys v_t and values k_t, so the
associative form is the delta rule's scan with k and v exchanged, read as R_t q_t. The chunkwise
form solves one unit lower-triangular system per chunk for the residuals k_i - S'_i v_i
(learning_rules.md, section 2). Any beta_t |v_t|^2 in (0, 2) keeps the update a contraction.

q, k [B, T, H, K]; v [B, T, H, V]; beta, log_alpha [B, T, H] (log_alpha <= 0); state S
[B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._chunking import Segments, causal_decay, keep
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._remat_chunks import scan_chunks
from fwpzoo.cells._spec import (
    BETA,
    GRADIENT,
    LOG_DECAY,
    RIGHT,
    Gate,
    Objective,
    State,
    gate_names,
)
from fwpzoo.cells.chunked.triangular import unit_lower_inverse


def reconstruction_error(S, k, v):
    """1/2 ||S v - k||^2: the key (presynaptic) reconstructed from the value (postsynaptic)."""
    return 0.5 * jnp.sum(jnp.square(S @ v - k))


GATE_SPECS = (Gate("beta", range=BETA), Gate("log_alpha", range=LOG_DECAY))
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = alpha_t S_{t-1} + beta_t (k_t - alpha_t S_{t-1} v_t) v_t^T",
    loss="1/2 ||S v_t - k_t||^2",
    step=GRADIENT,
    loss_fn=reconstruction_error,
    lr="beta",
    decay="log_alpha",
    unit_values=True,
    state=State(transition=RIGHT),
    paper="Oja 1982; Oja 1989 (subspace rule)",
)


def step(state, q, k, v, *, reset=None, beta, log_alpha):
    """One token: q, k [B, H, K], v [B, H, V], beta, log_alpha [B, H]."""
    state = reset_state(state, reset)
    q, k, v, beta, log_alpha = upcast(q, k, v, beta, log_alpha)
    state = jnp.exp(log_alpha)[..., None, None] * state
    residual = k - jnp.einsum("bhkv,bhv->bhk", state, v)  # [B, H, K]
    state = state + (beta[..., None] * residual)[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, beta, log_alpha):
    gates = {"beta": beta, "log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def _chunk(s, q, k, v, beta, log_alpha, reset):
    """One chunk (learning_rules.md, section 2): q, k [B, H, C, K], v [B, H, C, V], beta,
    log_alpha [B, H, C], reset [B, 1, C] or None -> (leaving state, o [B, H, C, V])."""
    seg = None if reset is None else Segments(reset)
    same, first = (None, None) if seg is None else (seg.same, seg.first)
    g = jnp.cumsum(log_alpha, axis=-1)  # [B, H, C]
    gamma = keep(same, causal_decay(g), g.dtype)  # [B, H, C, C]
    e = keep(first, jnp.exp(g), g.dtype)  # [B, H, C]
    strict = jnp.tril(gamma * (v @ v.mT), -1)  # [B, H, C, C]
    # (I + diag(beta) strict) U = diag(beta) (K - diag(e) V S_0^T), u_i = beta_i (k_i - S'_i v_i)
    u = unit_lower_inverse(beta[..., None] * strict) @ (
        beta[..., None] * (k - e[..., None] * (v @ s.mT))
    )  # [B, H, C, K]
    o = e[..., None] * (q @ s) + (gamma * (q @ u.mT)) @ v  # [B, H, C, V]
    leaving = e[..., -1, None, None] * s + (gamma[..., -1, :, None] * u).mT @ v
    return leaving, o


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha):
    """Chunks of C tokens: one [C, C] unit lower-triangular solve each, the state carried."""
    state = initial_state(state, q, v)
    resets = None if reset is None else reset[:, :, None]  # [B, T, 1]: one row for all heads
    o, state = scan_chunks(_chunk, (q, k, v, beta, log_alpha, resets), state, chunk_size)
    return o.astype(v.dtype), state


def associative(q, k, v, *, state=None, reset=None, beta, log_alpha):
    """The delta rule's affine maps on R = S^T with k and v exchanged, R_t = M_t R_{t-1} + X_t,
    composed by associative scan and read o_t = R_t q_t; memory O(T V^2)."""
    S0 = initial_state(state, q, v)
    elems = _delta_assoc.decayed(_delta_assoc.elements(v, k, beta), log_alpha)
    m, x = _delta_assoc.prefix_maps(elems, reset)  # [B, T, H, V, V], [B, T, H, V, K]
    (q32,) = upcast(q)
    r0q = jnp.einsum("bhkv,bthk->bthv", S0, q32)  # [B, T, H, V]: R_0 q_t
    o = jnp.einsum("bthvw,bthw->bthv", m, r0q) + jnp.einsum("bthvk,bthk->bthv", x, q32)
    final = m[:, -1] @ S0.mT + x[:, -1]  # [B, H, V, K]: R_T
    return o.astype(v.dtype), final.mT
