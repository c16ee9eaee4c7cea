"""Mixers whose programmer reads its own past: the Recurrent DeltaNet (`rdn`) and the modern
self-referential weight matrix (`srwm`), thin layers around
fwpzoo.cells.programmed.recurrent_delta and fwpzoo.cells.programmed.srwm.

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
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.cells.programmed import recurrent_delta, srwm
from fwpzoo.layers.base import (
    Description,
    FixedRandom,
    Mixer,
    MixerConfig,
    StateCache,
    mean_state_norm,
)
from fwpzoo.layers.feature_maps import (
    apply_feature_map,
    check_qk_norm,
    favor_projection,
    feature_dim,
    qk_normalize,
)
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


class ProgrammedMixer(Mixer):
    """The entry points shared by both (see fwpzoo.layers.base). A subclass defines _inputs(x)
    -> (per-token inputs dict [B, T, H, ...], slow weights dict), _cell (the module), zero_state
    and _summary(state) (a scalar). Both have one form, `recurrent` (the cell's `reversible`, or
    `checkpointed` with resets)."""

    HAS_FAST_WEIGHTS = True

    def init_cache(self, batch_size: int, max_len: int) -> StateCache:
        """Constant size whatever max_len: the fast state."""
        del max_len
        return StateCache(self.zero_state(batch_size))

    def inspect_step(self, x, cache, reset=None):
        """decode_step (one token x [B, D], reset [B] or None, through the cell's `step`), plus
        the token's gates: none, as these cells make their gates inside `step` from their own
        state."""
        inputs, slow = self._inputs(x[:, None])
        at_0 = {name: value[:, 0] for name, value in inputs.items()}
        state, o = self._cell.step(cache.state, **at_0, **slow, phi=self.phi, reset=reset)
        return self._output(o[:, None])[:, 0], StateCache(state), {}

    def fast_weights(self, cache):
        """The fast weight matrix [B, H, *, *] of a cache (for fwpzoo inspect)."""
        return cache.state["S"] if isinstance(cache.state, dict) else cache.state

    def _sequence(self, x, cache, reset):
        inputs, slow = self._inputs(x)
        state = None if cache is None else cache.state
        if reset is None:
            o, state = self._cell.reversible(**inputs, **slow, phi=self.phi, state=state)
        else:
            o, state = self._cell.checkpointed(
                **inputs, **slow, phi=self.phi, state=state, reset=reset, chunk_size=self.chunk
            )
        return self._output(o), StateCache(state), {"state_norm": self._summary(state)}

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


@dataclass(frozen=True, kw_only=True)
class RDNConfig(MixerConfig):
    """The fields the `rdn` layer reads (all shared); key_dim (before phi) and value_dim
    resolved."""

    MIXER: ClassVar[str] = "rdn"

    num_heads: int
    key_dim: int
    value_dim: int
    form: str
    chunk_size: int  # the backward's chunks where a batch has resets
    feature_map: str
    qk_norm: str
    dpfp_nu: int
    favor_features: int
    output_norm: bool

    def check(self):
        check_qk_norm(self.qk_norm, self.feature_map)

    def context_refusal(self, where):
        return self.sequential_refusal(where)  # the slow projections read each token's state

    @property
    def feature_dim(self) -> int:
        return feature_dim(
            self.feature_map, self.key_dim, nu=self.dpfp_nu, num_features=self.favor_features
        )

    def describe(self) -> Description:
        H, K, V = self.num_heads, self.feature_dim, self.value_dim
        return Description("rdn", "recurrent_delta", K, H, H * (K * V + V), form=self.form)


class RecurrentDeltaMixer(ProgrammedMixer):
    """The `rdn` layer of a model config `cfg` (its fields: RDNConfig)."""

    Config = RDNConfig

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim  # K before phi
        self.H, self.K, self.V, self.dtype, self.chunk = H, K, V, dtype, cfg.chunk_size
        self.features = cfg.feature_dim
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


@dataclass(frozen=True, kw_only=True)
class SRWMConfig(MixerConfig):
    """The fields the `srwm` layer reads (all shared). Its feature map must give a probability
    vector, so where the model's feature_map and qk_norm are the model config's defaults
    (identity, l2) it takes its own: softmax, none (the paper's)."""

    MIXER: ClassVar[str] = "srwm"
    DEFAULTS: ClassVar[dict] = {"feature_map": "softmax", "qk_norm": "none"}

    num_heads: int
    form: str
    chunk_size: int  # the backward's chunks where a batch has resets
    feature_map: str
    qk_norm: str
    output_norm: bool

    def check(self):
        if self.d_model % self.num_heads:
            raise ValueError(
                f"srwm needs d_model ({self.d_model}) divisible by num_heads ({self.num_heads})"
            )
        check_probability_map(self.feature_map, self.qk_norm)

    def context_refusal(self, where):
        return self.sequential_refusal(where)  # each token reads the weights it rewrites

    @property
    def head_dim(self) -> int:
        """D / H: each head's width in and out, and its feature dim."""
        return self.d_model // self.num_heads

    def describe(self) -> Description:
        H, D = self.num_heads, self.head_dim
        size = H * (3 * D + srwm.BETA_ROWS) * D  # W [H, 3 D + 4, D]
        return Description("srwm", "srwm", D, H, size, form=self.form)


class SRWMMixer(ProgrammedMixer):
    """The `srwm` layer of a model config `cfg` (its fields: SRWMConfig); head width
    d_model / num_heads in and out."""

    Config = SRWMConfig

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        H, D = cfg.num_heads, cfg.head_dim
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
