"""TTT-Linear (Sun et al. 2024, "Learning to (learn at test time)"): the fast weights are a linear
layer f(x) = x W + b, trained at test time by gradient steps on mini-batches of tokens.

For a mini-batch of U tokens entering with (W_0, b_0), every token s has the loss

    l_s(W, b) = 1/2 ||LN(k_s W + b) - (v_s - k_s)||^2,     LN(z) = ln_w * (z - mean) / std + ln_b

(a per-head LayerNorm over the V axis, std = sqrt(var + 1e-6); the target v - k because the fast
net's output carries a residual), and token t reads with the weights after the gradients of
tokens s <= t of its mini-batch, all taken at the mini-batch's start weights:

    W_t = W_0 - eta_t sum_{s <= t} dl_s/dW (W_0, b_0),   b_t likewise
    y_t = q_t W_t + b_t,   o_t = y_t + LN(y_t)

and the mini-batch leaves (W_U, b_U). This is flash-linear-attention's naive `ttt_linear`
(fla/ops/ttt/naive.py, from the TTT authors' code) exactly, with eta per token as there (it
scales the whole sum at t), q used as given (the layer scales it) and a last, partial mini-batch
taken as a mini-batch of its own tokens (fla pads it with zero tokens, whose gradients then
reach the final bias). With mini_batch = 1 each token takes one gradient step at the weights
the previous one left: `step`.

Forms: `recurrent` walks the tokens of each mini-batch one after another (the gradient of each
at the start weights, the weights of each made explicitly); `chunkwise` is the dual form: the
mini-batch's gradients in parallel and the reads as causal attention over them,
q_t W_t = q_t W_0 - eta_t sum_{s <= t} (q_t . k_s) g_s, so no per-token weights exist; chunks of
chunk_size tokens hold chunk_size / mini_batch mini-batches. A reset at token t replaces the
state before t by zeros: the tokens from t on start from zero weights and see only the
gradients of tokens from t on; mini-batches are counted from the start of the sequence.

q, k [B, T, H, K]; v [B, T, H, V] with V = K; eta [B, T, H]; ln_w, ln_b [H, K] static;
state {"W": [B, H, K, V], "b": [B, H, V]} float32; o [B, T, H, V] in v's dtype.
"""

import jax
import jax.numpy as jnp

from fwpzoo.cells._reference import initial_parts, reset_state, upcast
from fwpzoo.cells._spec import (
    INNER,
    NOT_AFFINE,
    REAL,
    STATIC,
    UNIT,
    Gate,
    Objective,
    State,
    gate_names,
)
from fwpzoo.cells.chunked.remat import scan_chunks
from fwpzoo.cells.deep._batches import (
    from_units,
    layer_norm,
    layer_norm_gradient,
    layout,
    pad_time,
    padded_length,
    scan_units,
)


def reconstruction_loss(params, k, v, ln_w, ln_b):
    """1/2 ||LN(k W + b) - (v - k)||^2 for one head and token: params {"W": [K, V], "b": [V]},
    k [K], v [V], ln_w, ln_b [V]."""
    z = k @ params["W"] + params["b"]
    return 0.5 * jnp.sum(jnp.square(layer_norm(z, ln_w, ln_b) - (v - k)))


GATE_SPECS = (
    Gate("eta", range=UNIT),
    Gate("ln_w", shape=STATIC, range=REAL, start=1.0),
    Gate("ln_b", shape=STATIC, range=REAL),
)
GATES = gate_names(GATE_SPECS)
OBJECTIVE = Objective(
    update="W_t = W_0 - eta_t sum_{s <= t in the mini-batch} k_s g_s^T (b likewise), "
    "o_t = y_t + LN(y_t), y_t = q_t W_t + b_t",
    loss="1/2 ||LN(k_s W + b) - (v_s - k_s)||^2, at the mini-batch's start weights",
    step=INNER,
    loss_fn=reconstruction_loss,
    lr="eta",
    state=State((("W", "K V"), ("b", "V")), is_dict=True, transition=NOT_AFFINE),
    weights="W",
    paper="Sun et al. 2024 (Learning to (learn at test time): TTT-Linear)",
)
# Static arguments of the forms and the model fields that set them (the FWP layer reads this).
OPTIONS = {"mini_batch": "inner_batch"}
_NAMES = ("q", "k", "v", "eta", "valid", "reset")  # the scan inputs of a unit, in order


def _read(W, b, q, ln_w, ln_b):
    """y = q W + b, then y + LN(y): q [..., K] against W [..., K, V] -> [..., V]."""
    y = jnp.einsum("...k,...kv->...v", q, W) + b
    return y + layer_norm(y, ln_w, ln_b)


