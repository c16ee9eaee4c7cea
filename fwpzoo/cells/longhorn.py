"""Longhorn: the implicit (proximal) online-learning step on the delta rule's objective.

    S_t = argmin_S 1/2 ||S - S_{t-1}||_F^2 + eps_t/2 ||S^T k_t - v_t||^2
        = S_{t-1} - (eps_t / (1 + eps_t k_t^T k_t)) k_t (S_{t-1}^T k_t - v_t)^T
    o_t = S_t^T q_t

(Liu et al. 2024, arXiv 2407.14207.) The closed form is the delta rule with the step
beta_t = eps_t / (1 + eps_t |k_t|^2), which lies in (0, 1/|k_t|^2) for every eps_t > 0: the
implicit step never overshoots, however large eps. So every form is the delta rule's with that
beta (its chunk scan and its associative scan; learning_rules.md, section 3); the gradients reach
eps and k through beta by autodiff.

q, k [B, T, H, K]; v [B, T, H, V]; eps [B, T, H] (> 0); state S [B, H, K, V] float32;
o [B, T, H, V] in v's dtype.
"""

import jax.numpy as jnp

from fwpzoo.cells import _delta_assoc
from fwpzoo.cells._reference import initial_state, reset_state, scan_steps, upcast
from fwpzoo.cells._spec import IMPLICIT, POSITIVE, Gate, Objective, gate_names, squared_error
from fwpzoo.cells.chunked import delta as delta_chunks
from fwpzoo.cells.delta_rule import delta_update

GATE_SPECS = (Gate("eps", range=POSITIVE),)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="S_t = S_{t-1} - eps_t / (1 + eps_t k_t^T k_t) k_t (S_{t-1}^T k_t - v_t)^T",
    loss="1/2 ||S^T k_t - v_t||^2",
    step=IMPLICIT,
    loss_fn=squared_error,
    lr="eps",
    paper="Liu et al. 2024 (Longhorn)",
)


def delta_beta(k, eps):
    """The delta rule's step of the implicit update: eps / (1 + eps k^T k), [...] from
    k [..., K] and eps [...], in float32 (float64 for float64 inputs)."""
    k, eps = upcast(k, eps)
    return eps / (1.0 + eps * jnp.sum(jnp.square(k), axis=-1))


def step(state, q, k, v, *, reset=None, eps):
    """One token: q, k [B, H, K], v [B, H, V], eps [B, H]."""
    state = reset_state(state, reset)
    q, k, v = upcast(q, k, v)
    state = delta_update(state, k, v, delta_beta(k, eps))
    return state, jnp.einsum("bhkv,bhk->bhv", state, q)


def recurrent(q, k, v, *, state=None, reset=None, eps):
    o, state = scan_steps(step, initial_state(state, q, v), q, k, v, {"eps": eps}, reset)
    return o.astype(v.dtype), state


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, eps):
    """The delta rule's chunk scan with beta = eps / (1 + eps k^T k)."""
    return delta_chunks.chunkwise(q, k, v, delta_beta(k, eps), None, state, chunk_size, reset)


def associative(q, k, v, *, state=None, reset=None, eps):
    """The delta rule's associative scan with beta = eps / (1 + eps k^T k)."""
    elems = _delta_assoc.elements(k, v, delta_beta(k, eps))
    return _delta_assoc.scan(q, elems, state, v.dtype, reset)
