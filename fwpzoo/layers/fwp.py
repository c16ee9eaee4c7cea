"""The fast weight programmer mixer: a layer around any cell family and any of its forms.

    x [B, T, D] -> q, k, v and the family's gates -> optional short causal conv on q, k, v
    -> feature map phi and q/k normalisation -> q * scale -> cell form (state [B, H, K, V])
    -> optional per-head RMSNorm and SiLU output gate -> output projection [B, T, D]

K below is the key feature dim (phi's output size). The form (recurrent, chunkwise, associative)
is a config value and is used as given; decoding calls the cell's `step`.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo import cells
from fwpzoo.layers.conv import ShortConv
from fwpzoo.layers.feature_maps import apply_feature_map, favor_projection, feature_dim
from fwpzoo.layers.gates import Decay, beta_scale
from fwpzoo.layers.norms import RMSNorm

QK_NORMS: tuple[str, ...] = ("none", "sum", "l2")
# sum-normalisation divides by sum(phi); only maps with phi >= 0 keep that sum away from zero
NON_NEGATIVE_MAPS: tuple[str, ...] = ("elu1", "relu", "dpfp", "favor", "softmax")
PER_KEY_DECAY: tuple[str, ...] = ("gated_linear_attn",)  # GLA; the others decay per head
EPS = 1e-6


class FixedRandom(nnx.Variable):
    """A random constant drawn at init (FAVOR+ projection): saved with the model, never trained."""


def form_fn(cell: str, form: str):
    """The function of `form` in the family `cell`; a ValueError naming what is wrong otherwise."""
    module = cells.get(cell)
    if form not in cells.FORMS:
        raise ValueError(f"unknown form {form!r}; valid forms: {', '.join(cells.FORMS)}")
    if not hasattr(module, form):
        raise ValueError(f"cell {cell!r} has no {form!r} form")
    return getattr(module, form)


def run_form(cell: str, form: str, chunk_size: int, q, k, v, state, gates):
    """The cell's `form` over a whole sequence -> (o [B, T, H, V], state [B, H, K, V])."""
    options = {"chunk_size": chunk_size} if form == "chunkwise" else {}
    return form_fn(cell, form)(q, k, v, state=state, **options, **gates)


def qk_normalize(x, kind: str):
    """none, sum (x / sum x) or l2 (x / ||x||) over the last axis, in float32."""
    if kind == "none":
        return x
    if kind == "sum":
        return x / (jnp.sum(x, axis=-1, keepdims=True) + EPS)
    if kind == "l2":
        return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + EPS)
    raise ValueError(f"unknown qk_norm {kind!r}; valid qk norms: {', '.join(QK_NORMS)}")


def check_qk_norm(kind: str, feature_map: str):
    if kind not in QK_NORMS:
        raise ValueError(f"unknown qk_norm {kind!r}; valid qk norms: {', '.join(QK_NORMS)}")
    if kind == "sum" and feature_map not in NON_NEGATIVE_MAPS:
        raise ValueError(
            f"qk_norm 'sum' needs a non-negative feature map ({', '.join(NON_NEGATIVE_MAPS)}), "
            f"got {feature_map!r}"
        )


def mean_state_norm(state):
    """Mean over batch and heads of the Frobenius norm of S [B, H, K, V]."""
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(state), axis=(-2, -1))))


class CellMixer(nnx.Module):
    """The entry points shared by the mixers built on a cell (this one and Mamba-2).

    A subclass sets H, K, V and conv (a ShortConv or None) and defines decode_step and
    _sequence(x, state, buffer) -> (y [B, T, D], cache, stats), which runs the configured form
    from the fast weights `state` [B, H, K, V] and the conv `buffer`.
    """

    def __call__(self, x, *, return_intermediates: bool = False):
        """x [B, T, D] -> y [B, T, D] (and a dict of scalar intermediates when asked)."""
        y, _, stats = self._sequence(x, state=None, buffer=None)
        return (y, stats) if return_intermediates else y

    def init_cache(self, batch_size: int, max_len: int):
        """Constant size whatever max_len: the fast weights and the conv buffer."""
        del max_len
        cache = {"state": jnp.zeros((batch_size, self.H, self.K, self.V), jnp.float32)}
        if self.conv is not None:
            cache["conv"] = self.conv.init_buffer(batch_size)
        return cache

    def prefill(self, x, cache):
        """The configured form over x [B, T, D], starting from and returning the cache."""
        y, cache, _ = self._sequence(x, cache["state"], cache.get("conv"))
        return y, cache