def step(state, q, k, v, *, reset=None, eta, ln_w, ln_b, mini_batch=1):
    """One token (a mini-batch of one): q, k [B, H, K], v [B, H, V], eta [B, H], ln_w, ln_b
    [H, K]. A larger mini_batch would need the mini-batch's start weights and summed gradients
    in the state, which TTT-Linear's state (W, b) does not hold: refused."""
    _check(mini_batch)
    if mini_batch != 1:
        raise ValueError(f"step takes a mini-batch of one token, and mini_batch is {mini_batch}")
    state = reset_state(state, reset)
    q, k, v, eta, ln_w, ln_b = upcast(q, k, v, eta, ln_w, ln_b)
    W, b = state["W"], state["b"]
    z = jnp.einsum("bhk,bhkv->bhv", k, W) + b  # [B, H, V]
    g = layer_norm_gradient(z, v - k, ln_w, ln_b)  # [B, H, V]: dl/dz
    W = W - eta[..., None, None] * k[..., :, None] * g[..., None, :]
    b = b - eta[..., None] * g
    return {"W": W, "b": b}, _read(W, b, q, ln_w, ln_b)


def _check(mini_batch, chunk_size=None):
    if not isinstance(mini_batch, int) or mini_batch < 1:
        raise ValueError(f"mini_batch must be a positive int, got {mini_batch!r}")
    if chunk_size is not None and chunk_size % mini_batch:
        raise ValueError(
            f"mini_batch {mini_batch} must divide chunk_size {chunk_size}: a chunk holds whole "
            "mini-batches"
        )


def _inputs(q, k, v, eta, ln_w, ln_b, state, reset, size):
    """(state, the scan inputs in units of `size` tokens, ln_w, ln_b [H, 1, V]) in the state's
    dtype; eta is edge-padded (a padded token repeats the last real token's)."""
    state = initial_parts(OBJECTIVE.state, state, q, v)
    dtype = state["W"].dtype
    cast = lambda x: x.astype(dtype)  # noqa: E731
    per_token = {"q": cast(q), "k": cast(k), "v": cast(v), "eta": cast(eta)}
    xs = layout(size, per_token, reset, edge=("eta",))
    return state, xs, cast(ln_w)[:, None], cast(ln_b)[:, None]


def recurrent(q, k, v, *, state=None, reset=None, eta, ln_w, ln_b, mini_batch=1):
    """Mini-batch after mini-batch, and inside each the tokens one after another."""
    _check(mini_batch)
    state, xs, ln_w, ln_b = _inputs(q, k, v, eta, ln_w, ln_b, state, reset, mini_batch)

    def token(carry, x):
        W0, b0, GW, Gb = carry  # start weights, summed gradients [B, H, K, V], [B, H, V]
        q_t, k_t, v_t, eta_t, valid_t, reset_t = x  # [B, H, K | V], eta [B, H], [B, 1]
        cut = reset_t[..., None, None]  # [B, 1, 1, 1]: the state before t is replaced by zeros
        W0, GW = jnp.where(cut, 0.0, W0), jnp.where(cut, 0.0, GW)
        b0, Gb = jnp.where(cut[..., 0], 0.0, b0), jnp.where(cut[..., 0], 0.0, Gb)
        z = jnp.einsum("bhk,bhkv->bhv", k_t, W0) + b0  # [B, H, V]: at the start weights
        g = layer_norm_gradient(z, v_t - k_t, ln_w[:, 0], ln_b[:, 0]) * valid_t[..., None]
        GW, Gb = GW + k_t[..., :, None] * g[..., None, :], Gb + g
        W_t = W0 - eta_t[..., None, None] * GW  # [B, H, K, V]: token t's weights
        b_t = b0 - eta_t[..., None] * Gb
        return (W0, b0, GW, Gb), _read(W_t, b_t, q_t, ln_w[:, 0], ln_b[:, 0])

    def unit(carry, x):
        W, b = carry
        # time-major: [U, B, H, K | V], eta [U, B, H], valid and reset [U, B, 1]
        tokens = tuple(jnp.moveaxis(x[n], -2 if x[n].ndim > 3 else -1, 0) for n in _NAMES)
        zeros = (jnp.zeros_like(W), jnp.zeros_like(b))
        (W0, b0, GW, Gb), o = jax.lax.scan(token, (W, b, *zeros), tokens)
        eta_end = x["eta"][..., -1]  # [B, H]: the last token's (edge-padded: the last real one)
        W, b = W0 - eta_end[..., None, None] * GW, b0 - eta_end[..., None] * Gb
        return (W, b), jnp.moveaxis(o, 0, -2)  # o [B, H, U, V]

    (W, b), o = scan_units(unit, (state["W"], state["b"]), xs)
    return from_units(o)[:, : q.shape[1]].astype(v.dtype), {"W": W, "b": b}


