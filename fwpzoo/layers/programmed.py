"""Mixers whose programmer reads its own past: the Recurrent DeltaNet (`rdn`) and the modern
self-referential weight matrix (`srwm`), thin layers around fwpzoo.cells.programmed.recurrent_delta
and fwpzoo.cells.programmed.srwm.

    rdn   x [B, T, D] -> W x = [q, k, v, beta] per head -> the cell (R tanh(y_{t-1}) added inside
          the scan, phi = model.feature_map then model.qk_norm) -> optional per-head RMSNorm
          -> output projection [B, T, D]
    srwm  x [B, T, D] -> heads x [B, T, H, D / H] -> the cell (W_0 [H, 3 D / H + 4, D / H]
          learned) -> optional per-head RMSNorm -> output projection [B, T, D]

Training runs the cell's `reversible` form (its backward undoes the rank-one writes instead of
storing every state); a batch with resets runs `checkpointed`, since a reset destroys the state
it replaces and cannot be undone (both are exact; measured in
fwpzoo/cells/programmed/recurrent_fwp.md).
Decoding calls the cell's `step`. Neither takes a query scale: phi's normalisation is the scale.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.cells.programmed import recurrent_delta, srwm
from fwpzoo.layers.feature_maps import apply_feature_map, favor_projection, feature_dim
from fwpzoo.layers.fwp import FixedRandom, check_qk_norm, mean_state_norm, qk_normalize
from fwpzoo.layers.norms import RMSNorm

NON_NEGATIVE = ("elu1", "relu", "softmax")  # same-size maps whose sum normalisation is a simplex


def check_probability_map(feature_map: str, qk_norm: str) -> None:
    """srwm's phi must give a probability vector of its input's size: softmax (qk_norm none or
    sum), or elu1 / relu with qk_norm sum."""
    if (feature_map == "softmax" and qk_norm in ("none", "sum")) or (
        feature_map in NON_NEGATIVE and qk_norm == "sum"
    ):
        return
    raise ValueError(
        f"srwm needs a probability feature map: model.feature_map=softmax (model.qk_norm none or "
        f"sum) or elu1/relu with model.qk_norm=sum; got feature_map={feature_map!r}, "
        f"qk_norm={qk_norm!r}"
    )


class ProgrammedMixer(nnx.Module):
    """The entry points shared by both (see fwpzoo.layers). A subclass defines _inputs(x) ->
    (per-token inputs dict [B, T, H, ...], slow weights dict), _cell (the module), zero_state
    and _summary(state) (a scalar)."""

    def __call__(self, x, *, reset=None, return_intermediates: bool = False):
        """x [B, T, D], reset [B, T] bool -> y [B, T, D] (and {"state_norm"} when asked)."""
        y, state = self._sequence(x, None, reset)
        stats = {"state_norm": self._summary(state)}
        return (y, stats) if return_intermediates else y

    def init_cache(self, batch_size: int, max_len: int):
        """Constant size whatever max_len: the fast state."""
        del max_len
        return self.zero_state(batch_size)

    def prefill(self, x, cache, reset=None):
        """x [B, T, D] from the cache (reset [B, T] bool or None) -> (y [B, T, D], cache)."""
        return self._sequence(x, cache, reset)

    def decode_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] or None) through the cell's `step` -> (y [B, D], cache)."""
        inputs, slow = self._inputs(x[:, None])
        at_0 = {name: value[:, 0] for name, value in inputs.items()}
        state, o = self._cell.step(cache, **at_0, **slow, phi=self.phi, reset=reset)
        return self._output(o[:, None])[:, 0], state

    def fast_weights(self, cache):
        """The fast weight matrix [B, H, *, *] of a cache (for fwpzoo inspect)."""
        return cache["S"] if isinstance(cache, dict) else cache

    def inspect_step(self, x, cache, reset=None):
        """decode_step, plus the token's gates: none, as these cells make their gates inside
        `step` from their own state."""
        y, cache = self.decode_step(x, cache, reset)
        return y, cache, {}

    def _sequence(self, x, state, reset):
        inputs, slow = self._inputs(x)
        if reset is None:
            o, state = self._cell.reversible(**inputs, **slow, phi=self.phi, state=state)
        else:
            o, state = self._cell.checkpointed(
                **inputs, **slow, phi=self.phi, state=state, reset=reset, chunk_size=self.chunk
            )
        return self._output(o), state

    def _output(self, o):
        """o [B, T, H, V] -> [B, T, D]."""
        B, T, H, V = o.shape
        o = o.astype(self.dtype)
        if self.out_norm is not None:
            o = self.out_norm(o)
        return self.out_proj(o.reshape(B, T, H * V))


def make_phi(feature_map, qk_norm, nu, projection):
    def phi(x):
        features = apply_feature_map(feature_map, x, nu=nu, projection=projection)
        return qk_normalize(features, qk_norm)

    return phi


