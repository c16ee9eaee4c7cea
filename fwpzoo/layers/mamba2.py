"""A Mamba-2-style mixer (Dao & Gu 2024) on the `gated_linear_attn` cell with scalar decay.

    z, x, B, C, dt_raw = in_proj(u)           x [B, T, H, V]; B, C [B, T, K] shared by the heads
    x, B, C = silu(short_conv(x, B, C))
    dt, log_alpha = softplus(dt_raw + dt_bias), -exp(A_log) dt      per head, [B, T, H]
    S_t = alpha_t S_{t-1} + B_t (dt_t x_t)^T,   o_t = S_t^T C_t        (the cell: k = B, q = C)
    y = out_proj(RMSNorm((o + D x) * silu(z)))

In the cell's language K is the SSM state size and V the head dim; one group of B and C.

model.decay_range "-1,1" takes alpha_t = 2 exp(log_alpha_t) - 1 in (-1, 1), the extension of
Grazzi et al. 2025 that lets a diagonal recurrence flip its state's sign (parity). The cell's
forms take a decay in log space, so a negative one runs through the identity below: with c_t the
product of sign(alpha_s) over s <= t,

    S_t = c_t S~_t,   S~_t = |alpha_t| S~_{t-1} + c_t k_t v_t^T,   o_t = c_t S~_t^T q_t

(c_t^2 = 1; S~_0 = S_0), so every form runs on |alpha|, the values times c and its outputs and
final state times c again. A reset zeroes S and S~ alike, so c runs on across it.
"""

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo import cells
from fwpzoo.cells import FORMS
from fwpzoo.cells.chunked import summary
from fwpzoo.cells.forms import reset_option, run_form
from fwpzoo.layers import context
from fwpzoo.layers.base import (
    CellMixer,
    Description,
    MixerConfig,
    StateCache,
    check_decay_init,
    mean_state_norm,
)
from fwpzoo.layers.conv import ShortConv
from fwpzoo.layers.gates import Decay
from fwpzoo.layers.norms import RMSNorm
from fwpzoo.layers.params import GateParam

CELL = "gated_linear_attn"
DECAY_RANGES: tuple[str, ...] = ("0,1", "-1,1")
# |alpha| is floored here before its log: alpha is exactly 0 only by chance, where the log's
# -inf would make the chunkwise form's differences of log sums nan
SMALLEST_DECAY = float(jnp.finfo(jnp.float32).tiny)


def signed_decay(log_alpha):
    """log_alpha [B, T, H] (<= 0) -> alpha = 2 exp(log_alpha) - 1 in (-1, 1)."""
    return 2.0 * jnp.exp(log_alpha) - 1.0


def signed_run(run, v, alpha):
    """A run of the cell, run(v, log_decay) -> (o [B, T, H, V], state [B, H, K, V]), with a
    decay alpha [B, T, H] of either sign, by the identity in the module docstring."""
    c, log_abs = _signs(alpha)
    o, state = run(v * c[..., None].astype(v.dtype), log_abs)
    return o * c[..., None].astype(o.dtype), state * c[:, -1, :, None, None]


def signed_summary(k, v, alpha, reset, chunk_size) -> summary.Summary:
    """The summary of a span (k [B, T, H, K], v [B, T, H, V], reset [B, T] or None) with a
    decay alpha [B, T, H] of either sign: the span maps S to c_L (f~ S + X~), where (f~, X~) is
    the cell's summary of the span run on |alpha| with values c v (the module docstring's S~,
    c restarting at 1 on the span's first token)."""
    c, log_abs = _signs(alpha)
    v = v * c[..., None].astype(v.dtype)
    span = summary.summarize(CELL, k, v, reset=reset, chunk_size=chunk_size, log_alpha=log_abs)
    last = c[:, -1, :, None]  # [B, H, 1]
    return summary.Summary(span.transition * last, span.contribution * last[..., None])


def _signs(alpha):
    """alpha [B, T, H] -> (c [B, T, H], the product of sign(alpha_s) over s <= t; log |alpha|)."""
    sign = jax.lax.stop_gradient(jnp.where(alpha < 0, -1.0, 1.0))  # flat: no gradient
    c = jnp.cumprod(sign, axis=1)  # [B, T, H]
    return c, jnp.log(jnp.maximum(jnp.abs(alpha), SMALLEST_DECAY))


@dataclass(frozen=True, kw_only=True)
class Mamba2Config(MixerConfig):
    """The fields the Mamba-2 layer reads; key_dim (the SSM state size K) and value_dim (the
    head dim V) resolved. decay_range is its own field (see MixerConfig); the others are
    shared."""

    MIXER: ClassVar[str] = "mamba2"
    CONTEXT_IN_CHUNKS: ClassVar[bool] = True
    CHOICES: ClassVar[dict] = {"decay_range": DECAY_RANGES}

    num_heads: int
    key_dim: int
    value_dim: int
    form: str
    chunk_size: int
    matmul_precision: str
    conv_size: int
    decay_a_range: tuple[float, ...]
    decay_dt_range: tuple[float, ...]
    # "0,1": alpha = exp(-A dt); "-1,1": alpha = 2 exp(-A dt) - 1 (negative eigenvalues)
    decay_range: str = "0,1"

    @classmethod
    def forms(cls, values):
        return tuple(form for form in FORMS if hasattr(cells.get(CELL), form))

    def check(self):
        check_decay_init(self)

    def describe(self) -> Description:
        H, K, V = self.num_heads, self.key_dim, self.value_dim
        return Description("mamba2", CELL, K, H, H * K * V, form=self.form)


