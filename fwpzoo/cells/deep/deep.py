"""Deep fast weights: a fast net (linear, MLP or SwiGLU) trained at test time by a named inner
optimiser (sgd, momentum, Muon) on a reconstruction loss over a window of tokens, one inner step
per token with the gradients of a mini-batch taken at its start weights. TTT-MLP, Titans, ATLAS
and LaCT are its presets (configs/); inner.py defines the nets and the optimisers.

For a mini-batch of `inner_batch` tokens entering with parameters theta_0, token t's loss is the
window of `window` tokens ending at t (ATLAS's Omega rule; window 1 is the token alone),

    l_t(theta) = sum_{j = t - window + 1}^{t} 1/2 ||f_theta(k_j) - v_j||^2,

its gradient G_t = dl_t/dtheta at theta_0, and the optimiser steps once per token with G_t and
the token's gates (inner.py), so token t reads o_t = f_{theta_t}(q_t) after its own step. With
inner_batch 1 every gradient is at the weights the previous token left: a linear net with sgd,
window 1 and no decay is the delta rule (beta the step), with momentum the momentum delta rule.
A larger inner_batch is TTT's mini-batch and LaCT's large chunk: its gradients do not depend on
each other, so `chunkwise` computes them in parallel (one batched backward through the fast
net per mini-batch) and only the cheap optimiser steps and reads run token by token, where
`recurrent` takes every gradient in turn; for a linear net with sgd or momentum it runs the
dual form instead (no per-token weights: the reads are causal attention over the window's keys
with the errors at the start weights as values). deep.md derives both. A window reaches into
earlier mini-batches (the state keeps the last window - 1 keys and values) but not across a
reset.

The start state (state=None, and what a reset restores) is zero except an MLP's or SwiGLU's
first layer, W1 (and W3) = the identity tiled over the F hidden units: a zero net whose first
steps give every parameter a gradient (from all zeros an MLP's W1 and W2 would never move).

q, k [B, T, H, K]; v [B, T, H, V]; beta, log_alpha, and with momentum eta, log_mu [B, T, H];
state: {name: [B, H, ...]} (Inner.state_shapes) float32; o [B, T, H, V] in v's dtype. The static
arguments fast_net, hidden, optimizer, inner_batch and window are the model fields OPTIONS names.
"""

import dataclasses

import jax
import jax.numpy as jnp

from fwpzoo.cells._reference import state_dtype, upcast
from fwpzoo.cells._spec import (
    BETA,
    INNER,
    LOG_DECAY,
    NOT_AFFINE,
    UNIT,
    Gate,
    Objective,
    State,
    gate_names,
)
from fwpzoo.cells.chunked.remat import scan_chunks
from fwpzoo.cells.deep import inner as nets
from fwpzoo.cells.deep._batches import from_units, layout, pad_time, padded_length, scan_units

MOMENTUM_GATES = ("eta", "log_mu")  # taken by the momentum and muon optimisers only
GATE_SPECS = (
    Gate("beta", range=BETA),
    Gate("log_alpha", range=LOG_DECAY),
    Gate("eta", range=UNIT, optional=True),
    Gate("log_mu", range=LOG_DECAY, optional=True),
)
GATES = gate_names(GATE_SPECS)


def window_loss(params, k, v, weight):
    """The declared loss of one head and token: sum over its window of 1/2 ||f(k_j) - v_j||^2
    for a linear net W [K, V] (inner.token_losses for every net); k [c, K], v [c, V], weight
    [c] (0: a window slot before the sequence or across a reset)."""
    return nets.token_losses("linear", params, k, v, weight)


OBJECTIVE = Objective(
    update="theta_t = opt(theta_{t-1}, G_t), G_t = dl_t/dtheta at the mini-batch's start, "
    "o_t = f_{theta_t}(q_t)",
    loss="sum over the window of 1/2 ||f_theta(k_j) - v_j||^2 (fast net f: linear, mlp, swiglu)",
    step=INNER,
    loss_fn=window_loss,
    lr="beta",
    decay="log_alpha",
    momentum="log_mu",
    momentum_lr="eta",
    state=State((("W", "K V"),), is_dict=True, transition=NOT_AFFINE),
    weights="W",
    paper=(
        "Sun et al. 2024 (TTT-MLP); Behrouz et al. 2024 (Titans); Behrouz et al. 2025 (ATLAS); "
        "Zhang et al. 2025 (LaCT)"
    ),
)
# Static arguments of the forms and the model fields that set them (the FWP layer reads this).
OPTIONS = {
    "fast_net": "fast_net",
    "hidden": "fast_hidden",
    "optimizer": "inner_optimizer",
    "inner_batch": "inner_batch",
    "window": "inner_window",
}


