"""The plastic mixer: a vector-state layer with slow weights plus a fast plastic matrix per head.

    input site (HebbFF):       x [B, T, D] -> pre p = P x [B, T, H, K]
                               h_t = act((W + alpha . S_{t-1})^T p_t + b)     [B, T, H, V]
    recurrent site (Miconi):   h_t = act(W x_t + b + (R + alpha . S_{t-1})^T h_{t-1})
    then y = out_proj(h) [B, T, D]; S follows model.plasticity (fwpzoo.cells.programmed.plastic).

eta per head takes either sign (model.plastic_eta=learned), or is held positive (Hebbian) or
negative (anti-Hebbian) by an exp parametrisation; it starts at model.plastic_eta_init / K (its
magnitude for a fixed sign), not at 0, where no memory forms and the gradient on eta is too weak
to leave; lambda = sigmoid(raw) in (0, 1); alpha [H, K, V] per synapse when model.plastic_alpha.
model.form is `recurrent` (the scan, its backward recomputing chunks of model.chunk_size tokens
from their entering states, so training keeps T / C + C states, not T) or, where the rule is
affine in S (input site, hebb, identity activation, no alpha), `chunkwise` (the parallel form on
the gated delta rule's chunk scan); a model-wide chunkwise for a rule that is not affine resolves
once, with a note, to recurrent (PlasticConfig.forms, fwpzoo.layers.base).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.cells.programmed import plastic
from fwpzoo.layers.base import (
    Description,
    Mixer,
    MixerConfig,
    StateCache,
    floats_of,
    mean_state_norm,
)
from fwpzoo.layers.params import GateParam

ETA_SIGNS: tuple[str, ...] = ("learned", "positive", "negative")
LAMBDA_INIT = 0.99  # both papers' decay (HebbFF's lambda, Miconi's 1 - eta)


def plastic_kind(cfg) -> plastic.Plasticity:
    """The Plasticity of a model config; ValueError naming a bad value and the valid ones."""
    return plastic.Plasticity(cfg.plastic_on, cfg.plasticity, cfg.plastic_activation)


@dataclass(frozen=True, kw_only=True)
class PlasticConfig(MixerConfig):
    """The fields the plastic layer reads; key_dim and value_dim resolved (K is the presynaptic
    size: key_dim at the input site, value_dim at the recurrent site). The plastic_* fields are
    its own (see MixerConfig); the others are shared."""

    MIXER: ClassVar[str] = "plastic"
    CHOICES: ClassVar[dict] = {
        "plastic_on": plastic.SITES,
        "plasticity": plastic.RULES,
        "plastic_activation": tuple(plastic.ACTIVATIONS),
        "plastic_eta": ETA_SIGNS,
    }

    num_heads: int
    key_dim: int
    value_dim: int
    form: str
    chunk_size: int
    plastic_on: str = "input"  # input (HebbFF) | recurrent (Miconi's differentiable plasticity)
    plasticity: str = "hebb"  # hebb | oja | neuromodulated
    plastic_activation: str = "tanh"  # tanh | sigmoid | relu | identity
    plastic_eta: str = "learned"  # learned (either sign) | positive | negative
    # eta K at init (K presynaptic; HebbFF: -5); a fixed sign keeps |.|
    plastic_eta_init: float = 1.0
    plastic_alpha: bool = False  # per-synapse plasticity coefficients alpha [H, K, V]

    @classmethod
    def forms(cls, values):
        """recurrent always; chunkwise (the parallel form) where the rule is affine in S:
        plastic_on=input, plasticity=hebb, plastic_activation=identity, plastic_alpha=false."""
        affine = plastic_kind_of(values).is_affine(values["plastic_alpha"])
        return ("recurrent", "chunkwise") if affine else ("recurrent",)

    @classmethod
    def kind(cls, values):
        kind = plastic_kind_of(values)
        return (
            f" (plastic_on={kind.site}, plasticity={kind.rule}, "
            f"plastic_activation={kind.activation}, "
            f"plastic_alpha={str(values['plastic_alpha']).lower()})"  # as the config spells it
        )

    def context_refusal(self, where):
        # the chunkwise form exists only for a rule affine in S (forms), and splits as a cell's
        return None if self.form == "chunkwise" else self.sequential_refusal(where)

    def check(self):
        if self.plastic_eta != "learned" and self.plastic_eta_init == 0:
            raise ValueError(
                f"model.plastic_eta={self.plastic_eta} needs a nonzero plastic_eta_init"
            )

    @property
    def presynaptic_dim(self) -> int:
        """K: key_dim at the input site, value_dim (K = V) at the recurrent site."""
        return self.key_dim if self.plastic_on == "input" else self.value_dim

    def describe(self) -> Description:
        kind = plastic_kind(self)
        H, K, V = self.num_heads, self.presynaptic_dim, self.value_dim
        state = jax.eval_shape(lambda: plastic.zero_state(kind, 1, H, K, V))
        rule = f"plastic_{kind.site}_{kind.rule}"
        return Description("plastic", rule, K, H, floats_of(state), form=self.form)


def plastic_kind_of(values: dict) -> plastic.Plasticity:
    """The Plasticity of a dict of PlasticConfig values."""
    return plastic.Plasticity(
        values["plastic_on"], values["plasticity"], values["plastic_activation"]
    )


class PlasticMixer(Mixer):
    """The plastic layer of a model config `cfg` (its fields: PlasticConfig)."""

    Config = PlasticConfig
    HAS_FAST_WEIGHTS = True

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        self.kind = plastic_kind(cfg)
        H, K, V = cfg.num_heads, cfg.presynaptic_dim, cfg.value_dim
        self.H, self.K, self.V, self.dtype = H, K, V, dtype
        self.form, self.chunk_size, self.eta_sign = cfg.form, cfg.chunk_size, cfg.plastic_eta
        keys = iter(jax.random.split(rngs.params(), 4))
        normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) / math.sqrt(fan_in)  # noqa: E731
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        if self.kind.site == "input":
            self.in_proj = linear(cfg.d_model, H * K)  # the presynaptic activity p
            self.W = nnx.Param(normal((H, K, V), K))  # slow weights on p
        else:
            self.in_proj = linear(cfg.d_model, H * V)  # W x
            self.R = nnx.Param(0.5 * normal((H, V, V), V))  # slow recurrent weights
        self.b = GateParam(jnp.zeros((H, V), jnp.float32))
        eta = cfg.plastic_eta_init / K  # HebbFF's scale: eta K = O(1) for pre of norm sqrt(K)
        eta_raw = eta if self.eta_sign == "learned" else math.log(abs(eta))
        self.eta_raw = GateParam(jnp.full((H,), eta_raw, jnp.float32))
        self.lambda_raw = GateParam(jnp.full((H,), math.log(LAMBDA_INIT / (1 - LAMBDA_INIT))))
        # each synapse's plasticity coefficient (Miconi et al. 2018): a gate on its trace
        self.alpha = GateParam(jnp.ones((H, K, V), jnp.float32)) if cfg.plastic_alpha else None
        self.w_mod = nnx.Param(normal((H, V), V)) if self.kind.rule == "neuromodulated" else None
        self.out_proj = linear(H * V, cfg.d_model)

    # the entry points: see fwpzoo.layers.base; __call__, prefill and decode_step from Mixer

    def init_cache(self, batch_size: int, max_len: int) -> StateCache:
        """Constant size whatever max_len: the plastic matrices (and h at the recurrent site)."""
        del max_len
        return StateCache(plastic.zero_state(self.kind, batch_size, self.H, self.K, self.V))

    def fast_weights(self, cache):
        """S [B, H, K, V] of a cache."""
        return cache.state["S"]

    def inspect_step(self, x, cache, reset=None):
        """decode_step (one token x [B, D], reset [B] or None, through the cell's `step`), plus
        the per-token gates {name: [B, H]}: the learning rate eta_t (eta times the modulator for
        the neuromodulated rule) and the decay lambda."""
        u, p = self._drive(x[:, None])
        p = None if p is None else p[:, 0]
        params = self.params()
        state, h = plastic.step(self.kind, params, cache.state, u[:, 0], p, reset=reset)
        eta_t = jnp.broadcast_to(params["eta"], h.shape[:2])  # [B, H]
        if self.kind.rule == "neuromodulated":
            eta_t = eta_t * jnp.tanh(jnp.sum(params["w_mod"] * h, axis=-1))
        gates = {"learning_rate": eta_t, "decay": jnp.broadcast_to(self.lam(), h.shape[:2])}
        return self._output(h[:, None])[:, 0], StateCache(state), gates

    # the pieces ------------------------------------------------------------------------------

    def eta(self):
        """[H] float32: the learning rate of each head."""
        raw = self.eta_raw[...]
        return {"learned": raw, "positive": jnp.exp(raw), "negative": -jnp.exp(raw)}[self.eta_sign]

    def lam(self):
        """[H] float32 in (0, 1): the decay of each head."""
        return jax.nn.sigmoid(self.lambda_raw[...])

    def params(self) -> dict:
        """What the cell reads: eta, log_lambda [H], and alpha, R, w_mod where the kind has them."""
        params = {"eta": self.eta(), "log_lambda": jax.nn.log_sigmoid(self.lambda_raw[...])}
        for name in ("alpha", "R", "w_mod"):
            value = getattr(self, name, None)
            if value is not None:
                params[name] = value[...]
        return params

    def _drive(self, x):
        """x [B, T, D] -> (slow drive u [B, T, H, V] float32, pre p [B, T, H, K] or None)."""
        B, T, _ = x.shape
        z = self.in_proj(x).astype(jnp.float32)
        if self.kind.site == "recurrent":
            return z.reshape(B, T, self.H, self.V) + self.b[...], None
        p = z.reshape(B, T, self.H, self.K)  # [B, T, H, K]
        return jnp.einsum("bthk,hkv->bthv", p, self.W[...]) + self.b[...], p

    def _sequence(self, x, cache, reset):
        u, p = self._drive(x)
        state = None if cache is None else cache.state
        params = self.params()
        if self.form == "chunkwise":
            h, state = plastic.parallel(
                self.kind, params, u, p, state=state, chunk_size=self.chunk_size, reset=reset
            )
        else:
            h, state = plastic.checkpointed(
                self.kind, params, u, p, state=state, reset=reset, chunk_size=self.chunk_size
            )
        stats = {
            "state_norm": mean_state_norm(state["S"]),
            "eta_mean": jnp.mean(params["eta"]),
            "lambda_mean": jnp.mean(jnp.exp(params["log_lambda"])),
        }
        return self._output(h), StateCache(state), stats

    def _output(self, h):
        """h [B, T, H, V] -> y [B, T, D]."""
        B, T = h.shape[:2]
        return self.out_proj(h.astype(self.dtype).reshape(B, T, self.H * self.V))
