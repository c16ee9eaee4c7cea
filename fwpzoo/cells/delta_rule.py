"""The delta rule (DeltaNet): each write corrects what the memory returns for its key.

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
        = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; beta [B, T, H] (any beta in (0, 2) keeps the transition's
eigenvalues in (-1, 1] for unit keys); state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import BETA, GRADIENT, Gate, Objective, gate_names, squared_error
from fwpzoo.cells.chunked import delta as delta_chunks

GATE_SPECS = (Gate("beta", range=BETA),)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = S_{t-1} - beta_t k_t (S_{t-1}^T k_t - v_t)^T",
    loss="1/2 ||S^T k_t - v_t||^2",
    step=GRADIENT,
    loss_fn=squared_error,
    lr="beta",
    paper="Schlag, Irie & Schmidhuber 2021; Yang et al. 2024 (parallel DeltaNet)",
)


def delta_update(state, k, v, beta):
    """S + beta k (v - S^T k)^T for k [B, H, K], v [B, H, V], beta [B, H]."""
    error = v - jnp.einsum("bhkv,bhk->bhv", state, k)  # [B, H, V]
    return state + (beta[..., None] * k)[..., :, None] * error[..., None, :]


def step(state, q, k, v, *, reset=None, beta):
    """One token: q, k [B, H, K], v [B, H, V], beta [B, H]."""
    state = reset_state(state, reset)
    q, k, v, beta = upcast(q, k, v, beta)
    state = delta_update(state, k, v, beta)
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, beta):
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, {"beta": beta}, reset)
    return o.astype(v.dtype), state


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, beta):
    return delta_chunks.chunkwise(q, k, v, beta, None, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None, beta):
    return _delta_assoc.scan(q, _delta_assoc.elements(k, v, beta), state, v.dtype, reset)
