"""Mesa layer: the output is the exact minimiser of a regularised, discounted least-squares fit
of the values seen so far (von Oswald et al. 2023; MesaNet, von Oswald et al. 2025).

    H^kk_t = alpha_t H^kk_{t-1} + beta_t k_t k_t^T           alpha_t = exp(log_alpha_t)
    H^kv_t = alpha_t H^kv_{t-1} + beta_t k_t v_t^T
    o_t = (H^kv_t)^T (H^kk_t + Diag(lam))^{-1} q_t

o_t = W_t^T q_t with W_t = argmin_W sum_{i<=t} (prod_{i<j<=t} alpha_j) beta_i ||W^T k_i - v_i||^2
+ ||Diag(lam)^{1/2} W||^2: every token solves its K x K system exactly (a Cholesky
factorisation: H^kk_t + Diag(lam) is symmetric positive definite for beta >= 0, lam > 0), not a
fixed number of solver iterations.

q, k [B, T, H, K]; v [B, T, H, V]; beta, log_alpha [B, T, H] (beta >= 0, log_alpha <= 0); lam
[H, K] static per head (> 0); state {"kk": [B, H, K, K], "kv": [B, H, K, V]} float32; o
[B, T, H, V] in v's dtype. The chunkwise form is derived in mesa.md.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._cholesky import cholesky_and_inverse, inverse_solve, spd_solve
from fwpzoo.cells._reference import initial_parts, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    DECAY,
    LOG_DECAY,
    MINIMISER,
    POSITIVE,
    STATIC,
    UNIT,
    Gate,
    Objective,
    State,
    gate_names,
)
from fwpzoo.cells.chunked import autodiff
from fwpzoo.cells.chunked.chunking import Segments, causal_decay, keep
from fwpzoo.cells.chunked.precision import chunk_matmul

GATE_SPECS = (
    Gate("beta", range=UNIT),
    Gate("log_alpha", range=LOG_DECAY),
    Gate("lam", shape=STATIC, range=POSITIVE),
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update=(
        "H^kk_t = alpha_t H^kk_{t-1} + beta_t k_t k_t^T, H^kv_t likewise with k_t v_t^T; "
        "o_t = (H^kv_t)^T (H^kk_t + Diag(lam))^{-1} q_t"
    ),
    loss=(
        "sum_{i<=t} (prod_{i<j<=t} alpha_j) beta_i 1/2 ||W^T k_i - v_i||^2 "
        "+ 1/2 ||Diag(lam)^{1/2} W||^2, read as W^T q_t"
    ),
    step=MINIMISER,
    state=State(parts=(("kk", "K K"), ("kv", "K V")), is_dict=True, transition=DECAY),
    paper="von Oswald et al. 2023; MesaNet (von Oswald et al. 2025)",
)


def initial_state(state, q, v):
    """{"kk": [B, H, K, K], "kv": [B, H, K, V]}; None means zeros."""
    return initial_parts(OBJECTIVE.state, state, q, v)


def regularised(kk, lam):
    """H^kk + Diag(lam) for kk [..., K, K] and lam [H, K] (broadcast over the axes before H)."""
    return kk + lam[..., :, None] * jnp.eye(lam.shape[-1], dtype=lam.dtype)


def solve(a, q):
    """a^{-1} q for symmetric positive definite a [..., K, K] and q [..., K], by Cholesky
    (_cholesky.py: matmuls, not LAPACK, so it runs on any number of CPU devices).

    a is read as (a + a^T) / 2, so the gradient w.r.t. a is symmetric."""
    return spd_solve(a, q)


def step(state, q, k, v, *, reset=None, beta, log_alpha, lam):
    """One token: q, k [B, H, K], v [B, H, V], beta, log_alpha [B, H]; lam [H, K]."""
    state = reset_state(state, reset)
    q, k, v, beta, log_alpha, lam = upcast(q, k, v, beta, log_alpha, lam)
    alpha = jnp.exp(log_alpha)[..., None, None]  # [B, H, 1, 1]
    bk = beta[..., None] * k  # [B, H, K]
    kk = alpha * state["kk"] + bk[..., :, None] * k[..., None, :]
    kv = alpha * state["kv"] + bk[..., :, None] * v[..., None, :]
    x = solve(regularised(kk, lam), q)  # [B, H, K]
    return {"kk": kk, "kv": kv}, jnp.einsum("bhkv,bhk->bhv", kv, x)


def recurrent(q, k, v, *, state=None, reset=None, beta, log_alpha, lam):
    gates = {"beta": beta, "log_alpha": log_alpha}
    step_lam = lambda state, *xs, **gates: step(state, *xs, **gates, lam=lam)  # noqa: E731
    o, state = scan_steps(step_lam, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


@jax.custom_vjp
def _spd_solve(a, q):
    """solve(a, q) whose backward reuses the factor's inverse, dq = a^{-1} dx, instead of
    differentiating through it. da = -(dq x^T + x dq^T) / 2: the gradient among symmetric
    matrices, as `solve` has it."""
    return solve(a, q)


def _spd_solve_fwd(a, q):
    _, inverse = cholesky_and_inverse(a)
    x = inverse_solve(inverse, q)
    return x, (inverse, x)


def _spd_solve_bwd(res, dx):
    inverse, x = res
    dq = inverse_solve(inverse, dx)
    outer = dq[..., :, None] * x[..., None, :]  # [..., K, K]
    return -(outer + outer.mT) / 2, dq


_spd_solve.defvjp(_spd_solve_fwd, _spd_solve_bwd)


class _Chunks:
    """A batch of chunks [G B, ...] prepared (mesa.md): the decays and the decayed,
    beta-weighted writes, the chunk's own part of every H^kk_t (sum_{s<=t} w_ts k_s k_s^T,
    [G B, H, C, K, K]) and its summary, S_C = e^{g_C} S_0 + (w_C . K)^T [K, V] for both parts.
    The state step is that decay and add; every token's solve needs the entering H^kk_0, so it
    is in the outputs stage, batched over the block's chunks: o_t = (H^kv_t)^T x_t with
    x_t = (e_t H^kk_0 + H^kk_t,chunk + Diag(lam))^{-1} q_t. q, k [G B, H, C, K], v
    [G B, H, C, V], beta, log_alpha [G B, H, C], lam [G, H, C, K] (per token of one batch row,
    the same for every row: see chunkwise), reset [G B, 1, C]."""

    def __init__(self, inputs, reset, factored=False, fused=False):
        q, k, v, beta, log_alpha, lam = inputs
        lam = jnp.repeat(lam, q.shape[0] // lam.shape[0], axis=0)  # [G B, H, C, K], chunk-major
        g = jnp.cumsum(log_alpha, axis=-1)  # [G B, H, C]
        gamma = causal_decay(g)  # [G B, H, C, C]
        e, e_last = jnp.exp(g), jnp.exp(g[..., -1])  # [G B, H, C]: entering state's factor
        if reset is not None:  # no pair across a reset; the states only where they reach
            seg = Segments(reset)
            gamma = keep(seg.same, gamma, g.dtype)
            e, e_last = keep(seg.first, e, g.dtype), keep(seg.through, e_last, g.dtype)
        self.w = gamma * beta[..., None, :]  # [G B, H, C, C]: weight of write s in H_t
        self.q, self.k, self.v, self.e, self.lam = q, k, v, e, lam
        size, K = k.shape[-2:]
        outer = (k[..., :, None] * k[..., None, :]).reshape(*k.shape[:-2], size, K * K)
        self.kk = chunk_matmul(self.w, outer).reshape(*k.shape[:-1], K, K)  # [G B, H, C, K, K]
        last = self.w[..., -1, :, None] * k  # [G B, H, C, K]: each write in the leaving state
        # [G B, H], [.., K, K], [.., K, V]
        self.step = (e_last, chunk_matmul(last.mT, k), chunk_matmul(last.mT, v))

    def outputs(self, state, aux=None):
        """o [G B, H, C, V] from the entering states: one solve per token."""
        e = self.e[..., None]
        kk = e[..., None] * state["kk"][:, :, None] + self.kk  # [G B, H, C, K, K]
        # the solve is float32 whatever the inputs' dtype (_cholesky.py): the system's
        # rounding error would reach x amplified by its condition number
        x = _spd_solve(regularised(kk, self.lam), self.q)  # [G B, H, C, K]
        scores = chunk_matmul(x, self.k.mT) * self.w  # [G B, H, C, C]
        return e * chunk_matmul(x, state["kv"]) + chunk_matmul(scores, self.v)


def _advance(step, state):
    e_last, kk, kv = step
    decay = e_last[..., None, None]  # [B, H, 1, 1]
    return {"kk": decay * state["kk"] + kk, "kv": decay * state["kv"] + kv}, None


RULE = autodiff.rule(autodiff.Math(prepare=_Chunks, advance=_advance))


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha, lam):
    """Chunks of C tokens on the chunk engine: the chunk's writes prepared beside it, the state
    scanned (a decay and an add), then a batched solve for every token from the entering state.
    Padded tokens write nothing (beta = 0), do not decay, and solve with lam = 1 (a zero lam
    could leave H^kk + Diag(lam) singular on a token whose output is cut)."""
    (lam32,) = upcast(lam)
    # lam rides as a per-token input of one batch row, [1, T, H, K]: the engine's inputs have a
    # time axis, and one row (not B) keeps its cotangent buffer, summed back to [H, K], small
    lam_t = jnp.broadcast_to(lam32, (1, q.shape[1]) + lam32.shape)
    inputs = (q, k, v, beta, log_alpha, lam_t)
    fill = (None,) * 5 + (1.0,)
    o, state = autodiff.run(RULE, inputs, reset, initial_state(state, q, v), chunk_size, fill=fill)
    return o.astype(v.dtype), state
