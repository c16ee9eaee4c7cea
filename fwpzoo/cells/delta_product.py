"""DeltaProduct: per token an optional decay, then N delta-rule sub-steps (N Householder factors).

    S_t^(0) = Diag(alpha_t) S_{t-1}
    S_t^(j) = (I - beta_tj k_tj k_tj^T) S_t^(j-1) + beta_tj k_tj v_tj^T,   j = 1..N
    S_t = S_t^(N),   o_t = S_t^T q_t

q [B, T, H, K]; k [B, T, H, N, K]; v [B, T, H, N, V]; beta [B, T, H, N]; log_alpha [B, T, H]
(scalar decay), [B, T, H, K] (per key row) or None (no decay); state S [B, H, K, V] float32;
o [B, T, H, V] in v's dtype.
"""

import functools

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    BETA,
    GRADIENT_STEPS,
    LOG_DECAY,
    SCALAR_OR_PER_KEY,
    Gate,
    Objective,
    gate_names,
    squared_error,
)
from fwpzoo.cells.chunked import delta as delta_chunks
from fwpzoo.cells.delta_rule import delta_update
from fwpzoo.cells.gated_linear_attn import decay_rows

GATE_SPECS = (
    Gate("beta", range=BETA, per_sub_step=True),
    Gate("log_alpha", SCALAR_OR_PER_KEY, LOG_DECAY, optional=True),
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = prod_j (I - beta_tj k_tj k_tj^T) Diag(alpha_t) S_{t-1} + writes",
    loss="1/2 ||S^T k_tj - v_tj||^2, j = 1..N",
    step=GRADIENT_STEPS,
    loss_fn=squared_error,
    lr="beta",
    decay="log_alpha",
    paper="Siems et al. 2025 (DeltaProduct)",
)


def step(state, q, k, v, *, reset=None, beta, log_alpha=None):
    """One token: q [B, H, K], k [B, H, N, K], v [B, H, N, V], beta [B, H, N], log_alpha [B, H]
    or [B, H, K]."""
    state = reset_state(state, reset)
    q, k, v, beta = upcast(q, k, v, beta)
    if log_alpha is not None:
        state = decay_rows(log_alpha, q.ndim) * state
    for j in range(k.shape[-2]):
        state = delta_update(state, k[..., j, :], v[..., j, :], beta[..., j])
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, beta, log_alpha=None):
    gates = {"beta": beta} if log_alpha is None else {"beta": beta, "log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v[..., 0, :]), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha=None):
    """Each chunk holds whole tokens, chunk_size // N of them, and runs their N sub-steps as one
    gated-delta-rule chunk of C = tokens * N writes, read only after each token's last sub-step."""
    return delta_chunks.chunkwise(q, k, v, beta, log_alpha, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None, beta, log_alpha=None):
    """A token's N sub-steps compose into one affine map (M, X) before the scan over T."""
    m, x = _delta_assoc.elements(k, v, beta)  # [B, T, H, N, K, K], [B, T, H, N, K, V]
    sub_steps = [(m[..., j, :, :], x[..., j, :, :]) for j in range(k.shape[-2])]
    token = _delta_assoc.decayed(functools.reduce(_delta_assoc.combine, sub_steps), log_alpha)
    return _delta_assoc.scan(q, token, state, v.dtype, reset)