def gate_specs(**options):
    """The gates a layer makes for these options: eta and log_mu only with momentum."""
    momentum = nets.Inner(**options).has_momentum
    return tuple(g for g in GATE_SPECS if momentum or g.name not in MOMENTUM_GATES)


def _by_row(g, x):
    """A per-head factor g [B, H] against x [B, H, ...]."""
    return g.reshape(g.shape + (1,) * (x.ndim - g.ndim)) * x


def start_state(B, H, K, V, dtype=jnp.float32, **options):
    """The state before any token (see the module docstring): {name: [B, H, ...]}."""
    inner = nets.Inner(**options)
    state = {n: jnp.zeros((B, H, *s), dtype) for n, s in inner.state_shapes(K, V).items()}
    for name in ("W1", "W3"):
        if name in state:
            F = state[name].shape[-1]
            tiled = jnp.tile(jnp.eye(K, dtype=dtype), (1, -(-F // K)))[:, :F]  # [K, F]
            state[name] = jnp.broadcast_to(tiled, state[name].shape)
    return state


def _params(inner, state):
    return {n: state[n] for n in inner.shapes(1, 1)}


def _momentum(inner, state):
    return {n: state["M_" + n] for n in inner.shapes(1, 1)} if inner.has_momentum else None


def _optimise(inner, params, momentum, grads, gates):
    """One optimiser step (inner.py) with one token's gates [B, H] -> (params, momentum)."""
    alpha = jnp.exp(gates["log_alpha"])
    if not inner.has_momentum:
        new = {n: _by_row(alpha, p) - _by_row(gates["beta"], grads[n]) for n, p in params.items()}
        return new, None
    mu = jnp.exp(gates["log_mu"])
    momentum = {n: _by_row(mu, m) + _by_row(gates["eta"], grads[n]) for n, m in momentum.items()}
    step = nets.direction(inner.optimizer, momentum)
    new = {n: _by_row(alpha, p) - _by_row(gates["beta"], step[n]) for n, p in params.items()}
    return new, momentum


def _merge(inner, state, params, momentum):
    out = dict(state) | params
    if momentum is not None:
        out |= {"M_" + n: m for n, m in momentum.items()}
    return out


def _where_rows(rows, x, y):
    """x in the batch rows where rows [B] is True, y elsewhere."""
    return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), x, y)


def _restart(inner, state, reset_rows, start):
    """state with the rows where reset_rows [B] is True replaced by the start state."""
    return {name: _where_rows(reset_rows, start[name], x) for name, x in state.items()}


def _options(inner):
    return dataclasses.asdict(inner)


def _window(inner, state, k, v, valid):
    """The token's window: past keys and values of the state then the token's own ->
    k [B, H, c, K], v [B, H, c, V], weight [B, H, c]."""
    own_k, own_v = k[..., None, :], v[..., None, :]
    own_w = jnp.broadcast_to(valid[:, None], k.shape[:2])[..., None].astype(k.dtype)
    if inner.window == 1:
        return own_k, own_v, own_w
    cat = lambda a, b: jnp.concatenate([a, b], axis=-2)  # noqa: E731
    weight = jnp.concatenate([state["past_valid"], own_w], axis=-1)
    return cat(state["past_k"], own_k), cat(state["past_v"], own_v), weight


def _remember(inner, state, window, valid):
    """The state's window buffer after a token (a padded token leaves it as it was)."""
    if inner.window == 1:
        return state
    k, v, weight = window
    keep = valid.reshape(valid.shape[0], 1, 1, 1)  # [B, 1, 1, 1]
    past = {"past_k": k[..., 1:, :], "past_v": v[..., 1:, :], "past_valid": weight[..., 1:]}
    return state | {
        n: jnp.where(keep if x.ndim == 4 else keep[..., 0], x, state[n]) for n, x in past.items()
    }


def _gradient(inner, params, k, v, weight):
    """dl/dtheta of the window loss for every row: params [B, H, ...], k [B, H, c, K]."""
    return jax.grad(lambda p: nets.token_losses(inner.fast_net, p, k, v, weight))(params)


def _token(inner, state, start_params, x, grads=None):
    """One token of a mini-batch: (state, start_params) -> (state, start_params, o [B, H, V]).
    x: q, k, v [B, H, K | V], the gates [B, H], valid, reset, first [B] bool (first: the
    token starts a mini-batch). grads: the token's gradient if computed ahead (chunkwise)."""
    start = start_state(
        *x["v"].shape[:2], x["k"].shape[-1], x["v"].shape[-1], x["v"].dtype, **_options(inner)
    )
    state = _restart(inner, state, x["reset"], start)
    params = _params(inner, state)
    begin = x["first"] | x["reset"]  # [B]: the start weights move here
    start_params = {n: _where_rows(begin, p, start_params[n]) for n, p in params.items()}
    window = _window(inner, state, x["k"], x["v"], x["valid"])
    if grads is None:
        grads = _gradient(inner, start_params, *window)
    params, momentum = _optimise(inner, params, _momentum(inner, state), grads, x)
    state = _remember(inner, _merge(inner, state, params, momentum), window, x["valid"])
    o = nets.apply(inner.fast_net, params, x["q"][..., None, :])[..., 0, :]
    return state, start_params, o


def _gates(beta, log_alpha, eta, log_mu, inner):
    """The gates the optimiser takes {name: [B, T, H]}; eta and log_mu only with momentum."""
    gates = {"beta": beta, "log_alpha": log_alpha}
    if inner.has_momentum:
        if eta is None or log_mu is None:
            raise ValueError(f"optimizer {inner.optimizer!r} takes the gates eta and log_mu")
        gates |= {"eta": eta, "log_mu": log_mu}
    return gates


def _initial(inner, state, q, v):
    B, _, H, K = q.shape
    dtype = state_dtype(q, v, state)
    if state is None:
        return start_state(B, H, K, v.shape[-1], dtype, **_options(inner))
    return {name: state[name].astype(dtype) for name in inner.state_shapes(K, v.shape[-1])}


def _tokens(x):
    """A unit's inputs [B, H, U, ...] (valid, reset [B, 1, U]) token-major: q, k, v
    [U, B, H, K | V], gates [U, B, H], valid, reset, first [U, B]."""
    out = {}
    for name, a in x.items():
        if name in ("valid", "reset"):
            out[name] = jnp.moveaxis(a[:, 0], -1, 0)  # [U, B]
        elif name in ("q", "k", "v") or name.startswith("g_"):
            out[name] = jnp.moveaxis(a, 2, 0)  # [U, B, H, ...]
        else:
            out[name] = jnp.moveaxis(a, -1, 0)  # [U, B, H]
    U, B = out["valid"].shape
    out["first"] = jnp.broadcast_to((jnp.arange(U) == 0)[:, None], (U, B))
    return out


def _run(inner, q, k, v, state, reset, gates, unit_fn):
    """The mini-batch scan shared by the forms: unit_fn(state, unit inputs) -> (state, o
    [B, H, U, V])."""
    state = _initial(inner, state, q, v)
    dtype = jax.tree.leaves(state)[0].dtype
    per_token = {"q": q, "k": k, "v": v} | gates
    xs = layout(inner.inner_batch, jax.tree.map(lambda a: a.astype(dtype), per_token), reset)
    state, o = scan_units(unit_fn, state, xs)
    return from_units(o)[:, : q.shape[1]].astype(v.dtype), state


def _walk(inner, state, tokens):
    """The tokens of one mini-batch in turn (token-major, as _tokens gives them)."""

    def body(carry, x):
        state, start_params = carry
        grads = {n[2:]: g for n, g in x.items() if n.startswith("g_")} or None
        state, start_params, o = _token(inner, state, start_params, x, grads)
        return (state, start_params), o

    (state, _), o = jax.lax.scan(body, (state, _params(inner, state)), tokens)
    return state, jnp.moveaxis(o, 0, -2)  # o [B, H, U, V]


def recurrent(
    q, k, v, *, state=None, reset=None, beta, log_alpha, eta=None, log_mu=None, **options
):
    """Mini-batch after mini-batch, every token's gradient taken in turn."""
    inner = nets.Inner(**options)
    gates = _gates(beta, log_alpha, eta, log_mu, inner)
    return _run(inner, q, k, v, state, reset, gates, lambda s, x: _walk(inner, s, _tokens(x)))


def _parallel_gradients(inner, state, x):
    """Every token's gradient G_t [B, H, U, ...] of one mini-batch at once: each token's own
    loss gradient at the start weights of its segment (one batched backward), summed over the
    window by a banded [U, c - 1 + U] matrix."""
    B, H, U, K = x["k"].shape
    V = x["v"].shape[-1]
    c = inner.window
    index = jnp.cumsum(x["reset"][:, 0], axis=-1)  # [B, U]: segment of each token
    first = index == 0  # [B, U]: the tokens the entering weights reach
    start = _params(inner, start_state(B, H, K, V, x["v"].dtype, **_options(inner)))
    params = _params(inner, state)
    past = c - 1
    ext_first = jnp.concatenate([jnp.ones((B, past), bool), first], axis=-1)  # [B, P + U]
    per_token = {  # [B, H, P + U, ...]: each token's start weights
        n: jnp.where(
            ext_first.reshape(B, 1, -1, *(1,) * (p.ndim - 2)), p[:, :, None], start[n][:, :, None]
        )
        for n, p in params.items()
    }
    ks, vs = x["k"], x["v"]
    if past:
        ks = jnp.concatenate([state["past_k"], ks], axis=-2)  # [B, H, P + U, K]
        vs = jnp.concatenate([state["past_v"], vs], axis=-2)

    def total(p):  # every token's loss at its own start weights: [B, H, P + U, 1, K] reads
        error = nets.apply(inner.fast_net, p, ks[..., None, :])[..., 0, :] - vs
        return 0.5 * jnp.sum(jnp.square(error))

    g = jax.grad(total)(per_token)  # [B, H, P + U, ...]: token j's gradient
    # window[t, j]: token t's window holds extended token j (t <= j - P + ... <= t + P)
    t, j = jnp.arange(U)[:, None], jnp.arange(past + U)[None, :]
    band = (j >= t) & (j <= t + past)  # [U, P + U]
    ext_index = jnp.concatenate([jnp.zeros((B, past), index.dtype), index], axis=-1)
    ext_valid = x["valid"][:, 0]  # [B, P + U]: window slots that hold a token
    if past:
        ext_valid = jnp.concatenate([state["past_valid"][:, 0] > 0, ext_valid], axis=-1)
    same = index[:, :, None] == ext_index[:, None, :]  # [B, U, P + U]
    weights = (band & same & ext_valid[:, None, :]).astype(x["v"].dtype)
    return {n: jnp.einsum("btj,bhj...->bht...", weights, gj) for n, gj in g.items()}


def has_dual_form(inner) -> bool:
    """A linear fast net with sgd or momentum: every step is linear in the gradients, so a
    mini-batch runs in the dual form (_linear_dual). Muon's Newton-Schulz is not linear."""
    return inner.fast_net == "linear" and inner.optimizer != "muon"


def _decays(log_gate, scale, same):
    """The [U, U] kernel of a gated sum inside a mini-batch: out[t, s] = prod_{s < r <= t}
    exp(log_gate_r) * scale_s for s <= t in t's segment, else 0; and exp of the gate's sum up to
    each token [..., U]. log_gate, scale [B, H, U]; same [B, 1, U, U] (same segment)."""
    cum = jnp.cumsum(log_gate, axis=-1)  # [B, H, U]
    U = cum.shape[-1]
    mask = same & jnp.tril(jnp.ones((U, U), bool))
    # -inf, not 0, outside the mask: exp of a positive cum_t - cum_s (s > t) could overflow
    log_kernel = jnp.where(mask, cum[..., :, None] - cum[..., None, :], -jnp.inf)
    return jnp.exp(log_kernel) * scale[..., None, :], jnp.exp(cum)


def _linear_dual(inner, state, x):
    """One mini-batch of a linear fast net with sgd or momentum in the dual form (deep.md):
    (state, x) -> (state, o [B, H, U, V]); x as _chunk splits it ([B, H, U, ...], gates
    [B, H, U], valid, reset [B, 1, U]). With G_s = sum_j w_sj k_j e_j^T, e_j = k_j W_0 - v_j
    the window's errors at the start weights, every W_t is W_0, M_0 and the e_j in fixed
    proportions, so the reads are causal attention over the window's keys and no per-token
    weights or gradients are formed:

        sgd       W_t = a_t W_0 - sum_s A[t, s] G_s,  A[t, s] = alpha_{s+1..t} beta_s,
                  a_t = alpha_{1..t}
        momentum  M_t = m_t M_0 + sum_s Mu[t, s] G_s,  Mu[t, s] = mu_{s+1..t} eta_s,
                  m_t = mu_{1..t};  W_t = a_t W_0 - (A m)_t M_0 - sum_s (A Mu)[t, s] G_s

    A reset at token r starts a segment: its tokens' start weights and momentum are zeros (a
    linear net's start state) and the kernels do not cross it."""
    q, k, v = x["q"], x["k"], x["v"]  # [B, H, U, K | V]
    U, P = q.shape[-2], inner.window - 1
    index = jnp.cumsum(x["reset"], axis=-1)  # [B, 1, U]: segment of each token
    own_weight = jnp.broadcast_to(x["valid"], index.shape).astype(v.dtype)  # [B, 1, U]
    ks, vs, ext_index, ext_weight = k, v, index, own_weight
    if P:  # the window's past tokens (segment 0) before the mini-batch's own
        cat = lambda a, b: jnp.concatenate([a, b], axis=-2)  # noqa: E731
        ks, vs = cat(state["past_k"], k), cat(state["past_v"], v)  # [B, H, P + U, K | V]
        ext_index = jnp.concatenate([jnp.zeros((*index.shape[:2], P), index.dtype), index], -1)
        own = jnp.broadcast_to(own_weight, state["past_valid"].shape[:2] + (U,))
        ext_weight = jnp.concatenate([state["past_valid"], own], axis=-1)  # [B, H, P + U]
    W = state["W"]  # [B, H, K, V]
    first_ext = (ext_index == 0)[..., None]  # [B, 1, P + U, 1]: at the entering weights
    e = jnp.where(first_ext, ks @ W, 0.0) - vs  # [B, H, P + U, V]: errors at the start weights
    t, j = jnp.arange(U)[:, None], jnp.arange(P + U)[None, :]
    band = (j >= t) & (j <= t + P)  # [U, P + U]: token t's window holds extended token j
    window = jnp.where(
        band & (index[..., :, None] == ext_index[..., None, :]), ext_weight[..., None, :], 0.0
    )  # [B, H | 1, U, P + U]: w_tj
    same = index[..., :, None] == index[..., None, :]  # [B, 1, U, U]
    first = (index == 0).astype(v.dtype)  # [B, 1, U]: the tokens the entering state reaches
    A, a = _decays(x["log_alpha"], x["beta"], same)  # [B, H, U, U], [B, H, U]
    a = a * first
    coefficients = A  # [B, H, U, U]: of G_s in W_t
    start = a[..., None] * (q @ W)  # [B, H, U, V]: the entering weights' part of the reads
    W_end = a[..., -1, None, None] * W
    if inner.has_momentum:
        Mu, m = _decays(x["log_mu"], x["eta"], same)
        m = m * first
        M = state["M_W"]
        am = jnp.einsum("bhts,bhs->bht", A, m)  # [B, H, U]: of M_0 in W_t
        coefficients = A @ Mu
        start = start - am[..., None] * (q @ M)
        W_end = W_end - am[..., -1, None, None] * M
        weights = (Mu @ window)[..., -1, :, None]  # [B, H, P + U, 1]: of k_j e_j^T in M_U
        M_end = m[..., -1, None, None] * M + ks.mT @ (weights * e)
    R = coefficients @ window  # [B, H, U, P + U]: of k_j e_j^T in W_t
    o = start - (R * (q @ ks.mT)) @ e  # [B, H, U, V]
    W_end = W_end - ks.mT @ (R[..., -1, :, None] * e)
    new = {"W": W_end}
    if inner.has_momentum:
        new["M_W"] = M_end
    if P:
        new |= _last_window(ks, vs, ext_weight, ext_index, x["valid"], P)
    return state | new, o


def _last_window(ks, vs, ext_weight, ext_index, valid, P):
    """The window buffer a mini-batch leaves: the last P of the extended tokens up to the last
    valid one (padding leaves it as it was), those before the last segment zeroed (a reset
    empties it). ks, vs [B, H, P + U, K | V], ext_weight [B, H, P + U], ext_index [B, 1, P + U],
    valid [B, 1, U]."""
    keep = (ext_index == ext_index[..., -1:]).astype(ks.dtype)  # [B, 1, P + U]
    end = P + jnp.sum(valid[:, 0], axis=-1)  # [B]: one past the last valid extended token
    at = end[:, None, None] - P + jnp.arange(P)  # [B, 1, P]: the slots kept
    return {
        "past_k": jnp.take_along_axis(ks * keep[..., None], at[..., None], axis=2),
        "past_v": jnp.take_along_axis(vs * keep[..., None], at[..., None], axis=2),
        "past_valid": jnp.take_along_axis(ext_weight * keep, at, axis=2),
    }


def _chunk(inner, names):
    """scan_chunks' chunk function: the chunk's mini-batches in turn, each in the dual form
    (has_dual_form) or with its gradients in parallel and its steps in turn. Inputs
    [B, H, C, ...] (valid, reset [B, 1, C]) in the order of `names`."""

    def unit(state, x):
        if has_dual_form(inner):
            return _linear_dual(inner, state, x)
        grads = _parallel_gradients(inner, state, x)
        return _walk(inner, state, _tokens(x | {"g_" + n: g for n, g in grads.items()}))

    def run(state, *chunk):
        C, n = chunk[0].shape[2], inner.inner_batch

        def split(a):  # [B, H | 1, C, ...] -> [C / n, B, H | 1, n, ...]
            return jnp.moveaxis(a.reshape(*a.shape[:2], C // n, n, *a.shape[3:]), 2, 0)

        xs = {name: split(a) for name, a in zip(names, chunk, strict=True)}
        state, o = jax.lax.scan(unit, state, xs)
        return state, jnp.moveaxis(o, 0, 2).reshape(*o.shape[1:3], C, o.shape[-1])

    return run


def chunkwise(
    q,
    k,
    v,
    *,
    state=None,
    chunk_size=64,
    reset=None,
    beta,
    log_alpha,
    eta=None,
    log_mu=None,
    **options,
):
    """Chunks of chunk_size tokens, a whole number of mini-batches each; every mini-batch's
    gradients in parallel, then its optimiser steps and reads in turn. The chunk loop keeps
    only the state entering each chunk for the backward (scan_chunks)."""
    inner = nets.Inner(**options)
    if chunk_size % inner.inner_batch:
        raise ValueError(
            f"inner_batch {inner.inner_batch} must divide chunk_size {chunk_size}: a chunk "
            "holds whole mini-batches"
        )
    gates = _gates(beta, log_alpha, eta, log_mu, inner)
    state = _initial(inner, state, q, v)
    B, T = q.shape[:2]
    size = min(chunk_size, padded_length(T, inner.inner_batch))
    T_padded = padded_length(T, size)
    valid = jnp.broadcast_to((jnp.arange(T_padded) < T)[None, :, None], (B, T_padded, 1))
    resets = jnp.zeros((B, T, 1), bool) if reset is None else reset[:, :, None]
    per_token = {"q": q, "k": k, "v": v} | gates  # zero-padded: a zero token is an identity
    names = (*per_token, "valid", "reset")
    inputs = (
        *(pad_time(a, T_padded) for a in per_token.values()),
        valid,
        pad_time(resets, T_padded),
    )
    o, state = scan_chunks(_chunk(inner, names), inputs, state, size)
    return o[:, :T].astype(v.dtype), state


def step(state, q, k, v, *, reset=None, beta, log_alpha, eta=None, log_mu=None, **options):
    """One token, one inner step at the weights the previous token left (inner_batch 1): q, k
    [B, H, K], v [B, H, V], gates [B, H]."""
    inner = nets.Inner(**options)
    if inner.inner_batch != 1:
        raise ValueError(
            f"step takes one token per inner step, and inner_batch is {inner.inner_batch}"
        )
    gates = _gates(beta, log_alpha, eta, log_mu, inner)
    q, k, v, *values = upcast(q, k, v, *gates.values())
    B = q.shape[0]
    state = _initial(inner, state, q[:, None], v[:, None])
    no = jnp.zeros((B,), bool)
    rows = no if reset is None else reset
    x = {"q": q, "k": k, "v": v, "valid": ~no, "reset": rows, "first": ~no}
    x |= dict(zip(gates, values, strict=True))
    state, _, o = _token(inner, state, _params(inner, state), x)
    return state, o
