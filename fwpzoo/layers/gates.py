"""Gate parametrisations shared by the mixers: the write strength beta and the dt-style decay."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

BETA_RANGES: dict[str, float] = {"0,1": 1.0, "0,2": 2.0}


def beta_scale(beta_range: str) -> float:
    """The upper end of beta's range: "0,1" -> 1 (sigmoid), "0,2" -> 2 (2 * sigmoid)."""
    if beta_range not in BETA_RANGES:
        valid = ", ".join(repr(name) for name in BETA_RANGES)
        raise ValueError(f"unknown beta_range {beta_range!r}; valid beta ranges: {valid}")
    return BETA_RANGES[beta_range]


def _uniform(key, shape, low, high):
    return jax.random.uniform(key, shape, jnp.float32, low, high)


class Decay(nnx.Module):
    """Mamba-2's discretised decay: dt = softplus(raw + dt_bias), log_alpha = -exp(A_log) * dt.

    log_alpha is <= 0 by construction, so alpha = exp(log_alpha) stays in (0, 1]. Per head
    (shape (H,)) or per head and key (shape (H, K)). Initialised as in Mamba-2: A uniform in
    [1, 16], dt log-uniform in [0.001, 0.1], so alpha starts between about 0.2 and 0.999.
    """

    def __init__(self, shape: tuple[int, ...], *, rngs: nnx.Rngs):
        a_key, dt_key = jax.random.split(rngs.params())
        self.A_log = nnx.Param(jnp.log(_uniform(a_key, shape, 1.0, 16.0)))
        dt = jnp.exp(_uniform(dt_key, shape, math.log(0.001), math.log(0.1)))
        self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)))  # softplus^-1(dt)
        self.shape = shape

    def __call__(self, raw):
        """raw [..., *shape] (any dtype) -> (dt, log_alpha), both [..., *shape] float32."""
        dt = jax.nn.softplus(raw.astype(jnp.float32) + self.dt_bias[...])
        return dt, -jnp.exp(self.A_log[...]) * dt
