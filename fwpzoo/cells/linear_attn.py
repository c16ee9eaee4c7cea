"""Linear attention, the vanilla fast weight programmer (Hebbian update).

    S_t = S_{t-1} + k_t v_t^T          o_t = S_t^T q_t

q, k [B, T, H, K]; v [B, T, H, V]; state S [B, H, K, V] float32; o [B, T, H, V] in v's dtype.
The parallel forms are derived in linear_attention.md.
"""

import jax.numpy as jnp

from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import (
    DECAY,
    GRADIENT,
    Gate,
    Objective,
    State,
    gate_names,
    negative_correlation,
)
from fwpzoo.cells.chunked import linear as linear_chunks
from fwpzoo.cells.chunked.chunking import associative_states, resets_as_rows

GATE_SPECS: tuple[Gate, ...] = ()
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = S_{t-1} + k_t v_t^T",
    loss="-v_t^T S^T k_t",
    step=GRADIENT,
    loss_fn=negative_correlation,
    state=State(transition=DECAY),
    paper="Schmidhuber 1992; Katharopoulos et al. 2020; Schlag, Irie & Schmidhuber 2021",
)


def step(state, q, k, v, *, reset=None):
    """One token: q, k [B, H, K], v [B, H, V] -> (S [B, H, K, V], o [B, H, V])."""
    state = reset_state(state, reset)
    q, k, v = upcast(q, k, v)
    state = state + k[..., :, None] * v[..., None, :]
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None):
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, {}, reset)
    return o.astype(v.dtype), state


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None):
    """Causal attention inside each chunk of C tokens, the state carried across chunks."""
    return linear_chunks.chunkwise(q, k, v, None, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None):
    """Every S_t by a parallel prefix sum of the writes k_t v_t^T; memory O(T K V)."""
    S0 = initial_state(state, q, v)
    q32, k, v32 = upcast(q, k, v)
    writes = k[..., :, None] * v32[..., None, :]  # [B, T, H, K, V]
    reset = resets_as_rows(reset)  # [B, T, 1, 1, 1]
    states = associative_states(None, writes, S0, axis=1, reset=reset)  # [B, T + 1, H, K, V]
    o = jnp.einsum("bthkv,bthk->bthv", states[:, 1:], q32)
    return o.astype(v.dtype), states[:, -1]