class RecurrentDeltaMixer(ProgrammedMixer):
    """The `rdn` layer of a model config `cfg` (heads, key/value dims, feature map, qk norm,
    output norm, chunk_size for the backward with resets)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        check_qk_norm(cfg.qk_norm, cfg.feature_map)
        H = cfg.num_heads
        K = cfg.key_dim or cfg.d_model // H  # before phi
        V = cfg.value_dim or cfg.d_model // H
        self.H, self.K, self.V, self.dtype, self.chunk = H, K, V, dtype, cfg.chunk_size
        self.features = feature_dim(
            cfg.feature_map, K, nu=cfg.dpfp_nu, num_features=cfg.favor_features
        )
        self.projection = (
            FixedRandom(favor_projection(rngs.params(), K, cfg.favor_features))
            if cfg.feature_map == "favor"
            else None
        )
        self.feature_map, self.qk_norm, self.nu = cfg.feature_map, cfg.qk_norm, cfg.dpfp_nu
        width = 2 * K + V + 1  # [q | k | v | beta] per head
        self.in_proj = nnx.Linear(cfg.d_model, H * width, use_bias=False, dtype=dtype, rngs=rngs)
        # R as in the paper's code: N(0, 1 / V) entries
        self.R = nnx.Param(jax.random.normal(rngs.params(), (H, V, width)) / math.sqrt(V))
        self.out_norm = RMSNorm(V) if cfg.output_norm else None
        self.out_proj = nnx.Linear(H * V, cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)

    _cell = recurrent_delta

    @property
    def phi(self):
        projection = None if self.projection is None else self.projection[...]
        return make_phi(self.feature_map, self.qk_norm, self.nu, projection)

    def zero_state(self, batch_size):
        return {
            "S": jnp.zeros((batch_size, self.H, self.features, self.V), jnp.float32),
            "y": jnp.zeros((batch_size, self.H, self.V), jnp.float32),
        }

    def _summary(self, state):
        return mean_state_norm(state["S"])

    def _inputs(self, x):
        B, T, _ = x.shape
        K, V = self.K, self.V
        projected = self.in_proj(x).reshape(B, T, self.H, 2 * K + V + 1)  # [B, T, H, 2K + V + 1]
        q, k, v, beta = jnp.split(projected, [K, 2 * K, 2 * K + V], axis=-1)
        inputs = {"q": q, "k": k, "v": v, "beta": beta[..., 0].astype(jnp.float32)}
        return inputs, {"R": self.R[...]}


class SRWMMixer(ProgrammedMixer):
    """The `srwm` layer of a model config `cfg` (heads, a probability feature map, output norm,
    chunk_size for the backward with resets); head width d_model / num_heads in and out."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        check_probability_map(cfg.feature_map, cfg.qk_norm)
        H = cfg.num_heads
        if cfg.d_model % H:
            raise ValueError(f"srwm needs d_model ({cfg.d_model}) divisible by num_heads ({H})")
        D = cfg.d_model // H
        self.H, self.D, self.dtype, self.chunk = H, D, dtype, cfg.chunk_size
        self.feature_map, self.qk_norm = cfg.feature_map, cfg.qk_norm
        self.W0 = nnx.Param(initial_matrix(rngs.params(), H, D))
        self.out_norm = RMSNorm(D) if cfg.output_norm else None
        self.out_proj = nnx.Linear(H * D, cfg.d_model, use_bias=False, dtype=dtype, rngs=rngs)

    _cell = srwm

    @property
    def phi(self):
        return make_phi(self.feature_map, self.qk_norm, 1, None)

    def zero_state(self, batch_size):
        return jnp.broadcast_to(self.W0[...], (batch_size, *self.W0.shape))

    def _summary(self, state):
        return mean_state_norm(state)

    def _inputs(self, x):
        B, T, _ = x.shape
        return {"x": x.reshape(B, T, self.H, self.D)}, {"W0": self.W0[...]}


BETA_INIT = -1.0  # the mean of W_0's learning-rate entries (the paper's code)


def initial_matrix(key, H, D):
    """W_0 [H, 3D + 4, D] as in the paper's code (IDSIA/fwp-formal-lang, SRWMlayer): N(0, 1/D)
    rows for y and k, 100x smaller for q (queries start near uniform), N(-1, 1/D) entries for the
    learning rates (its beta_init=-1). Measured on parity and (aa)* (docs/results/
    formal_languages.md, notes): with the learning-rate rows centred on 0 instead, two of four
    runs recognised the longer strings within 1000 steps; centred on -1, six of eight did."""
    std = 1.0 / math.sqrt(D)
    scales = jnp.concatenate([jnp.full(2 * D, std), jnp.full(D, 0.01 * std), jnp.full(4, std)])
    means = jnp.concatenate([jnp.zeros(3 * D), jnp.full(srwm.BETA_ROWS, BETA_INIT)])
    noise = jax.random.normal(key, (H, 3 * D + srwm.BETA_ROWS, D))
    return noise * scales[:, None] + means[:, None]
