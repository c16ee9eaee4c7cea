"""Gated DeltaNet-2: a per-key decay, then a delta write with channel-wise erase and write gates.

    S' = Diag(alpha_t) S_{t-1},                                   alpha_t = exp(log_alpha_t)
    S_t = S' + k_t (write_t * v_t - S'^T (erase_t * k_t))^T
        = (I - k_t (erase_t * k_t)^T) Diag(alpha_t) S_{t-1} + k_t (write_t * v_t)^T
    o_t = S_t^T q_t

erase is a gate on the key axis (how much of what k_t reads is erased, channel by channel),
write one on the value axis; erase = write = beta (a scalar per head) is KDA, the gated delta
rule with per-key decay. `step` and `recurrent` follow flash-linear-attention's
`naive_recurrent_gdn2` (fla/ops/gdn2/naive.py) with q used as given (the layer scales it).

The transition is diagonal plus rank one, so the fast forms are dplr's (dplr.py) on

    log_w = log_alpha,  a = alpha * erase * k,  b = -k,  written value write * v

(k (erase * k)^T Diag(alpha) = k (alpha * erase * k)^T): no kernels of its own.

q, k, log_alpha, erase [B, T, H, K]; v, write [B, T, H, V]; state S [B, H, K, V] float32;
o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import dplr
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    AFFINE,
    LOG_DECAY,
    PER_TOKEN_KEY,
    PER_TOKEN_VALUE,
    UNIT,
    Gate,
    Objective,
    gate_names,
)

GATE_SPECS = (
    Gate("log_alpha", shape=PER_TOKEN_KEY, range=LOG_DECAY),
    Gate("erase", shape=PER_TOKEN_KEY, range=UNIT),
    Gate("write", shape=PER_TOKEN_VALUE, range=UNIT),
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = (I - k_t (erase_t * k_t)^T) Diag(alpha_t) S_{t-1} + k_t (write_t * v_t)^T",
    loss=(
        "none for free channel gates; with erase = write = beta: 1/2 ||S^T k_t - v_t||^2 "
        "after a per-key decay (KDA)"
    ),
    step=AFFINE,
    decay="log_alpha",
    paper="Gated DeltaNet-2, 2026: decoupling erase and write (arXiv 2605.22791)",
)


def step(state, q, k, v, *, reset=None, log_alpha, erase, write):
    """One token: q, k, log_alpha, erase [B, H, K], v, write [B, H, V]."""
    state = reset_state(state, reset)
    q, k, v, log_alpha, erase, write = upcast(q, k, v, log_alpha, erase, write)
    state = jnp.exp(log_alpha)[..., None] * state  # [B, H, K, V]: decayed along the key rows
    erased = jnp.einsum("bhkv,bhk->bhv", state, erase * k)  # [B, H, V]
    state = state + k[..., :, None] * (write * v - erased)[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, log_alpha, erase, write):
    gates = {"log_alpha": log_alpha, "erase": erase, "write": write}
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, gates, reset)
    return o.astype(v.dtype), state


def as_dplr(k, v, log_alpha, erase, write):
    """(written value [B, T, H, V], dplr's gates {log_w, a, b} [B, T, H, K]) of the same
    transition, in float32."""
    k, v, log_alpha, erase, write = upcast(k, v, log_alpha, erase, write)
    a = jnp.exp(log_alpha) * erase * k  # [B, T, H, K]
    return write * v, {"log_w": log_alpha, "a": a, "b": -k}


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, log_alpha, erase, write):
    v_in, gates = as_dplr(k, v, log_alpha, erase, write)
    # in the inputs' dtype: the chunk engine takes its matmuls' dtype from q, k and v
    # (cells/chunked/precision.py), and dplr's chunk matmuls round v_in to it anyway
    v_in = v_in.astype(jnp.result_type(q, k, v))
    o, state = dplr.chunkwise(q, k, v_in, state=state, chunk_size=chunk_size, reset=reset, **gates)
    return o.astype(v.dtype), state


def associative(q, k, v, *, state=None, reset=None, log_alpha, erase, write):
    v_in, gates = as_dplr(k, v, log_alpha, erase, write)
    o, state = dplr.associative(q, k, v_in, state=state, reset=reset, **gates)
    return o.astype(v.dtype), state
