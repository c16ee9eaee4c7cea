"""Gated DeltaNet-2 and Comba reduce to the gated delta rule where their papers say they do.

The property suite (test_cells.py) checks their forms against their references; here the
references themselves meet the rules they generalise, exactly (float64, T = 5, eager).
"""

import jax
import jax.numpy as jnp
import numpy as np

from fwpzoo.cells import comba, gated_delta_rule, gdn2

B, T, H, K, V = 2, 5, 2, 4, 3


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def common(seed):
    r = np.random.default_rng(seed)
    return r, {
        "q": r.normal(size=(B, T, H, K)),
        "k": unit(r.normal(size=(B, T, H, K))),
        "v": r.normal(size=(B, T, H, V)),
        "state": r.normal(size=(B, H, K, V)),
    }


def test_gdn2_with_erase_equal_to_write_equal_to_beta_is_kda():
    r, inputs = common(0)
    beta = r.uniform(0.1, 1.9, size=(B, T, H))
    log_alpha = r.uniform(-1.0, 0.0, size=(B, T, H, K))
    with jax.enable_x64(True):
        x = jax.tree.map(jnp.asarray, inputs)
        erase = jnp.broadcast_to(beta[..., None], (B, T, H, K))
        write = jnp.broadcast_to(beta[..., None], (B, T, H, V))
        actual = gdn2.recurrent(**x, log_alpha=log_alpha, erase=erase, write=write)
        expected = gated_delta_rule.recurrent(**x, beta=beta, log_alpha=log_alpha)
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_comba_with_the_key_as_feedback_is_the_gated_delta_rule():
    r, inputs = common(1)
    beta = r.uniform(0.1, 1.9, size=(B, T, H))
    log_alpha = r.uniform(-1.0, 0.0, size=(B, T, H))
    with jax.enable_x64(True):
        x = jax.tree.map(jnp.asarray, inputs)
        actual = comba.recurrent(**x, beta=beta, log_alpha=log_alpha, p=x["k"])
        expected = gated_delta_rule.recurrent(**x, beta=beta, log_alpha=log_alpha)
        for a, e in zip(actual, expected, strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


def test_comba_feedback_key_changes_only_the_error_read():
    """One token from S: S' = alpha S, S_t = S' + beta k (v - S'^T p)^T, written out in NumPy."""
    r, inputs = common(2)
    beta = r.uniform(0.1, 1.9, size=(B, H))
    log_alpha = r.uniform(-1.0, 0.0, size=(B, H))
    p = r.normal(size=(B, H, K))
    q, k, v, S = (inputs[n] if n == "state" else inputs[n][:, 0] for n in ("q", "k", "v", "state"))
    with jax.enable_x64(True):
        new, o = comba.step(S, q, k, v, beta=beta, log_alpha=log_alpha, p=p)
    decayed = np.exp(log_alpha)[..., None, None] * S
    error = v - np.einsum("bhkv,bhk->bhv", decayed, p)
    expected = decayed + beta[..., None, None] * k[..., :, None] * error[..., None, :]
    np.testing.assert_allclose(new, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(o, np.einsum("bhkv,bhk->bhv", expected, q), rtol=1e-12)


def test_gdn2_step_is_its_transition_matrix():
    """One token as the matrix the paper writes: (I - k (erase * k)^T) Diag(alpha) S +
    k (write * v)^T."""
    r, inputs = common(3)
    log_alpha = r.uniform(-1.0, 0.0, size=(B, H, K))
    erase, write = r.uniform(size=(B, H, K)), r.uniform(size=(B, H, V))
    q, k, v, S = (inputs[n] if n == "state" else inputs[n][:, 0] for n in ("q", "k", "v", "state"))
    with jax.enable_x64(True):
        new, _ = gdn2.step(S, q, k, v, log_alpha=log_alpha, erase=erase, write=write)
    transition = np.eye(K) - k[..., :, None] * (erase * k)[..., None, :]  # [B, H, K, K]
    decayed = np.exp(log_alpha)[..., None] * S
    expected = transition @ decayed + k[..., :, None] * (write * v)[..., None, :]
    np.testing.assert_allclose(new, expected, rtol=1e-12, atol=1e-12)
