"""The Recurrent DeltaNet (RDN): a delta-rule fast weight programmer whose programmer also reads
its own previous output (Irie, Schlag, Csordas & Schmidhuber, NeurIPS 2021, section 3).

    [q_t, k_t, v_t, beta_t] = W x_t + R tanh(y_{t-1})                    per head
    S_t = S_{t-1} + sigmoid(beta_t) phi(k_t) (v_t - S_{t-1}^T phi(k_t))^T
    y_t = S_t^T phi(q_t)

(the paper writes W_t = S_t^T.) The input projection W x_t does not depend on the past and comes
in as q, k [B, T, H, K], v [B, T, H, V] and beta [B, T, H] (before the sigmoid); the recurrent
projection R [H, V, 2K + V + 1] (tanh(y) -> [q | k | v | beta]) and the feature map phi
([..., K] -> [..., K'], softmax in the paper) run inside the scan. State: a dict
{"S": [B, H, K', V], "y": [B, H, V]} (the fast weights and the last output), zeros when None;
o [B, T, H, V].

With R = 0 this is the delta_rule cell on phi(q), phi(k), v and sigmoid(beta).
Forms: `recurrent` (the spec, autodiff through the scan) and the same scan with a memory-lean
backward, `checkpointed` and `reversible` (see scans.py; measured in recurrent_fwp.md).
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._reference import reset_state, state_dtype
from fwpzoo.cells.programmed import scans


def _core(phi, params, state, x):
    """One token; x: {"q", "k" [B, H, K], "v" [B, H, V], "beta" [B, H], optional "reset" [B]}."""
    state = reset_state(state, x.get("reset"))
    S, y = state["S"], state["y"]  # [B, H, K', V], [B, H, V]
    K, V = x["q"].shape[-1], x["v"].shape[-1]
    feedback = jnp.einsum("bhv,hvn->bhn", jnp.tanh(y), params["R"].astype(S.dtype))
    dq, dk, dv, dbeta = jnp.split(feedback, [K, 2 * K, 2 * K + V], axis=-1)
    q = phi(x["q"].astype(S.dtype) + dq)  # [B, H, K']
    k = phi(x["k"].astype(S.dtype) + dk)  # [B, H, K']
    v = x["v"].astype(S.dtype) + dv  # [B, H, V]
    beta = jax.nn.sigmoid(x["beta"].astype(S.dtype) + dbeta[..., 0])  # [B, H]
    a = beta[..., None] * k  # [B, H, K']
    error = v - jnp.einsum("bhkv,bhk->bhv", S, k)  # [B, H, V]
    S = S + a[..., :, None] * error[..., None, :]
    y = jnp.einsum("bhkv,bhk->bhv", S, q)  # [B, H, V]
    return {"S": S, "y": y}, y, (a, error, state["y"])


def _undo(state, write):
    """The state before a token from the one after it and the token's write."""
    a, error, y_previous = write
    return {"S": state["S"] - a[..., :, None] * error[..., None, :], "y": y_previous}


def initial_state(state, q, v, phi, dtype):
    """The state in `dtype`: {"S": [B, H, K', V], "y": [B, H, V]} zeros when None (K' is phi's
    output size)."""
    if state is not None:
        return jax.tree.map(lambda s: s.astype(dtype), state)
    B, H, K = q.shape[0], q.shape[-2], q.shape[-1]
    V = v.shape[-1]
    features = jax.eval_shape(phi, jax.ShapeDtypeStruct((K,), dtype)).shape[-1]
    return {"S": jnp.zeros((B, H, features, V), dtype), "y": jnp.zeros((B, H, V), dtype)}


def step(state, q, k, v, *, reset=None, beta, R, phi=jax.nn.softmax):
    """One token: q, k [B, H, K], v [B, H, V], beta [B, H], reset [B] -> (state, y [B, H, V])."""
    state = initial_state(state, q, v, phi, state_dtype(q, k, v, beta, R))
    state, y, _ = _core(
        phi, {"R": R}, state, {"q": q, "k": k, "v": v, "beta": beta, "reset": reset}
    )
    return state, y


def _scan(scan, q, k, v, beta, R, phi, state, reset):
    state = initial_state(state, q, v, phi, state_dtype(q, k, v, beta, R))
    xs = {"q": q, "k": k, "v": v, "beta": beta}
    if reset is not None:
        xs["reset"] = reset
    core = lambda params, s, x: _core(phi, params, s, x)  # noqa: E731
    o, state = scan(core, {"R": R}, state, jax.tree.map(scans.time_major, xs))
    return scans.batch_major(o).astype(v.dtype), state


def recurrent(q, k, v, *, state=None, reset=None, beta, R, phi=jax.nn.softmax):
    """The spec: lax.scan over `step`; autodiff keeps every state."""
    return _scan(scans.plain, q, k, v, beta, R, phi, state, reset)


def checkpointed(q, k, v, *, state=None, reset=None, beta, R, phi=jax.nn.softmax, chunk_size=64):
    """`recurrent` whose backward keeps only the states entering each chunk of chunk_size."""
    scan = lambda core, params, s, xs: scans.checkpointed(core, params, s, xs, chunk_size)  # noqa: E731
    return _scan(scan, q, k, v, beta, R, phi, state, reset)


def reversible(q, k, v, *, state=None, beta, R, phi=jax.nn.softmax):
    """`recurrent` whose backward recovers each state by undoing the next token's write."""
    scan = lambda core, params, s, xs: scans.reversible(core, _undo, params, s, xs)  # noqa: E731
    return _scan(scan, q, k, v, beta, R, phi, state, None)
