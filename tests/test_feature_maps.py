import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwpzoo.layers.feature_maps import (
    FEATURE_MAPS,
    apply_feature_map,
    favor_projection,
    feature_dim,
)

DIM = 6
NUM_FEATURES = 10


def _inputs(shape=(2, 3, 4, DIM), seed=0):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("name", list(FEATURE_MAPS))
@pytest.mark.parametrize("nu", [1, 3])
def test_output_shape_matches_feature_dim(name, nu):
    x = _inputs()
    projection = favor_projection(jax.random.key(1), DIM, NUM_FEATURES)
    phi = apply_feature_map(name, x, nu=nu, projection=projection)
    expected = feature_dim(name, DIM, nu=nu, num_features=NUM_FEATURES)
    assert phi.shape == (*x.shape[:-1], expected)
    assert bool(jnp.all(jnp.isfinite(phi)))


def test_feature_dims():
    assert feature_dim("elu1", 16) == 16
    assert feature_dim("dpfp", 16, nu=3) == 96
    assert feature_dim("favor", 16, num_features=32) == 64


def test_dpfp_matches_hand_computed_case():
    x = jnp.array([1.0, -2.0, 3.0])
    # x' = [relu(x), relu(-x)] = [1, 0, 3, 0, 2, 0]
    # roll by 1: [0, 1, 0, 3, 0, 2] -> product [0, 0, 0, 0, 0, 0]
    # roll by 2: [2, 0, 1, 0, 3, 0] -> product [2, 0, 3, 0, 6, 0]
    expected_nu1 = np.zeros(6)
    expected_nu2 = np.array([0, 0, 0, 0, 0, 0, 2, 0, 3, 0, 6, 0], dtype=float)
    np.testing.assert_array_equal(apply_feature_map("dpfp", x, nu=1), expected_nu1)
    np.testing.assert_array_equal(apply_feature_map("dpfp", x, nu=2), expected_nu2)
    # a vector with no zero entries: nu=1 pairs each rectified entry with its left neighbour
    y = jnp.array([1.0, 2.0])  # x' = [1, 2, 0, 0], roll 1 = [0, 1, 2, 0]
    np.testing.assert_array_equal(apply_feature_map("dpfp", y), [0.0, 2.0, 0.0, 0.0])


def test_simple_maps_match_their_formulas():
    x = jnp.array([-1.5, 0.0, 2.0])
    np.testing.assert_allclose(apply_feature_map("identity", x), x)
    np.testing.assert_allclose(apply_feature_map("elu1", x), [np.exp(-1.5), 1.0, 3.0], rtol=1e-6)
    np.testing.assert_allclose(apply_feature_map("relu", x), [0.0, 0.0, 2.0])
    silu = np.array(x) / (1 + np.exp(-np.array(x)))
    np.testing.assert_allclose(apply_feature_map("silu", x), silu, rtol=1e-6)
    soft = np.exp(np.array(x)) / np.exp(np.array(x)).sum()
    np.testing.assert_allclose(apply_feature_map("softmax", x), soft, rtol=1e-6)


@pytest.mark.parametrize(("name", "scale"), [("elu1", 6.0), ("softmax", 6.0), ("favor", 1.0)])
def test_strictly_positive_maps(name, scale):
    x = scale * _inputs()
    projection = favor_projection(jax.random.key(2), DIM, NUM_FEATURES)
    phi = apply_feature_map(name, x, projection=projection)
    assert bool(jnp.all(phi > 0))


@pytest.mark.parametrize("name", ["relu", "dpfp"])
def test_non_negative_maps(name):
    phi = apply_feature_map(name, _inputs(), nu=2)
    assert bool(jnp.all(phi >= 0))
    assert bool(jnp.any(phi > 0))


def test_favor_projection_rows_orthogonal_within_blocks():
    w = favor_projection(jax.random.key(3), 8, 20)  # blocks of 8, 8, 4 rows
    assert w.shape == (20, 8)
    for block in (w[:8], w[8:16], w[16:]):
        unit = block / jnp.linalg.norm(block, axis=-1, keepdims=True)
        gram = unit @ unit.T
        np.testing.assert_allclose(gram, np.eye(len(block)), atol=1e-5)


def test_favor_approximates_softmax_kernel():
    dim, num_features = 8, 8192
    q = 0.3 * jax.random.normal(jax.random.key(4), (16, dim))
    k = 0.3 * jax.random.normal(jax.random.key(5), (16, dim))
    projection = favor_projection(jax.random.key(6), dim, num_features)
    estimate = (
        apply_feature_map("favor", q, projection=projection)
        @ apply_feature_map("favor", k, projection=projection).T
    )
    relative_error = jnp.abs(estimate / jnp.exp(q @ k.T) - 1)  # [16, 16]
    # exp of Gaussian projections is heavy tailed: bound the typical error tightly, the worst loose
    assert float(relative_error.mean()) < 0.02
    assert float(relative_error.max()) < 0.2


def test_favor_is_unbiased_over_projections():
    dim, num_features, draws = 4, 16, 2000
    q = jnp.array([0.5, -0.3, 0.2, 0.1])
    k = jnp.array([0.4, 0.1, -0.6, 0.3])
    keys = jax.random.split(jax.random.key(7), draws)

    def estimate(key):
        w = favor_projection(key, dim, num_features)
        return apply_feature_map("favor", q, projection=w) @ apply_feature_map(
            "favor", k, projection=w
        )

    mean = jnp.mean(jax.vmap(estimate)(keys))
    np.testing.assert_allclose(mean, jnp.exp(q @ k), rtol=0.01)


def test_favor_does_not_overflow_for_large_inputs():
    w = favor_projection(jax.random.key(8), DIM, NUM_FEATURES)
    phi = apply_feature_map("favor", 30.0 * _inputs(), projection=w)
    assert bool(jnp.all(jnp.isfinite(phi)))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown feature map 'gelu'.*elu1.*dpfp.*favor"):
        apply_feature_map("gelu", jnp.ones(3))
    with pytest.raises(ValueError, match="valid feature maps"):
        feature_dim("nope", 3)


def test_favor_input_errors():
    with pytest.raises(ValueError, match="needs a projection"):
        apply_feature_map("favor", jnp.ones(3))
    with pytest.raises(ValueError, match="projection must be"):
        apply_feature_map("favor", jnp.ones(3), projection=jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="num_features"):
        feature_dim("favor", 3)
    with pytest.raises(ValueError, match="nu >= 1"):
        apply_feature_map("dpfp", jnp.ones(3), nu=0)


def test_elu1_equals_elu_plus_one_with_finite_gradients():
    x = jnp.linspace(-5.0, 5.0, 41)
    np.testing.assert_allclose(apply_feature_map("elu1", x), jax.nn.elu(x) + 1, rtol=1e-5)
    # far below -17 the literal elu(x) + 1 rounds to exactly 0; the map stays positive
    assert float(jax.nn.elu(-30.0) + 1) == 0.0
    np.testing.assert_allclose(
        apply_feature_map("elu1", jnp.array(-30.0)), np.exp(-30.0), rtol=1e-5
    )
    grad = jax.grad(lambda x: apply_feature_map("elu1", x).sum())(jnp.array([-200.0, 0.5, 200.0]))
    np.testing.assert_allclose(grad, [0.0, 1.0, 1.0])
