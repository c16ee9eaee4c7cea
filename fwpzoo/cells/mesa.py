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
from fwpzoo.cells._chunking import Segments, causal_decay, keep
from fwpzoo.cells._reference import initial_parts, reset_state, scan_steps, upcast
from fwpzoo.cells._remat_chunks import scan_chunks
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


def _chunk(state, q, k, v, beta, log_alpha, reset, lam):
    """One chunk (mesa.md): every H^kk_t of the chunk from the entering state and the decayed,
    beta-weighted writes, one Cholesky solve per token, then the read as linear attention with
    query x_t = (H^kk_t + Diag(lam))^{-1} q_t. q, k [B, H, C, K], v [B, H, C, V], beta,
    log_alpha [B, H, C], reset [B, 1, C] or None, lam [H, K]."""
    (lam,) = upcast(lam)
    g = jnp.cumsum(log_alpha, axis=-1)  # [B, H, C]
    gamma = causal_decay(g)  # [B, H, C, C]
    e, e_last = jnp.exp(g), jnp.exp(g[..., -1])  # [B, H, C]: entering state's factor; [B, H]
    if reset is not None:  # no pair across a reset; the states only where they reach
        seg = Segments(reset)
        gamma = keep(seg.same, gamma, g.dtype)
        e, e_last = keep(seg.first, e, g.dtype), keep(seg.through, e_last, g.dtype)
    w = gamma * beta[..., None, :]  # [B, H, C, C]: weight of write s in H_t
    kk0, kv0 = state["kk"], state["kv"]
    kk = e[..., None, None] * kk0[:, :, None] + jnp.einsum("bhts,bhsi,bhsj->bhtij", w, k, k)
    x = _spd_solve(regularised(kk, lam[:, None]), q)  # [B, H, C, K]
    o = e[..., None] * (x @ kv0) + ((x @ k.mT) * w) @ v  # [B, H, C, V]
    last = w[..., -1, :, None] * k  # [B, H, C, K]: each write's weight in the leaving state
    leaving = {"kk": e_last[..., None, None] * kk0 + last.mT @ k}
    leaving["kv"] = e_last[..., None, None] * kv0 + last.mT @ v
    return leaving, o


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha, lam):
    """Per chunk of C tokens: the chunk's H^kk_t from the gated-linear-attention chunk math, a
    batched solve for all its tokens, the state carried across chunks. Padded tokens write
    nothing (beta = 0) and do not decay."""
    resets = None if reset is None else reset[:, :, None]  # [B, T, 1]: one row for all heads
    inputs = (q, k, v, beta, log_alpha, resets)
    return scan_chunks(_chunk, inputs, initial_state(state, q, v), chunk_size, static=(lam,))
