"""Feature maps phi applied to queries and keys before a fast-weight cell: pure JAX, no parameters.

Every map acts on the last axis of x [..., K] and returns [..., feature_dim(name, K, ...)].

    identity  phi(x) = x
    elu1      phi(x) = elu(x) + 1                                  (Katharopoulos et al. 2020)
    relu      phi(x) = max(x, 0)
    silu      phi(x) = x sigmoid(x)
    softmax   phi(x) = softmax(x) over the feature axis
    dpfp      x' = [relu(x), relu(-x)]                              [..., 2K]
              phi(x) = concat_{j=1..nu} x' * roll(x', j)            [..., 2K nu]
              (deterministic parameter-free projection, Schlag, Irie & Schmidhuber 2021)
    favor     FAVOR+ positive random features (Choromanski et al. 2021) with a fixed projection
              W [M, K] whose rows w_i are the random directions:
              phi(x) = exp([W x, -W x] - ||x||^2 / 2 - log(2M) / 2)   [..., 2M]
              so that E_w[phi(q) . phi(k)] = exp(q . k) for w_i ~ N(0, I_K).

FAVOR+ stabiliser: the Gaussian factor exp(-||x||^2 / 2) and exp(+-w.x) are never formed apart (one
would underflow while the other overflows for large x); they meet inside a single exponent, which
is bounded above by ||w_i||^2 / 2 (complete the square), so phi cannot overflow and the estimator
stays exactly unbiased (no per-vector max is subtracted: that would rescale each key's write by a
data-dependent factor, and a max over the sequence would leak the future into causal models). The
price is underflow, not overflow: once ||x||^2 / 2 nears float32's exp range (~87) entries become 0,
which is the regime where exp(q . k) itself leaves float32. Any scaling of q and k (e.g. K^-1/4
each for softmax attention's K^-1/2) belongs to the layer.

Positivity: elu1, softmax and favor (within the range above) are strictly positive; relu and dpfp
are non-negative.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fwpzoo.layers.norms import l2_normalize

QK_NORMS: tuple[str, ...] = ("none", "sum", "l2")  # the normalisation after phi (model.qk_norm)
# sum-normalisation divides by sum(phi); only maps with phi >= 0 keep that sum away from zero
NON_NEGATIVE_MAPS: tuple[str, ...] = ("elu1", "relu", "dpfp", "favor", "softmax")
EPS = 1e-6


def identity(x):
    return x


def elu1(x):
    # elu(x) + 1 written as exp(x) for x <= 0: the literal sum cancels to exactly 0 below x ~ -17
    # in float32, while exp keeps the promised strict positivity; minimum keeps the unused
    # branch's gradient finite.
    return jnp.where(x > 0, x + 1.0, jnp.exp(jnp.minimum(x, 0.0)))


def relu(x):
    return jax.nn.relu(x)


def silu(x):
    return jax.nn.silu(x)


def softmax(x):
    return jax.nn.softmax(x, axis=-1)


def dpfp(x, *, nu=1):
    """DPFP-nu: x [..., K] -> [..., 2 K nu]; products of the rectified input with its own rolls."""
    if nu < 1:
        raise ValueError(f"dpfp needs nu >= 1, got {nu}")
    rectified = jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)  # [..., 2K]
    rolled = [rectified * jnp.roll(rectified, j, axis=-1) for j in range(1, nu + 1)]
    return jnp.concatenate(rolled, axis=-1)  # [..., 2K nu]


def favor(x, *, projection):
    """FAVOR+: x [..., K], projection W [M, K] -> [..., 2M] (formula in the module docstring)."""
    if projection is None:
        raise ValueError("feature map 'favor' needs a projection [num_features, dim]")
    if projection.ndim != 2 or projection.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"favor projection must be [num_features, {x.shape[-1]}], got {projection.shape}"
        )
    num_features = projection.shape[0]
    wx = jnp.einsum("...k,mk->...m", x, projection)  # [..., M]
    half_sq_norm = 0.5 * jnp.sum(jnp.square(x), axis=-1, keepdims=True)  # [..., 1]
    exponent = jnp.concatenate([wx, -wx], axis=-1) - half_sq_norm  # [..., 2M]
    return jnp.exp(exponent - 0.5 * jnp.log(2.0 * num_features))


def favor_projection(key, dim, num_features):
    """Orthogonal random features W [num_features, dim]: rows orthogonal within each block of dim
    rows, each row rescaled to the norm of an independent N(0, I_dim) draw, so every row is
    marginally N(0, I_dim) (the unbiasedness FAVOR+ needs) with less variance than i.i.d. rows."""
    num_blocks = -(-num_features // dim)
    block_key, norm_key = jax.random.split(key)
    gaussian = jax.random.normal(block_key, (num_blocks, dim, dim))  # [N, K, K]
    orthogonal, _ = jnp.linalg.qr(gaussian)  # [N, K, K], orthonormal columns
    rows = jnp.swapaxes(orthogonal, -1, -2).reshape(num_blocks * dim, dim)[:num_features]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim)), axis=-1)
    return rows * norms[:, None]  # [M, K]


FEATURE_MAPS: dict[str, Callable] = {
    "identity": identity,
    "elu1": elu1,
    "relu": relu,
    "silu": silu,
    "dpfp": dpfp,
    "favor": favor,
    "softmax": softmax,
}


def get(name: str) -> Callable:
    """The feature map called `name`; a ValueError listing the valid names otherwise."""
    if name not in FEATURE_MAPS:
        raise ValueError(
            f"unknown feature map {name!r}; valid feature maps: {', '.join(FEATURE_MAPS)}"
        )
    return FEATURE_MAPS[name]


def apply_feature_map(name, x, *, nu=1, projection=None):
    """phi(x) over the last axis; nu is used by dpfp, projection [M, K] by favor."""
    params = {"dpfp": {"nu": nu}, "favor": {"projection": projection}}.get(name, {})
    return get(name)(x, **params)


def feature_dim(name, dim, *, nu=1, num_features=None):
    """The size of phi's output for inputs of size `dim`."""
    get(name)
    if name == "dpfp":
        return 2 * dim * nu
    if name == "favor":
        if num_features is None:
            raise ValueError("feature map 'favor' needs num_features")
        return 2 * num_features
    return dim


def qk_normalize(x, kind: str):
    """none, sum (x / sum x) or l2 (x / ||x||) over the last axis, in float32."""
    if kind == "none":
        return x
    if kind == "sum":
        return x / (jnp.sum(x, axis=-1, keepdims=True) + EPS)
    if kind == "l2":
        return l2_normalize(x, EPS)
    raise ValueError(f"unknown qk_norm {kind!r}; valid qk norms: {', '.join(QK_NORMS)}")


def check_qk_norm(kind: str, feature_map: str):
    """ValueError for an unknown qk norm, or sum-normalisation of a map that can be negative."""
    if kind not in QK_NORMS:
        raise ValueError(f"unknown qk_norm {kind!r}; valid qk norms: {', '.join(QK_NORMS)}")
    if kind == "sum" and feature_map not in NON_NEGATIVE_MAPS:
        raise ValueError(
            f"qk_norm 'sum' needs a non-negative feature map ({', '.join(NON_NEGATIVE_MAPS)}), "
            f"got {feature_map!r}"
        )
