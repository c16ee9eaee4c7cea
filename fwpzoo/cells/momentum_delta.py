"""The momentum delta rule: gradient descent with momentum and weight decay on the delta rule's
objective 1/2 ||S^T k - v||^2 (the linear-memory core of Titans, Behrouz et al. 2024).

    M_t = mu_t M_{t-1} + eta_t k_t (S_{t-1}^T k_t - v_t)^T      mu_t = exp(log_mu_t)
    S_t = alpha_t S_{t-1} - beta_t M_t                           alpha_t = exp(log_alpha_t)
    o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; beta, eta, log_alpha, log_mu [B, T, H] (log decays <= 0);
state {"S": [B, H, K, V], "M": [B, H, K, V]} float32 (None: zeros); o [B, T, H, V] in v's dtype.
Every update is a rank-one write along k_t, so inside a chunk both S and M are the entering
states plus decayed sums of k_i d_i^T with d_i = eta_i (S_{i-1}^T k_i - v_i): one unit
lower-triangular solve per chunk gives every d_i (derivation: learning_rules.md, section 1).
"""

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_parts, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    BETA,
    LOG_DECAY,
    MOMENTUM,
    UNIT,
    Gate,
    Objective,
    State,
    gate_names,
    squared_error,
)
from fwpzoo.cells.chunked import autodiff
from fwpzoo.cells.chunked.chunking import Segments, causal_decay, keep
from fwpzoo.cells.chunked.precision import chunk_matmul, decay_matmul, state_matmul
from fwpzoo.cells.chunked.triangular import inverse_with_pullback

GATE_SPECS = (
    Gate("beta", range=BETA),
    Gate("eta", range=UNIT),
    Gate("log_alpha", range=LOG_DECAY),
    Gate("log_mu", range=LOG_DECAY),
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="M_t = mu_t M_{t-1} + eta_t k_t (S_{t-1}^T k_t - v_t)^T, "
    "S_t = alpha_t S_{t-1} - beta_t M_t",
    loss="1/2 ||S^T k_t - v_t||^2",
    step=MOMENTUM,
    loss_fn=squared_error,
    lr="beta",
    decay="log_alpha",
    momentum="log_mu",
    momentum_lr="eta",
    state=State((("S", "K V"), ("M", "K V")), is_dict=True),
    weights="S",
    paper="Behrouz et al. 2024 (Titans)",
)


def _by_head(x):
    """A per-head factor [B, H] as [B, H, 1, 1], to scale states [B, H, K, V]."""
    return x[..., None, None]


def step(state, q, k, v, *, reset=None, beta, eta, log_alpha, log_mu):
    """One token: q, k [B, H, K], v [B, H, V], gates [B, H]."""
    state = reset_state(state, reset)
    q, k, v, beta, eta, log_alpha, log_mu = upcast(q, k, v, beta, eta, log_alpha, log_mu)
    S, M = state["S"], state["M"]
    error = jnp.einsum("bhkv,bhk->bhv", S, k) - v  # [B, H, V]
    M = _by_head(jnp.exp(log_mu)) * M + (eta[..., None] * k)[..., :, None] * error[..., None, :]
    S = _by_head(jnp.exp(log_alpha)) * S - _by_head(beta) * M
    return {"S": S, "M": M}, jnp.einsum("bhkv,bhk->bhv", S, q)


def recurrent(q, k, v, *, state=None, reset=None, beta, eta, log_alpha, log_mu):
    gates = {"beta": beta, "eta": eta, "log_alpha": log_alpha, "log_mu": log_mu}
    state = initial_parts(OBJECTIVE.state, state, q, v)
    o, state = scan_steps(step, state, q, k, v, gates, reset)
    return o.astype(v.dtype), state


