"""Gate parametrisations shared by the mixers: the write strength beta, the dt-style decay, and
the per-token and static gates the FWP layer builds from a cell's gate specs."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.cells import _spec
from fwpzoo.layers.norms import l2_normalize
from fwpzoo.layers.params import GateParam

# beta = top * sigmoid: "0,2" allows negative eigenvalues (delta rule); "0,0.1" bounds an inner
# optimiser's step (Titans and TTT bound their inner learning rate likewise)
BETA_RANGES: dict[str, float] = {"0,1": 1.0, "0,2": 2.0, "0,0.1": 0.1}
# model.gate_activation: the output gate's activation (fwp and attention)
GATE_ACTIVATIONS = {"silu": jax.nn.silu, "sigmoid": jax.nn.sigmoid}


def beta_scale(beta_range: str) -> float:
    """The upper end of beta's range: "0,1" -> 1 (sigmoid), "0,2" -> 2 (2 * sigmoid), "0,0.1" ->
    0.1 (0.1 * sigmoid)."""
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
    a_range, dt log-uniform in dt_range; Mamba-2's [1, 16] and [0.001, 0.1] start alpha between
    about 0.2 and 0.999.
    """

    def __init__(self, shape: tuple[int, ...], a_range, dt_range, *, rngs: nnx.Rngs):
        a_key, dt_key = jax.random.split(rngs.params())
        self.A_log = GateParam(jnp.log(_uniform(a_key, shape, *a_range)))
        dt = jnp.exp(_uniform(dt_key, shape, math.log(dt_range[0]), math.log(dt_range[1])))
        self.dt_bias = GateParam(dt + jnp.log(-jnp.expm1(-dt)))  # softplus^-1(dt)
        self.shape = shape

    def __call__(self, raw):
        """raw [..., *shape] (any dtype) -> (dt, log_alpha), both [..., *shape] float32."""
        dt = jax.nn.softplus(raw.astype(jnp.float32) + self.dt_bias[...])
        return dt, -jnp.exp(self.A_log[...]) * dt


def activate(kind: str, raw, beta_max: float | None = None):
    """The activation that keeps a gate in its range (fwpzoo.cells._spec.RANGES), float32."""
    raw = raw.astype(jnp.float32)
    if kind == _spec.BETA:
        return beta_max * jax.nn.sigmoid(raw)
    if kind == _spec.UNIT:
        return jax.nn.sigmoid(raw)
    if kind == _spec.LOG_DECAY:
        return jax.nn.log_sigmoid(raw)
    if kind == _spec.POSITIVE:
        return jax.nn.softplus(raw)
    if kind == _spec.NEGATIVE_UNIT:
        return jax.nn.sigmoid(raw) - 1.0  # increasing, like every other range
    if kind == _spec.DIRECTION:  # over the key axis, the last
        return l2_normalize(raw)
    return raw


class TokenGate(nnx.Module):
    """A per-token gate from the layer input: a projection to `shape` per token, then its
    range's activation; log decays take the Mamba-2 parametrisation (Decay)."""

    def __init__(self, gate, d_model: int, shape, beta_max, decay_init, bias=None, *, rngs, dtype):
        """decay_init: (A range, dt range) of a log decay's Decay; bias: None (no bias), or the
        start of a trained bias added before the activation (model.beta_init)."""
        self.proj = nnx.Linear(d_model, math.prod(shape), use_bias=False, dtype=dtype, rngs=rngs)
        self.bias = None if bias is None else GateParam(jnp.full(shape, bias, jnp.float32))
        is_decay = gate.range == _spec.LOG_DECAY
        self.decay = Decay(shape, *decay_init, rngs=rngs) if is_decay else None
        self.shape, self.range, self.beta_max = shape, gate.range, beta_max

    def __call__(self, x):
        """x [B, T, D] -> the gate [B, T, *shape] float32."""
        raw = self.proj(x).reshape(*x.shape[:2], *self.shape).astype(jnp.float32)
        if self.bias is not None:
            raw = raw + self.bias[...]
        return (
            self.decay(raw)[1]
            if self.decay is not None
            else activate(self.range, raw, self.beta_max)
        )


class StaticGate(nnx.Module):
    """A static gate (per head and key, no time axis): a trained parameter through its range's
    activation, starting at the activation of `start` (default 0: e.g. softplus(0) = log 2 for a
    positive one)."""

    def __init__(self, gate, shape, beta_max, start=None):
        start = gate.start if start is None else start  # the spec's start unless beta_init
        self.raw = GateParam(jnp.full(shape, start or 0.0, jnp.float32))
        self.range, self.beta_max = gate.range, beta_max

    def __call__(self):
        return activate(self.range, self.raw[...], self.beta_max)
