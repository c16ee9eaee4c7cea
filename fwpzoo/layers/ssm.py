"""A diagonal vector-state SSM (LRU, Orvieto et al. 2023; S5 style): the vector-memory comparison.

    h_t = lambda * h_{t-1} + gamma * (B x_t)        h [B, N], complex (or real) diagonal lambda
    y_t = Re(C h_t) + D * x_t

lambda = exp(-exp(nu_log) + i exp(theta_log)) keeps |lambda| < 1; gamma = exp(gamma_log) starts at
sqrt(1 - |lambda|^2), LRU's normalisation. The sequence form is jax.lax.associative_scan over the
pairs (a, b) of h_t = a_t h_{t-1} + b_t, combined as (a2 a1, a2 b1 + b2). The state is complex64 or
float32 whatever the compute dtype. With the sequence split over a mesh's `context` axis, each
device scans its span and the spans' summaries compose (fwpzoo.layers.context.run_diagonal).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.layers import context
from fwpzoo.layers.base import Description, Mixer, MixerConfig, StateCache
from fwpzoo.layers.params import GateParam


def linear_recurrence(a, b, h0):
    """h_t = a_t h_{t-1} + b_t over axis 1 of a, b [B, T, N], from h0 [B, N] -> h [B, T, N]."""
    return scan_pairs(a, b.at[:, 0].add(a[:, 0] * h0))[1]


def scan_pairs(a, b):
    """The associative scan of the pairs a, b [B, T, N] -> (A, h) [B, T, N]: A_t = a_1 ... a_t
    and h_t = a_t h_{t-1} + b_t from h_0 = 0."""

    def combine(first, second):
        a1, b1 = first
        a2, b2 = second
        return a2 * a1, a2 * b1 + b2

    return jax.lax.associative_scan(combine, (a, b), axis=1)


@dataclass(frozen=True, kw_only=True)
class SSMConfig(MixerConfig):
    """The fields the diagonal SSM reads (its own, see MixerConfig). It has one sequence
    computation (the associative scan, exact), so no form."""

    MIXER: ClassVar[str] = "ssm"
    MINIMUM: ClassVar[dict] = {"ssm_state_dim": 1}

    ssm_state_dim: int = 64  # N: the diagonal state's size
    ssm_complex: bool = True  # complex diagonal (LRU) or real diagonal recurrence

    def describe(self) -> Description:
        N = self.ssm_state_dim * (2 if self.ssm_complex else 1)  # a complex number is two
        return Description("ssm", "diagonal_linear", None, 1, N)


class DiagonalSSM(Mixer):
    """The LRU layer of a model config `cfg` (its fields: SSMConfig)."""

    Config = SSMConfig

    def __init__(
        self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32, r_min=0.9, r_max=0.999, max_phase=0.314
    ):
        super().__init__(cfg)
        cfg = self.cfg
        N, D = cfg.ssm_state_dim, cfg.d_model
        self.N, self.is_complex, self.dtype = N, cfg.ssm_complex, dtype
        radius_key, phase_key, b_key, c_key = jax.random.split(rngs.params(), 4)
        # |lambda|^2 uniform on [r_min^2, r_max^2] (LRU's ring initialisation)
        u = jax.random.uniform(radius_key, (N,))
        nu = -0.5 * jnp.log(u * (r_max**2 - r_min**2) + r_min**2)  # -log |lambda|
        self.nu_log = GateParam(jnp.log(nu))
        self.gamma_log = GateParam(0.5 * jnp.log1p(-jnp.exp(-2.0 * nu)))  # log sqrt(1 - |l|^2)
        parts = 2 if self.is_complex else 1  # real and imaginary parts of B and C
        self.B = nnx.Param(jax.random.normal(b_key, (parts, D, N)) / math.sqrt(2 * D))
        self.C = nnx.Param(jax.random.normal(c_key, (parts, N, D)) / math.sqrt(N))
        self.D = GateParam(jnp.ones((D,), jnp.float32))  # the skip's scale per channel
        if self.is_complex:
            self.theta_log = GateParam(jnp.log(max_phase * jax.random.uniform(phase_key, (N,))))

    # the entry points: see fwpzoo.layers.base; __call__, prefill and decode_step from Mixer

    def init_cache(self, batch_size: int, max_len: int) -> StateCache:
        """Constant size whatever max_len: the state vector h [B, N]."""
        del max_len
        return StateCache(self._zeros(batch_size))

    def inspect_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] bool or None) -> (y [B, D], cache, gates): no gates,
        as lambda is the same at every token."""
        a, b = self._pairs(x[:, None], None if reset is None else reset[:, None])
        h = a[:, 0] * cache.state + b[:, 0]  # [B, N]
        return self._read(h[:, None], x[:, None])[:, 0], StateCache(h), {}

    def _sequence(self, x, cache, reset):
        a, b = self._pairs(x, reset)  # [B, T, N]
        if cache is None and context.context_mesh() is not None:  # the sequence split: exact
            h, last = context.run_diagonal(scan_pairs, a, b)
        else:
            h0 = self._zeros(x.shape[0]) if cache is None else cache.state
            h = linear_recurrence(a, b, h0)  # [B, T, N]
            last = h[:, -1]
        stats = {"state_norm": jnp.mean(jnp.abs(last))}
        return self._read(h, x), StateCache(last), stats

    def _zeros(self, batch_size):
        return jnp.zeros((batch_size, self.N), jnp.complex64 if self.is_complex else jnp.float32)

    def _lambda(self):
        log_radius = -jnp.exp(self.nu_log[...])  # [N]
        if self.is_complex:
            return jnp.exp(jax.lax.complex(log_radius, jnp.exp(self.theta_log[...])))
        return jnp.exp(log_radius)

    def _pairs(self, x, reset=None):
        """x [B, T, D] -> (a, b) [B, T, N] of h_t = a_t h_{t-1} + b_t; a_t = 0 where reset [B, T]
        is True, so h_t starts from a zero state there."""
        Bx = jnp.einsum("btd,pdn->pbtn", x, self.B[...].astype(self.dtype))  # [P, B, T, N]
        Bx = Bx.astype(jnp.float32)
        Bx = jax.lax.complex(Bx[0], Bx[1]) if self.is_complex else Bx[0]
        b = jnp.exp(self.gamma_log[...]) * Bx
        a = jnp.broadcast_to(self._lambda(), b.shape)
        if reset is not None:
            a = jnp.where(reset[..., None], jnp.zeros((), a.dtype), a)
        return a, b

    def _read(self, h, x):
        """Re(C h) + D x: h [B, T, N], x [B, T, D] -> [B, T, D] in x's dtype."""
        parts = jnp.stack([h.real, -h.imag]) if self.is_complex else h[None]  # [P, B, T, N]
        y = jnp.einsum("pbtn,pnd->btd", parts.astype(self.dtype), self.C[...].astype(self.dtype))
        return y + self.D[...].astype(self.dtype) * x