class _Chunks:
    """A batch of chunks [G B, ...] prepared (learning_rules.md, section 1): the decays, the
    weights of S_0, M_0 and every d_i in each S_t and M_t, and the UT transform of
    (I + diag(eta) (W_prev . K K^T)) D = diag(eta) (diag(ea_prev) K S_0 - diag(c_prev) K M_0 - V).
    The step solves for D from the entering states, D = A_S S_0 - A_M M_0 + D' (rows
    A_S = T diag(eta ea_prev) K, A_M = T diag(eta c_prev) K [C, K], D' = -T diag(eta) V),
    and writes S_C, M_C from it: products of [C, K] rows with the state; `fused` (one chunk per
    block) keeps T and the unsolved rows instead. q, k [G B, H, C, K], v [G B, H, C, V], gates
    [G B, H, C], reset [G B, 1, C]."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, beta, eta, log_alpha, log_mu = inputs
        seg = None if reset is None else Segments(reset)
        same, first = (None, None) if seg is None else (seg.same, seg.first)
        ga, gm = jnp.cumsum(log_alpha, axis=-1), jnp.cumsum(log_mu, axis=-1)  # [G B, H, C]
        gamma_a = keep(same, causal_decay(ga), ga.dtype)  # [G B, H, C, C]: prod of alpha (j, t]
        gamma_m = keep(same, causal_decay(gm), gm.dtype)  # [G B, H, C, C]: prod of mu (i, j]
        # the weights of S_0, M_0 and every d_i in S_t are sums of products of decays: float32
        # at HIGHEST, as the decays themselves (precision.py), not rounded as the chunk matmuls
        self.w = decay_matmul(gamma_a, beta[..., None] * gamma_m)  # [G B, H, C, C]: d_i into S_t
        self.ea = keep(first, jnp.exp(ga), ga.dtype)  # [G B, H, C]: S_0 into S_t
        em = keep(first, jnp.exp(gm), gm.dtype)  # [G B, H, C]: M_0 into M_t
        self.c = decay_matmul(gamma_a, (beta * em)[..., None])[..., 0]  # [G B, H, C]: M_0 into S_t
        # the state each token's gradient reads: S_{t-1} (after the reset at t, if any)
        seen = jnp.ones((), self.w.dtype) if reset is None else 1.0 - reset.astype(self.w.dtype)
        w_prev = jnp.pad(self.w[..., :-1, :], [(0, 0), (0, 0), (1, 0), (0, 0)]) * seen[..., None]
        c_prev = jnp.pad(self.c[..., :-1], [(0, 0), (0, 0), (1, 0)]) * seen
        ea_prev = keep(first, jnp.exp(ga - log_alpha), ga.dtype)
        kk = chunk_matmul(k, k.mT)  # [G B, H, C, C]
        solve = inverse_with_pullback(eta[..., None] * w_prev * kk)  # [G B, H, C, C]
        rows_s = (eta * ea_prev)[..., None] * k  # [G B, H, C, K]
        rows_m = (eta * c_prev)[..., None] * k
        rest = -eta[..., None] * v  # [G B, H, C, V]
        if not fused:
            rows_s, rows_m = chunk_matmul(solve, rows_s), chunk_matmul(solve, rows_m)
            solve, rest = None, chunk_matmul(solve, rest)
        self.q, self.qk = q, self.w * chunk_matmul(q, k.mT)  # [G B, H, C, C]
        end_s, end_m = self.w[..., -1, :, None] * k, gamma_m[..., -1, :, None] * k  # [G B, H, C, K]
        decays = (self.ea[..., -1], self.c[..., -1], em[..., -1])  # [G B, H] each
        self.step = (solve, rows_s, rows_m, rest, end_s, end_m, decays)

    def outputs(self, state, d):
        """O = diag(ea) Q S_0 - diag(c) Q M_0 - (W . Q K^T) D [G B, H, C, V] from the entering
        states and the chunk's D [G B, H, C, V]."""
        q = self.q
        o = self.ea[..., None] * chunk_matmul(q, state["S"])
        o = o - self.c[..., None] * chunk_matmul(q, state["M"])
        return o - chunk_matmul(self.qk, d)


def _advance(step, state):
    """(the leaving states, D [B, H, C, V]) from the entering ones."""
    solve, rows_s, rows_m, rest, end_s, end_m, (ea_last, c_last, em_last) = step
    S0, M0 = state["S"], state["M"]
    d = state_matmul(rows_s, S0) - state_matmul(rows_m, M0) + rest  # [B, H, C, V]
    d = d if solve is None else state_matmul(solve, d)
    S = _by_head(ea_last) * S0 - _by_head(c_last) * M0 - state_matmul(end_s.mT, d)
    M = _by_head(em_last) * M0 + state_matmul(end_m.mT, d)
    return {"S": S, "M": M}, d


RULE = autodiff.rule(autodiff.Math(prepare=_Chunks, advance=_advance))


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, eta, log_alpha, log_mu):
    """Chunks of C tokens on the chunk engine: one [C, C] unit lower-triangular inverse each,
    prepared beside the chunk, the states scanned, the outputs from each chunk's entering ones."""
    state = initial_parts(OBJECTIVE.state, state, q, v)
    inputs = (q, k, v, beta, eta, log_alpha, log_mu)
    o, state = autodiff.run(RULE, inputs, reset, state, chunk_size)
    return o.astype(v.dtype), state


def elements(k, v, beta, eta, log_alpha, log_mu):
    """One token as an affine map of the stacked state X = [S; M] [2K, V]:

    A = [[alpha I - beta eta k k^T, -beta mu I], [eta k k^T, mu I]]   [..., 2K, 2K]
    b = [beta eta k v^T; -eta k v^T]                                    [..., 2K, V]

    """
    k, v, beta, eta, alpha, mu = upcast(k, v, beta, eta, jnp.exp(log_alpha), jnp.exp(log_mu))
    eye = jnp.eye(k.shape[-1], dtype=k.dtype)
    kk = k[..., :, None] * k[..., None, :]  # [..., K, K]
    ek = _by_head(eta) * kk
    top = jnp.concatenate(
        [_by_head(alpha) * eye - _by_head(beta) * ek, _by_head(-beta * mu) * eye], -1
    )
    bottom = jnp.concatenate([ek, _by_head(mu) * eye], axis=-1)
    a = jnp.concatenate([top, bottom], axis=-2)  # [..., 2K, 2K]
    kv = (eta[..., None] * k)[..., :, None] * v[..., None, :]  # [..., K, V]
    return a, jnp.concatenate([_by_head(beta) * kv, -kv], axis=-2)


def associative(q, k, v, *, state=None, reset=None, beta, eta, log_alpha, log_mu):
    """The delta-rule associative scan (_delta_assoc) on the stacked state [S; M] [2K, V], read
    by [q; 0]; memory O(T K^2)."""
    state = initial_parts(OBJECTIVE.state, state, q, v)
    elems = elements(k, v, beta, eta, log_alpha, log_mu)
    read = jnp.concatenate([q, jnp.zeros_like(q)], axis=-1)  # [B, T, H, 2K]
    stacked = jnp.concatenate([state["S"], state["M"]], axis=-2)  # [B, H, 2K, V]
    o, stacked = _delta_assoc.scan(read, elems, stacked, v.dtype, reset)
    S, M = jnp.split(stacked, 2, axis=-2)
    return o, {"S": S, "M": M}