class FWPMixer(CellMixer):
    """The FWP layer of a model config `cfg` (fields: see fwpzoo.models.config.ModelConfig)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        module = cells.get(cfg.cell)
        form_fn(cfg.cell, cfg.form)
        check_qk_norm(cfg.qk_norm, cfg.feature_map)
        H = cfg.num_heads
        head_dim = cfg.key_dim or cfg.d_model // H  # before the feature map
        V = cfg.value_dim or cfg.d_model // H
        K = feature_dim(cfg.feature_map, head_dim, nu=cfg.dpfp_nu, num_features=cfg.favor_features)
        N = cfg.num_householder if cfg.cell == "delta_product" else 1  # writes per token
        self.cell, self.form, self.chunk_size = cfg.cell, cfg.form, cfg.chunk_size
        self.feature_map, self.dpfp_nu, self.qk_norm = cfg.feature_map, cfg.dpfp_nu, cfg.qk_norm
        self.H, self.head_dim, self.K, self.V, self.N = H, head_dim, K, V, N
        self.scale = cfg.qk_scale if cfg.qk_scale is not None else K**-0.5
        self.dtype = dtype
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731

        self.qkv_width = H * head_dim * (1 + N) + H * N * V
        self.qkv_proj = linear(cfg.d_model, self.qkv_width)
        self.conv = (
            ShortConv(self.qkv_width, cfg.conv_size, rngs=rngs, dtype=dtype)
            if cfg.conv_size > 0
            else None
        )
        self.projection = (
            FixedRandom(favor_projection(rngs.params(), head_dim, cfg.favor_features))
            if cfg.feature_map == "favor"
            else None
        )
        self.beta_max = beta_scale(cfg.beta_range) if "beta" in module.GATES else None
        self.beta_proj = linear(cfg.d_model, H * N) if self.beta_max is not None else None
        decays = "log_alpha" in module.GATES and (cfg.cell != "delta_product" or cfg.product_decay)
        decay_shape = (H, K) if cfg.cell in PER_KEY_DECAY else (H,)
        self.decay_proj = linear(cfg.d_model, math.prod(decay_shape)) if decays else None
        self.decay = Decay(decay_shape, rngs=rngs) if decays else None
        self.out_norm = RMSNorm(V) if cfg.output_norm else None
        self.gate_proj = linear(cfg.d_model, H * V) if cfg.output_gate else None
        self.out_proj = linear(H * V, cfg.d_model)

    # the entry points: see fwpzoo.layers; the full forward and prefill come from CellMixer

    def decode_step(self, x, cache):
        """One token x [B, D] through the cell's `step` -> (y [B, D], cache)."""
        q, k, v, gates, buffer = self._inputs(x[:, None], cache.get("conv"))
        at_0 = lambda a: a[:, 0]  # noqa: E731  drop the time axis of length 1
        step = cells.get(self.cell).step
        state, o = step(cache["state"], at_0(q), at_0(k), at_0(v), **jax.tree.map(at_0, gates))
        y = self._output(o[:, None], x[:, None])[:, 0]
        return y, self._cache(state, buffer)

    # the pieces ------------------------------------------------------------------------------

    def _sequence(self, x, state, buffer):
        q, k, v, gates, buffer = self._inputs(x, buffer)
        o, state = run_form(self.cell, self.form, self.chunk_size, q, k, v, state, gates)
        stats = {"state_norm": mean_state_norm(state)}
        if "beta" in gates:
            stats["beta_mean"] = jnp.mean(gates["beta"])
        if "log_alpha" in gates:
            stats["alpha_mean"] = jnp.mean(jnp.exp(gates["log_alpha"]))
        return self._output(o, x), self._cache(state, buffer), stats

    def _cache(self, state, buffer):
        return {"state": state} if buffer is None else {"state": state, "conv": buffer}

    def _inputs(self, x, buffer):
        """x [B, T, D] -> q [B, T, H, K], k, v (with an N axis for delta_product), gates."""
        B, T, _ = x.shape
        H, N, head_dim, V = self.H, self.N, self.head_dim, self.V
        qkv = self.qkv_proj(x)  # [B, T, H (1 + N) head_dim + H N V]
        if self.conv is not None:
            qkv, buffer = self.conv(qkv, buffer)
        q, k, v = jnp.split(qkv, [H * head_dim, H * head_dim * (1 + N)], axis=-1)
        q = self._features(q.reshape(B, T, H, head_dim)) * self.scale  # [B, T, H, K]
        k = self._features(k.reshape(B, T, H, N, head_dim))  # [B, T, H, N, K]
        v = v.reshape(B, T, H, N, V)  # [B, T, H, N, V]
        gates = {}
        if self.beta_proj is not None:
            beta = self.beta_max * jax.nn.sigmoid(self.beta_proj(x).astype(jnp.float32))
            gates["beta"] = beta.reshape(B, T, H, N)  # [B, T, H, N]
        if self.decay is not None:
            raw = self.decay_proj(x).reshape(B, T, *self.decay.shape)  # [B, T, H(, K)]
            gates["log_alpha"] = self.decay(raw)[1]
        if self.cell != "delta_product":  # one write per token: drop the N axis
            k, v = k[:, :, :, 0], v[:, :, :, 0]
            gates = {n: g[..., 0] if n == "beta" else g for n, g in gates.items()}
        return q.astype(self.dtype), k.astype(self.dtype), v, gates, buffer

    def _features(self, x):
        """phi then the q/k norm over the last axis: [..., head_dim] -> [..., K], float32."""
        projection = None if self.projection is None else self.projection[...]
        phi = apply_feature_map(
            self.feature_map, x.astype(jnp.float32), nu=self.dpfp_nu, projection=projection
        )
        return qk_normalize(phi, self.qk_norm)

    def _output(self, o, x):
        """o [B, T, H, V] -> y [B, T, D]."""
        B, T = o.shape[:2]
        o = o.astype(self.dtype)
        if self.out_norm is not None:
            o = self.out_norm(o)
        if self.gate_proj is not None:
            o = o * jax.nn.silu(self.gate_proj(x).reshape(B, T, self.H, self.V))
        return self.out_proj(o.reshape(B, T, self.H * self.V))
