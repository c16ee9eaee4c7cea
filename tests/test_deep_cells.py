"""The deep fast-weight cells (fwpzoo/cells/deep) beyond the property suite of test_cells.py,
which runs them with one token per inner step: larger inner mini-batches (forms agree on
outputs, final state and gradients, with resets and a partial last mini-batch), and each inner
step against a float64 oracle built with jax.grad of the loss the module declares.

Shapes are tiny (B = H = 2, K = V = 4) and each compiled function serves several tests.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwpzoo.cells import delta_rule, momentum_delta
from fwpzoo.cells.deep import deep, ttt_linear

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


# The deep family (cells/deep/deep.py) ------------------------------------------------------


def deep_inputs(seed, dtype=jnp.float64, T=T, momentum=False):
    r = np.random.default_rng(seed)
    gate = lambda low, high: r.uniform(low, high, size=(B, T, H))  # noqa: E731
    arrays = {
        "q": r.normal(size=(B, T, H, K)) / 2,
        "k": unit(r.normal(size=(B, T, H, K))),
        "v": r.normal(size=(B, T, H, K)),
        "beta": gate(0.1, 0.9),
        "log_alpha": gate(-0.5, 0.0),
    }
    if momentum:
        arrays |= {"eta": gate(0.1, 0.5), "log_mu": gate(-1.0, 0.0)}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), arrays)


def assert_exact(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_deep_linear_sgd_one_token_is_the_delta_rule():
    with jax.enable_x64(True):
        x = deep_inputs(4)
        S = jnp.asarray(np.random.default_rng(5).normal(size=(B, H, K, K)))
        no_decay = jnp.zeros_like(x["log_alpha"])
        o, state = deep.recurrent(**x | {"log_alpha": no_decay}, state={"W": S})
        expected = delta_rule.recurrent(x["q"], x["k"], x["v"], state=S, beta=x["beta"])
        assert_exact((o, state["W"]), expected)


def test_deep_linear_momentum_one_token_is_the_momentum_delta_rule():
    with jax.enable_x64(True):
        x = deep_inputs(6, momentum=True)
        r = np.random.default_rng(7)
        S, M = (jnp.asarray(r.normal(size=(B, H, K, K))) for _ in range(2))
        o, state = deep.recurrent(**x, state={"W": S, "M_W": M}, optimizer="momentum")
        o_ref, ref = momentum_delta.recurrent(**x, state={"S": S, "M": M})
        assert_exact((o, state["W"], state["M_W"]), (o_ref, ref["S"], ref["M"]))


def test_deep_window_is_that_many_delta_gradients_at_the_same_weights():
    """window 3, sgd, one token: W' = alpha W - beta sum over the 3 latest tokens of
    k_j (W^T k_j - v_j)^T, all at W; the window reaches back into the state's keys and values."""
    with jax.enable_x64(True):
        x = deep_inputs(8, T=1)
        r = np.random.default_rng(9)
        W = r.normal(size=(B, H, K, K))
        past_k, past_v = unit(r.normal(size=(B, H, 2, K))), r.normal(size=(B, H, 2, K))
        state = {"W": W, "past_k": past_k, "past_v": past_v, "past_valid": np.ones((B, H, 2))}
        _, new = deep.recurrent(**x, state=state, window=3)
        ks = np.concatenate([past_k, np.asarray(x["k"])[:, 0, :, None]], axis=-2)  # [B, H, 3, K]
        vs = np.concatenate([past_v, np.asarray(x["v"])[:, 0, :, None]], axis=-2)
        gradient = np.swapaxes(ks, -1, -2) @ (ks @ W - vs)  # sum_j k_j (W^T k_j - v_j)^T
        beta, alpha = np.asarray(x["beta"])[:, 0], np.exp(np.asarray(x["log_alpha"])[:, 0])
        expected = alpha[..., None, None] * W - beta[..., None, None] * gradient
        np.testing.assert_allclose(new["W"], expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(new["past_k"], ks[..., 1:, :], rtol=0, atol=0)


def newton_schulz_reference(m):
    """Muon's Newton-Schulz orthogonalisation in float64 NumPy, one matrix [R, C]."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.T if m.shape[0] > m.shape[1] else m
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if m.shape[0] > m.shape[1] else x


def test_deep_muon_step_is_newton_schulz_of_the_momentum():
    """One token, linear net: M' = mu M + eta G, W' = alpha W - beta NS(M'), NS in NumPy."""
    with jax.enable_x64(True):
        x = deep_inputs(10, T=1, momentum=True)
        r = np.random.default_rng(11)
        W, M = r.normal(size=(B, H, K, K)), r.normal(size=(B, H, K, K))
        _, new = deep.recurrent(**x, state={"W": W, "M_W": M}, optimizer="muon")
        at = lambda n: np.asarray(x[n])[:, 0, :, None, None]  # noqa: E731  [B, H, 1, 1]
        k, v = np.asarray(x["k"])[:, 0, :, :, None], np.asarray(x["v"])[:, 0, :, None, :]
        gradient = k @ (np.swapaxes(k, -1, -2) @ W - v)  # k (W^T k - v)^T
        momentum = np.exp(at("log_mu")) * M + at("eta") * gradient
        ns = np.stack(
            [[newton_schulz_reference(momentum[b, h]) for h in range(H)] for b in range(B)]
        )
        expected = np.exp(at("log_alpha")) * W - at("beta") * ns
        np.testing.assert_allclose(new["M_W"], momentum, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(new["W"], expected, rtol=1e-10, atol=1e-10)
        # five iterations leave every singular value near 1 (within about 0.68 and 1.13)
        assert np.all(np.abs(np.linalg.svd(ns, compute_uv=False) - 0.9) < 0.3)


@functools.cache
def deep_vjp(form, options):
    fn = functools.partial(getattr(deep, form), **dict(options))
    chunk = {"chunk_size": 8} if form == "chunkwise" else {}

    def run(inputs, cotangent, reset):
        out, pullback = jax.vjp(lambda x: fn(**x, reset=reset, **chunk), inputs)
        return out, pullback(cotangent)[0]

    return jax.jit(run)


DEEP_CASES = [
    (
        ("fast_net", "mlp"),
        ("hidden", 6),
        ("optimizer", "momentum"),
        ("inner_batch", 4),
        ("window", 2),
    ),
    (
        ("fast_net", "swiglu"),
        ("hidden", 6),
        ("optimizer", "muon"),
        ("inner_batch", 2),
        ("window", 1),
    ),
    # the dual form (a linear net with sgd or momentum), the window reaching past a mini-batch
    (("fast_net", "linear"), ("optimizer", "sgd"), ("inner_batch", 4), ("window", 6)),
    (("fast_net", "linear"), ("optimizer", "momentum"), ("inner_batch", 4), ("window", 2)),
]


@pytest.mark.parametrize(
    "options",
    DEEP_CASES,
    ids=["mlp-momentum-b4-w2", "swiglu-muon-b2", "linear-sgd-b4-w6", "linear-momentum-b4-w2"],
)
def test_deep_parallel_mini_batch_gradients_equal_the_token_walk(options):
    """chunkwise (each mini-batch's gradients in one batched backward) against recurrent
    (every gradient in turn), with resets and a partial last mini-batch: outputs, final state
    (net, momentum, window) and every gradient."""
    with jax.enable_x64(True):  # Muon's Newton-Schulz amplifies float32 rounding
        x = deep_inputs(12, jnp.float64, momentum=True)
        state = deep.start_state(B, H, K, K, jnp.float64, **dict(options))
        r = np.random.default_rng(13)
        cotangent = (
            jnp.asarray(r.normal(size=(B, T, H, K))),
            jax.tree.map(lambda s: jnp.asarray(r.normal(size=s.shape)), state),
        )
        inputs = x | {"state": state}
        reset = jnp.asarray(RESET)
        expected = deep_vjp("recurrent", options)(inputs, cotangent, reset)
        actual = deep_vjp("chunkwise", options)(inputs, cotangent, reset)
        assert_trees_close(actual, expected, 1e-10)


def test_deep_refuses_bad_options():
    x = deep_inputs(14, jnp.float32)
    with pytest.raises(ValueError, match="inner_batch 3 must divide chunk_size 8"):
        deep.chunkwise(**x, inner_batch=3, chunk_size=8)
    with pytest.raises(ValueError, match="unknown fast_net 'conv'; valid: linear, mlp, swiglu"):
        deep.recurrent(**x, fast_net="conv")
    with pytest.raises(ValueError, match="takes the gates eta and log_mu"):
        deep.recurrent(**x, optimizer="momentum")


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"cell": "delta_rule", "fast_net": "mlp"},
            "model.fast_net='mlp' needs a cell that takes it, and cell 'delta_rule' does not; "
            "cells that take it: deep",
        ),
        (
            {"cell": "ttt_linear", "inner_optimizer": "muon"},
            "model.inner_optimizer='muon' needs a cell that takes it, and cell 'ttt_linear' "
            "does not; cells that take it: deep",
        ),
        (
            {"cell": "deep", "inner_batch": 3, "chunk_size": 8},
            "model.inner_batch=3 must divide model.chunk_size=8 (a chunk holds whole inner "
            "mini-batches); valid inner_batch: 1, 2, 4, 8",
        ),
        (
            {"cell": "deep", "fast_net": "conv"},
            "unknown model.fast_net 'conv'; valid choices: linear, mlp, swiglu",
        ),
        ({"cell": "deep", "inner_window": 0}, "model.inner_window must be >= 1, got 0"),
    ],
)
def test_deep_model_fields_are_checked_with_one_line_naming_field_and_values(fields, message):
    from fwpzoo.models.config import ModelConfig

    with pytest.raises(ValueError) as error:
        ModelConfig(**fields)
    assert str(error.value) == message


CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize(
    "config, override, line",
    [
        (
            "ttt_linear.yaml",
            "model.inner_batch=3",
            "model.inner_batch=3 must divide model.chunk_size=16 (a chunk holds whole inner "
            "mini-batches); valid inner_batch: 1, 2, 4, 8, 16",
        ),
        (
            "atlas.yaml",
            "model.inner_window=65",
            "model.inner_window=65 is longer than data.seq_len=64; valid inner_window: 1..64",
        ),
        (
            "ttt_linear.yaml",
            "model.fast_net=mlp",
            "model.fast_net='mlp' needs a cell that takes it, and cell 'ttt_linear' does not; "
            "cells that take it: deep",
        ),
    ],
    ids=["batch-not-dividing-chunk", "window-over-sequence", "net-the-cell-cannot-take"],
)
def test_train_refuses_bad_inner_fields_in_one_line(config, override, line, refused, tmp_path):
    """Through the CLI's config validation (nothing is built or run): exit 2, the one line."""
    refused(["train", str(CONFIGS / config), override, "--workdir", str(tmp_path)], line)
    assert not any(tmp_path.iterdir())  # nothing written


def test_decoding_refuses_an_inner_mini_batch():
    """fwpzoo sample runs `step`, one token per inner step: a model trained with inner_batch > 1
    is refused in one line (train/sample.py turns it into exit 2) instead of decoding another
    model."""
    from fwpzoo.layers.fwp import check_decodable
    from fwpzoo.models.config import ModelConfig

    check_decodable(ModelConfig(cell="deep", inner_batch=1))
    with pytest.raises(
        ValueError, match=r"model.mixers\[0\] \(ttt_linear\) has model.inner_batch=4"
    ):
        check_decodable(ModelConfig(cell="ttt_linear", inner_batch=4, chunk_size=16))
