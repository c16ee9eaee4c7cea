"""The deep fast-weight cells (fwpzoo/cells/deep) beyond the property suite of test_cells.py,
which runs them with one token per inner step: larger inner mini-batches (forms agree on
outputs, final state and gradients, with resets and a partial last mini-batch), and each inner
step against a float64 oracle built with jax.grad of the loss the module declares.

Shapes are tiny (B = H = 2, K = V = 4) and each compiled function serves several tests.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwpzoo.cells.deep import ttt_linear

B, H, K = 2, 2, 4
T = 13  # three mini-batches of 4 and a partial one
MINI_BATCH = 4
RESET = np.zeros((B, T), bool)
RESET[0, [5, 8]] = True  # inside a mini-batch, and at the start of one
RESET[1, 0] = True


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def ttt_inputs(seed, dtype=jnp.float32, T=T):
    r = np.random.default_rng(seed)
    arrays = {
        "q": r.normal(size=(B, T, H, K)) / 2,
        "k": unit(r.normal(size=(B, T, H, K))),
        "v": r.normal(size=(B, T, H, K)),
        "eta": r.uniform(0.05, 0.5, size=(B, T, H)),
        "ln_w": r.uniform(0.5, 1.5, size=(H, K)),
        "ln_b": 0.1 * r.normal(size=(H, K)),
        "state": {"W": 0.5 * r.normal(size=(B, H, K, K)), "b": 0.5 * r.normal(size=(B, H, K))},
    }
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), arrays)


@functools.cache
def ttt_vjp(form, mini_batch, chunk_size=8):
    """(inputs, cotangents, reset) -> ((o, state), gradients w.r.t. every input), compiled."""
    fn = getattr(ttt_linear, form)
    options = {"chunk_size": chunk_size} if form == "chunkwise" else {}

    def run(inputs, cotangent, reset):
        def f(x):
            return fn(**x, reset=reset, mini_batch=mini_batch, **options)

        out, pullback = jax.vjp(f, inputs)
        return out, pullback(cotangent)[0]

    return jax.jit(run)


def assert_trees_close(actual, expected, rtol):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        scale = max(np.sqrt(np.mean(e**2)), 1e-30)
        assert np.sqrt(np.mean((a - e) ** 2)) / scale <= rtol


@pytest.mark.parametrize("reset", [None, RESET], ids=["no_reset", "resets"])
def test_ttt_linear_dual_form_equals_the_token_walk(reset):
    """chunkwise (two mini-batches of 4 per chunk of 8, dual form) against recurrent (tokens one
    by one inside each mini-batch) on outputs, final state and every gradient."""
    inputs = ttt_inputs(0)
    r = np.random.default_rng(1)
    cotangent = (
        jnp.asarray(r.normal(size=(B, T, H, K)), jnp.float32),
        {"W": jnp.asarray(r.normal(size=(B, H, K, K))), "b": jnp.asarray(r.normal(size=(B, H, K)))},
    )
    reset = None if reset is None else jnp.asarray(reset)
    expected = ttt_vjp("recurrent", MINI_BATCH)(inputs, cotangent, reset)
    actual = ttt_vjp("chunkwise", MINI_BATCH)(inputs, cotangent, reset)
    assert_trees_close(actual, expected, 1e-5)


def oracle(inputs, mini_batch):
    """TTT-Linear from its declared loss alone (float64): for each mini-batch, every token's
    gradient by jax.grad of OBJECTIVE.loss_fn at the start weights, token t's weights the start
    minus eta_t times the sum up to t, o_t = y_t + LN(y_t). No resets."""
    loss = ttt_linear.OBJECTIVE.loss_fn
    grad = jax.grad(loss)
    q, k, v, eta = (np.asarray(inputs[n]) for n in ("q", "k", "v", "eta"))
    ln_w, ln_b = np.asarray(inputs["ln_w"]), np.asarray(inputs["ln_b"])
    outputs = np.zeros_like(v)
    W_end = np.asarray(inputs["state"]["W"]).copy()
    b_end = np.asarray(inputs["state"]["b"]).copy()
    for b in range(B):
        for h in range(H):
            params = {"W": W_end[b, h], "b": b_end[b, h]}
            for start in range(0, q.shape[1], mini_batch):
                total = {"W": 0.0, "b": 0.0}
                for t in range(start, min(start + mini_batch, q.shape[1])):
                    g = grad(params, k[b, t, h], v[b, t, h], ln_w[h], ln_b[h])
                    total = {n: total[n] + g[n] for n in total}
                    now = {n: params[n] - eta[b, t, h] * total[n] for n in params}
                    y = q[b, t, h] @ now["W"] + now["b"]
                    centred = y - y.mean()
                    normed = centred / np.sqrt(np.mean(centred**2) + 1e-6)
                    outputs[b, t, h] = y + ln_w[h] * normed + ln_b[h]
                params = now
            W_end[b, h], b_end[b, h] = params["W"], params["b"]
    return outputs, {"W": W_end, "b": b_end}


@pytest.mark.parametrize("mini_batch", [1, MINI_BATCH])
def test_ttt_linear_is_mini_batch_gradient_descent_on_its_declared_loss(mini_batch):
    with jax.enable_x64(True):
        inputs = ttt_inputs(2, jnp.float64)
        expected = oracle(inputs, mini_batch)
        for form in ("recurrent", "chunkwise"):
            options = {"chunk_size": 8} if form == "chunkwise" else {}
            fn = getattr(ttt_linear, form)
            actual = fn(**inputs, mini_batch=mini_batch, **options)
            for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
                np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)


def test_ttt_linear_refuses_a_mini_batch_that_does_not_divide_the_chunk():
    inputs = ttt_inputs(3)
    with pytest.raises(ValueError, match="mini_batch 3 must divide chunk_size 8"):
        ttt_linear.chunkwise(**inputs, mini_batch=3, chunk_size=8)
