"""The gated delta rule (Gated DeltaNet): decay, then a delta-rule write.

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t,   alpha_t = exp(log_alpha_t)

alpha_t is one decay per head (Gated DeltaNet, log_alpha [B, T, H]) or one per key row
(Kimi Delta Attention, log_alpha [B, T, H, K]); either way the write reads the decayed state.
q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; log_alpha in log space, <= 0;
state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    BETA,
    GRADIENT,
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

GATE_SPECS = (Gate("beta", range=BETA), Gate("log_alpha", SCALAR_OR_PER_KEY, LOG_DECAY))
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T",
    loss="1/2 ||S^T k_t - v_t||^2",
    step=GRADIENT,
    loss_fn=squared_error,
    lr="beta",
    decay="log_alpha",
    paper="Yang, Kautz & Hatamizadeh 2025 (Gated DeltaNet); per key: Kimi Team 2025 (KDA)",
)


def step(state, q, k, v, *, reset=None, beta, log_alpha):
    """One token: q, k [B, H, K], v [B, H, V], beta [B, H], log_alpha [B, H] or [B, H, K]."""
    state = reset_state(state, reset)
    q, k, v, beta = upcast(q, k, v, beta)
    # (I - beta k k^T) Diag(alpha) S + beta k v^T == delta update of Diag(alpha) S
    state = delta_update(decay_rows(log_alpha, k.ndim) * state, k, v, beta)
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, beta, log_alpha):
    gates = {"beta": beta, "log_alpha": log_alpha}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta, log_alpha):
    return delta_chunks.chunkwise(q, k, v, beta, log_alpha, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None, beta, log_alpha):
    elems = _delta_assoc.decayed(_delta_assoc.elements(k, v, beta), log_alpha)
    return _delta_assoc.scan(q, elems, state, v.dtype, reset)