class Mamba2Mixer(CellMixer):
    """The Mamba-2 layer of a model config `cfg` (its fields: Mamba2Config)."""

    Config = Mamba2Config

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        H, K, V = cfg.num_heads, cfg.key_dim, cfg.value_dim
        self.cell, self.H, self.K, self.V, self.dtype = CELL, H, K, V, dtype
        self.options = ()  # the cell takes no static arguments
        self.form, self.chunk_size = cfg.form, cfg.chunk_size
        self.matmul_precision = cfg.matmul_precision
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
        self.signed = cfg.decay_range == "-1,1"
        self.D = GateParam(jnp.ones((H,), jnp.float32))  # the skip's scale per head
        self.norm = RMSNorm(self.inner)
        self.out_proj = linear(self.inner, cfg.d_model)

    def inspect_step(self, x, cache, reset=None):
        """decode_step (the cell's `step`), plus the token's decay {"alpha": [B, H]}."""
        reset_t = None if reset is None else reset[:, None]  # [B, 1]
        z, xs, q, k, v, log_alpha, buffer = self._inputs(x[:, None], cache.conv, reset_t)

        at_0 = lambda a: a[:, 0]  # noqa: E731  drop the time axis of length 1

        def run(v, log_decay):  # the cell's step, its output given the time axis back
            inputs = (at_0(q), at_0(k), at_0(v))
            options = {**reset_option(reset), "log_alpha": at_0(log_decay)}
            state, o = cells.get(CELL).step(cache.state, *inputs, **options)
            return o[:, None], state

        o, state = self._decayed(run, v, log_alpha)
        y = self._output(o, xs, z)[:, 0]
        return y, StateCache(state, buffer), {"alpha": self.alpha(log_alpha)[:, 0]}

    def cell_inputs(self, x):
        """x [B, T, D], read from the start -> {"q", "k": [B, T, H, K], "v": [B, T, H, V] (the
        values times dt), "log_alpha": [B, T, H]}; `alpha` gives the decay of log_alpha, which
        is the cell's own gate where the range is (0, 1)."""
        _, _, q, k, v, log_alpha, _ = self._inputs(x, None)
        return {"q": q, "k": k, "v": v, "log_alpha": log_alpha}

    def _run(self, x, state, buffer, reset):
        z, xs, q, k, v, log_alpha, buffer = self._inputs(x, buffer, reset)
        gates = {"log_alpha": log_alpha}
        if state is None and context.context_mesh() is not None:  # the sequence split: exact
            summarize = self._signed_summary if self.signed else None
            inputs = (q, k, v, gates, reset)
            precision = self.matmul_precision
            o, state = context.run_cell(
                CELL, self.chunk_size, self._form, *inputs, summarize, precision=precision
            )
        else:
            o, state = self._form(q, k, v, state, gates, reset)
        alpha_mean = jnp.mean(self.alpha(log_alpha))
        stats = {"state_norm": mean_state_norm(state), "alpha_mean": alpha_mean}
        return self._output(o, xs, z), state, buffer, stats

    def _form(self, q, k, v, state, gates, reset):
        """The configured form from `state` with this layer's decay of gates["log_alpha"]."""

        def run(v, log_decay):
            decay = {"log_alpha": log_decay}
            precision = self.matmul_precision
            return run_form(
                CELL, self.form, self.chunk_size, q, k, v, state, decay, reset, precision
            )

        return self._decayed(run, v, gates["log_alpha"])

    def _signed_summary(self, k, v, gates, reset):
        """A span's summary with the decay in (-1, 1) (signed_summary)."""
        alpha = signed_decay(gates["log_alpha"])
        return signed_summary(k, v, alpha, reset, self.chunk_size)

    def alpha(self, log_alpha):
        """The decay of this layer's range from Decay's log_alpha [B, T, H]."""
        return signed_decay(log_alpha) if self.signed else jnp.exp(log_alpha)

    def _decayed(self, run, v, log_alpha):
        """run(v, log_decay) with this layer's decay of Decay's log_alpha -> (o, state)."""
        if not self.signed:
            return run(v, log_alpha)
        return signed_run(run, v, signed_decay(log_alpha))

    def _inputs(self, u, buffer, reset=None):
        B, T, _ = u.shape
        H, K, V = self.H, self.K, self.V
        z, xbc, dt_raw = jnp.split(self.in_proj(u), [self.inner, self.inner + self.xbc_width], -1)
        if self.conv is not None:
            xbc, buffer = context.short_conv(self.conv, xbc, buffer, reset)
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
