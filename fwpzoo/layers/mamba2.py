"""A Mamba-2-style mixer (Dao & Gu 2024) on the `gated_linear_attn` cell with scalar decay.

    z, x, B, C, dt_raw = in_proj(u)           x [B, T, H, V]; B, C [B, T, K] shared by the heads
    x, B, C = silu(short_conv(x, B, C))
    dt, log_alpha = softplus(dt_raw + dt_bias), -exp(A_log) dt      per head, [B, T, H]
    S_t = alpha_t S_{t-1} + B_t (dt_t x_t)^T,   o_t = S_t^T C_t        (the cell: k = B, q = C)
    y = out_proj(RMSNorm((o + D x) * silu(z)))

In the cell's language K is the SSM state size and V the head dim; one group of B and C.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo import cells
from fwpzoo.layers.conv import ShortConv
from fwpzoo.layers.fwp import CellMixer, form_fn, mean_state_norm, reset_option, run_form
from fwpzoo.layers.gates import Decay
from fwpzoo.layers.norms import RMSNorm

CELL = "gated_linear_attn"


class Mamba2Mixer(CellMixer):
    """The Mamba-2 layer of a model config `cfg` (heads, key/value dims, conv_size, form)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        form_fn(CELL, cfg.form)
        H = cfg.num_heads
        K = cfg.key_dim or cfg.d_model // H
        V = cfg.value_dim or cfg.d_model // H
        self.cell, self.H, self.K, self.V, self.dtype = CELL, H, K, V, dtype
        self.form, self.chunk_size = cfg.form, cfg.chunk_size
        self.inner = H * V
        self.xbc_width = self.inner + 2 * K
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.in_proj = linear(cfg.d_model, self.inner + self.xbc_width + H)
        self.conv = (
            ShortConv(self.xbc_width, cfg.conv_size, rngs=rngs, dtype=dtype)
            if cfg.conv_size > 0
            else None
        )
        self.decay = Decay((H,), cfg.decay_a_range, cfg.decay_dt_range, rngs=rngs)
        self.D = nnx.Param(jnp.ones((H,), jnp.float32))
        self.norm = RMSNorm(self.inner)
        self.out_proj = linear(self.inner, cfg.d_model)

    def decode_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] bool or None) through the cell's `step`
        -> (y [B, D], cache)."""
        y, cache, _ = self.inspect_step(x, cache, reset)
        return y, cache

    def inspect_step(self, x, cache, reset=None):
        """decode_step, plus the token's decay {"alpha": [B, H]}."""
        reset_t = None if reset is None else reset[:, None]  # [B, 1]
        z, xs, q, k, v, log_alpha, buffer = self._inputs(x[:, None], cache.get("conv"), reset_t)
        at_0 = lambda a: a[:, 0]  # noqa: E731  drop the time axis of length 1
        inputs = (at_0(q), at_0(k), at_0(v))
        state, o = cells.get(CELL).step(
            cache["state"], *inputs, **reset_option(reset), log_alpha=at_0(log_alpha)
        )
        y = self._output(o[:, None], xs, z)[:, 0]
        return y, self._cache(state, buffer), {"alpha": jnp.exp(at_0(log_alpha))}

    def _sequence(self, x, state, buffer, reset):
        z, xs, q, k, v, log_alpha, buffer = self._inputs(x, buffer, reset)
        gates = {"log_alpha": log_alpha}
        o, state = run_form(CELL, self.form, self.chunk_size, q, k, v, state, gates, reset)
        stats = {"state_norm": mean_state_norm(state), "alpha_mean": jnp.mean(jnp.exp(log_alpha))}
        return self._output(o, xs, z), self._cache(state, buffer), stats

    def _cache(self, state, buffer):
        return {"state": state} if buffer is None else {"state": state, "conv": buffer}

    def _inputs(self, u, buffer, reset=None):
        B, T, _ = u.shape
        H, K, V = self.H, self.K, self.V
        z, xbc, dt_raw = jnp.split(self.in_proj(u), [self.inner, self.inner + self.xbc_width], -1)
        if self.conv is not None:
            xbc, buffer = self.conv(xbc, buffer, reset)
        xs, k, q = jnp.split(jax.nn.silu(xbc), [self.inner, self.inner + K], axis=-1)
        xs = xs.reshape(B, T, H, V)  # [B, T, H, V]
        heads = lambda a: jnp.broadcast_to(a[:, :, None], (B, T, H, K))  # noqa: E731  one group
        dt, log_alpha = self.decay(dt_raw)  # [B, T, H]
        v = (xs * dt[..., None]).astype(self.dtype)  # [B, T, H, V]
        return z, xs, heads(q), heads(k), v, log_alpha, buffer

    def _output(self, o, xs, z):
        """o, xs [B, T, H, V], z [B, T, H V] -> [B, T, D]."""
        B, T = o.shape[:2]
        y = o.astype(self.dtype) + self.D[...].astype(self.dtype)[:, None] * xs
        y = self.norm(y.reshape(B, T, self.inner) * jax.nn.silu(z))
        return self.out_proj(y)
