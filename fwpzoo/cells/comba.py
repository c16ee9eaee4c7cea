"""Comba: a scalar decay, then a delta write whose error is read through a feedback key p.

    S' = alpha_t S_{t-1},                                          alpha_t = exp(log_alpha_t)
    S_t = S' + beta_t k_t (v_t - S'^T p_t)^T
        = (I - beta_t k_t p_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

With p = k it is the gated delta rule; Comba takes p = c k with c in (0, 1) (a learned scalar per
head), which keeps the transition's eigenvalue along k, 1 - beta c ||k||^2, inside (-1, 1) for
unit keys and beta in (0, 2). The FWP layer makes p a per-token, per-key c in (0, 1) times k
(GATE_SPECS: `times` KEY), Comba's head-wide c being the case of a constant gate. `step` and
`recurrent` follow flash-linear-attention's `naive_recurrent_comba` (fla/ops/comba/naive.py)
with q used as given (the layer scales it).

The transition is a scalar decay plus rank one, so the fast forms are dplr's (dplr.py) on

    log_w = log_alpha (on every key),  a = alpha p,  b = -beta k,  written value beta v

q, k, p [B, T, H, K]; v [B, T, H, V]; beta, log_alpha [B, T, H]; state S [B, H, K, V] float32;
o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import dplr
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    AFFINE,
    BETA,
    KEY,
    LOG_DECAY,
    PER_TOKEN_KEY,
    UNIT,
    Gate,
    Objective,
    gate_names,
)

GATE_SPECS = (
    Gate("beta", range=BETA),
    Gate("log_alpha", range=LOG_DECAY),
    Gate("p", shape=PER_TOKEN_KEY, range=UNIT, times=KEY),  # c * k, c in (0, 1) per key
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = (I - beta_t k_t p_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T",
    loss=(
        "none for a free feedback key p; with p = k: 1/2 ||S^T k_t - v_t||^2 after a decay "
        "(the gated delta rule)"
    ),
    step=AFFINE,
    decay="log_alpha",
    lr="beta",
    paper="Hu et al. 2025 (Comba: improving bilinear RNNs with closed-loop control)",
)


def step(state, q, k, v, *, reset=None, beta, log_alpha, p):
    """One token: q, k, p [B, H, K], v [B, H, V], beta, log_alpha [B, H]."""
    state = reset_state(state, reset)
    q, k, v, beta, log_alpha, p = upcast(q, k, v, beta, log_alpha, p)
    state = jnp.exp(log_alpha)[..., None, None] * state  # [B, H, K, V]
    error = v - jnp.einsum("bhkv,bhk->bhv", state, p)  # [B, H, V]
    state = state + k[..., :, None] * (beta[..., None] * error)[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, beta, log_alpha, p):
    gates = {"beta": beta, "log_alpha": log_alpha, "p": p}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def as_dplr(k, v, beta, log_alpha, p):
    """(written value [B, T, H, V], dplr's gates {log_w, a, b} [B, T, H, K]) of the same
    transition, in float32."""
    k, v, beta, log_alpha, p = upcast(k, v, beta, log_alpha, p)
    log_w = jnp.broadcast_to(log_alpha[..., None], k.shape)  # [B, T, H, K]
    a = jnp.exp(log_alpha)[..., None] * p
    return beta[..., None] * v, {"log_w": log_w, "a": a, "b": -beta[..., None] * k}


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha, p):
    v_in, gates = as_dplr(k, v, beta, log_alpha, p)
    # in the inputs' dtype: the chunk engine takes its matmuls' dtype from q, k and v
    # (cells/chunked/precision.py), and dplr's chunk matmuls round v_in to it anyway
    v_in = v_in.astype(jnp.result_type(q, k, v))
    o, state = dplr.chunkwise(q, k, v_in, state=state, chunk_size=chunk_size, reset=reset, **gates)
    return o.astype(v.dtype), state


def associative(q, k, v, *, state=None, reset=None, beta, log_alpha, p):
    v_in, gates = as_dplr(k, v, beta, log_alpha, p)
    o, state = dplr.associative(q, k, v_in, state=state, reset=reset, **gates)
    return o.astype(v.dtype), state
