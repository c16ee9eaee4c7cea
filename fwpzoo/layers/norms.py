"""RMSNorm over the last axis, computed in float32 whatever the input dtype, and L2
normalisation."""

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.layers.params import ScaleParam


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis of size `dim`; returns the input's dtype.

    zero_centred: the scale is 1 + weight, the weight starting at 0 (Qwen3.5's norms), so weight
    decay pulls the scale towards 1 rather than 0; the stored weight is the released one as is.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, zero_centred: bool = False):
        start = jnp.zeros if zero_centred else jnp.ones
        self.weight = ScaleParam(start((dim,), jnp.float32))
        self.eps = eps
        self.zero_centred = zero_centred

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.weight[...] + 1.0 if self.zero_centred else self.weight[...]
        return (normed * scale).astype(x.dtype)


def l2_normalize(x, eps: float = 1e-6):
    """x / ||x|| over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)