def _dual(W, b, x, ln_w, ln_b):
    """One mini-batch in the dual form: (W, b) entering [B, H, K, V], [B, H, V]; x the unit's
    inputs ([B, H, U, ...], valid and reset [B, 1, U]) -> (W, b) leaving, o [B, H, U, V]."""
    q, k, v, eta = x["q"], x["k"], x["v"], x["eta"]
    U = q.shape[-2]
    index = jnp.cumsum(x["reset"], axis=-1)  # [B, 1, U]: segment of each token
    first = (index == 0)[..., None]  # [B, 1, U, 1]: tokens the entering weights reach
    last = (index == index[..., -1:])[..., None]  # [B, 1, U, 1]: the leaving weights' tokens
    through = (index[..., -1] == 0)[..., None, None]  # [B, 1, 1, 1]: no reset in the unit
    causal = jnp.tril(jnp.ones((U, U), bool)) & (index[..., :, None] == index[..., None, :])
    z = jnp.where(first, k @ W + b[..., None, :], 0.0)  # [B, H, U, V]: at the start weights
    g = layer_norm_gradient(z, v - k, ln_w, ln_b) * x["valid"][..., None]  # [B, H, U, V]
    scores = jnp.where(causal, q @ k.mT + 1.0, 0.0)  # [B, H, U, U]: q_t . k_s, and 1 for b
    y = jnp.where(first, q @ W + b[..., None, :], 0.0) - eta[..., None] * (scores @ g)
    o = y + layer_norm(y, ln_w, ln_b)
    eta_end = eta[..., -1, None, None]  # [B, H, 1, 1]
    g_last = jnp.where(last, g, 0.0)
    W = jnp.where(through, W, 0.0) - eta_end * (k.mT @ g_last)
    b = jnp.where(through[..., 0], b, 0.0) - eta_end[..., 0] * jnp.sum(g_last, axis=-2)
    return W, b, o


def _chunk(mini_batch):
    """scan_chunks' chunk function: the chunk's mini-batches one after another, each in the
    dual form. q, k [B, H, C, K], v [B, H, C, V], eta [B, H, C], valid, reset [B, 1, C], ln_w,
    ln_b [H, K] -> (state leaving, o [B, H, C, V])."""

    def run(state, q, k, v, eta, valid, reset, ln_w, ln_b):
        B, H, C, V = v.shape

        def split(x):  # [B, H | 1, C, ...] -> [C / U, B, H | 1, U, ...]
            return jnp.moveaxis(
                x.reshape(*x.shape[:2], C // mini_batch, mini_batch, *x.shape[3:]), 2, 0
            )

        names = ("q", "k", "v", "eta", "valid", "reset")
        xs = {n: split(x) for n, x in zip(names, (q, k, v, eta, valid, reset), strict=True)}

        def body(carry, x):
            W, b, o = _dual(*carry, x, ln_w[:, None], ln_b[:, None])
            return (W, b), o

        (W, b), o = jax.lax.scan(body, (state["W"], state["b"]), xs)
        return {"W": W, "b": b}, jnp.moveaxis(o, 0, 2).reshape(B, H, C, V)

    return run


def chunkwise(q, k, v, *, state=None, chunk_size=64, reset=None, eta, ln_w, ln_b, mini_batch=1):
    """Chunks of chunk_size tokens, each chunk_size / mini_batch mini-batches in the dual form;
    the chunk loop keeps only the state entering each chunk for the backward (scan_chunks)."""
    _check(mini_batch, chunk_size)
    B, T = q.shape[:2]
    size = min(chunk_size, padded_length(T, mini_batch))
    T_padded = padded_length(T, size)
    state = initial_parts(OBJECTIVE.state, state, q, v)
    valid = jnp.broadcast_to((jnp.arange(T_padded) < T)[None, :, None], (B, T_padded, 1))
    resets = jnp.zeros((B, T, 1), bool) if reset is None else reset[:, :, None]
    inputs = (
        *(pad_time(x, T_padded) for x in (q, k, v)),
        pad_time(eta, T_padded, "edge"),  # a padded token repeats the last real token's eta
        valid,
        pad_time(resets, T_padded),
    )
    o, state = scan_chunks(_chunk(mini_batch), inputs, state, size, static=(ln_w, ln_b))
    return o[:, :T].astype(v.dtype), state
