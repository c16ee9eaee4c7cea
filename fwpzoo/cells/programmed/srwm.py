"""The modern self-referential weight matrix (SRWM; Irie, Schlag, Csordas & Schmidhuber, ICML 2022,
section 3): one fast matrix per head that makes its own output, keys, queries and learning rates
and rewrites itself by a delta rule.

    [y_t, k_t, q_t, beta_t] = W_{t-1} x_t               row blocks of D_out, D, D and 4 rows
    v_t = W_{t-1} phi(q_t)          vbar_t = W_{t-1} phi(k_t)
    W_t = W_{t-1} + sigmoid(beta_t) * (v_t - vbar_t) phi(k_t)^T     beta_t[i] scales row block i

x [B, T, H, D]; W_t [B, H, D_out + 2D + 4, D]; y [B, T, H, D_out]. phi must map a vector to a
probability vector of the same size (softmax, the paper's choice): then ||phi(k)|| <= 1 and each
write moves W only within the simplex of its past values, which keeps the self-modification
stable. The learned initial matrix W_0 [H, D_out + 2D + 4, D] is the layer's only slow weight; it
is also the state that `reset` restores (the cell's zero state): a fresh sequence starts from the
learned program, since from W = 0 the matrix would output y = k = q = 0 and never write again.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._reference import state_dtype
from fwpzoo.cells.programmed import scans

BETA_ROWS = 4  # one learning rate per row block: y, k, q, beta


def output_dim(W0) -> int:
    """D_out of an initial matrix W0 [H, D_out + 2D + 4, D]."""
    return W0.shape[-2] - 2 * W0.shape[-1] - BETA_ROWS


def reset_to(W0, W, reset):
    """W [B, H, R, D] with the rows of batch entries where reset [B] is True replaced by W0."""
    if reset is None:
        return W
    return jnp.where(reset[:, None, None, None], W0[None].astype(W.dtype), W)


def _core(phi, params, W, x):
    """One token; x: {"x" [B, H, D], optional "reset" [B]}."""
    W0 = params["W0"]  # [H, R, D]
    W = reset_to(W0, W, x.get("reset"))  # [B, H, R, D]
    D, D_out = W0.shape[-1], output_dim(W0)
    out = jnp.einsum("bhrd,bhd->bhr", W, x["x"].astype(W.dtype))  # [B, H, R]
    y, k, q, beta = jnp.split(out, [D_out, D_out + D, D_out + 2 * D], axis=-1)
    k, q = phi(k), phi(q)  # [B, H, D]
    v = jnp.einsum("bhrd,bhd->bhr", W, q)  # [B, H, R]
    v_bar = jnp.einsum("bhrd,bhd->bhr", W, k)  # [B, H, R]
    rates = jnp.repeat(
        jax.nn.sigmoid(beta),
        jnp.array([D_out, D, D, BETA_ROWS]),
        axis=-1,
        total_repeat_length=W.shape[-2],
    )  # [B, H, R]
    u = rates * (v - v_bar)  # [B, H, R]
    return W + u[..., :, None] * k[..., None, :], y, (u, k)


def _undo(W, write):
    u, k = write
    return W - u[..., :, None] * k[..., None, :]


def initial_state(W0, state, x):
    """W [B, H, R, D] in the state dtype: W0 for every sequence when state is None."""
    dtype = state_dtype(x, W0, state)
    if state is None:
        return jnp.broadcast_to(W0.astype(dtype), (x.shape[0], *W0.shape))
    return state.astype(dtype)


def step(state, x, *, reset=None, W0, phi=jax.nn.softmax):
    """One token: x [B, H, D], reset [B] -> (W [B, H, R, D], y [B, H, D_out])."""
    W, y, _ = _core(phi, {"W0": W0}, initial_state(W0, state, x), {"x": x, "reset": reset})
    return W, y


def _scan(scan, x, W0, phi, state, reset):
    xs = {"x": x} if reset is None else {"x": x, "reset": reset}
    core = lambda params, W, x: _core(phi, params, W, x)  # noqa: E731
    W = initial_state(W0, state, x)
    y, W = scan(core, {"W0": W0}, W, jax.tree.map(scans.time_major, xs))
    return scans.batch_major(y).astype(x.dtype), W


def recurrent(x, *, state=None, reset=None, W0, phi=jax.nn.softmax):
    """The spec: lax.scan over `step` -> (y [B, T, H, D_out], W [B, H, R, D])."""
    return _scan(scans.plain, x, W0, phi, state, reset)


def checkpointed(x, *, state=None, reset=None, W0, phi=jax.nn.softmax, chunk_size=64):
    """`recurrent` whose backward keeps only the states entering each chunk of chunk_size."""
    scan = lambda core, params, W, xs: scans.checkpointed(core, params, W, xs, chunk_size)  # noqa: E731
    return _scan(scan, x, W0, phi, state, reset)


def reversible(x, *, state=None, W0, phi=jax.nn.softmax):
    """`recurrent` whose backward recovers each W_{t-1} by undoing the write of token t."""
    scan = lambda core, params, W, xs: scans.reversible(core, _undo, params, W, xs)  # noqa: E731
    return _scan(scan, x, W0, phi, state, None)
