"""RMSNorm over the last axis, computed in float32 whatever the input dtype, and L2
normalisation."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """x / rms(x) * weight over the last axis of size `dim`; returns the input's dtype."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * self.weight[...]).astype(x.dtype)


def l2_normalize(x, eps: float = 1e-6):
    """x / ||x|| over the last axis."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)
