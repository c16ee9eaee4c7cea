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
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
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
from fwpzoo.cells.chunked import autodiff
from fwpzoo.cells.chunked.chunking import Segments, causal_decay, keep
from fwpzoo.cells.chunked.precision import chunk_matmul, state_matmul
from fwpzoo.cells.chunked.triangular import inverse_with_pullback


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


class _Chunks:
    """A batch of chunks [G B, ...] prepared (learning_rules.md, section 2): the residuals
    u_i = beta_i (k_i - S'_i v_i) solve (I + diag(beta) (V V^T . Gamma)_strict) U =
    diag(beta) (K - diag(e^g) V S_0^T), so U = U' - W S_0^T with U' = T diag(beta) K and
    W = T diag(beta e^g) V, T the unit lower-triangular inverse. The step is the residuals from
    the entering state and S_C = e^{g_C} S_0 + U^T (gamma_C . V): products of [C, K] and
    [C, V] rows with the state; `fused` (one chunk per block, the step beside the chunk's
    [C, C] work) keeps T and the unsolved rows instead of forming U' and W.
    q, k [G B, H, C, K], v [G B, H, C, V], beta, log_alpha [G B, H, C], reset [G B, 1, C]."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, beta, log_alpha = inputs
        seg = None if reset is None else Segments(reset)
        same, first = (None, None) if seg is None else (seg.same, seg.first)
        g = jnp.cumsum(log_alpha, axis=-1)  # [G B, H, C]
        self.gamma = keep(same, causal_decay(g), g.dtype)  # [G B, H, C, C]
        self.e = keep(first, jnp.exp(g), g.dtype)  # [G B, H, C]
        self.q, self.v = q, v
        vv = chunk_matmul(v, v.mT)  # [G B, H, C, C]
        solve = inverse_with_pullback(beta[..., None] * jnp.tril(self.gamma * vv, -1))
        rows = beta[..., None] * k  # [G B, H, C, K]: diag(beta) K
        reads = (beta * self.e)[..., None] * v  # [G B, H, C, V]: diag(beta e^g) V
        if not fused:
            rows, reads = chunk_matmul(solve, rows), chunk_matmul(solve, reads)  # U', W
            solve = None
        # e^{g_C} (0 after a reset) and gamma_C . V, each write's weight in the leaving state
        self.step = (solve, rows, reads, self.e[..., -1], self.gamma[..., -1, :, None] * v)

    def outputs(self, s, u):
        """O = diag(e^g) Q S_0 + (Q U^T . Gamma) V [G B, H, C, V] from the entering states s
        [G B, H, K, V] and the residuals u [G B, H, C, K]."""
        scores = self.gamma * chunk_matmul(self.q, u.mT)  # [G B, H, C, C]
        return self.e[..., None] * chunk_matmul(self.q, s) + chunk_matmul(scores, self.v)


def _advance(step, s):
    """(S_C, U [B, H, C, K]) from the entering state s [B, H, K, V]."""
    solve, rows, reads, e_last, written = step
    u = rows - state_matmul(reads, s.mT)  # [B, H, C, K]
    u = u if solve is None else state_matmul(solve, u)
    return e_last[..., None, None] * s + state_matmul(u.mT, written), u


RULE = autodiff.rule(autodiff.Math(prepare=_Chunks, advance=_advance))


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha):
    """Chunks of C tokens on the chunk engine: one [C, C] unit lower-triangular inverse each,
    prepared beside the chunk, the state scanned, the outputs from each chunk's entering state."""
    state = initial_state(state, q, v)
    o, state = autodiff.run(RULE, (q, k, v, beta, log_alpha), reset, state, chunk_size)
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
