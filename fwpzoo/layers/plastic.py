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
the gated delta rule's chunk scan).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.cells.programmed import plastic
from fwpzoo.layers.params import GateParam

ETA_SIGNS: tuple[str, ...] = ("learned", "positive", "negative")
LAMBDA_INIT = 0.99  # both papers' decay (HebbFF's lambda, Miconi's 1 - eta)


def plastic_kind(cfg) -> plastic.Plasticity:
    """The Plasticity of a model config; ValueError naming a bad value and the valid ones."""
    return plastic.Plasticity(cfg.plastic_on, cfg.plasticity, cfg.plastic_activation)


def check_plastic(cfg) -> None:
    """The plastic fields of a model config make a layer: ValueError (one line) otherwise."""
    kind = plastic_kind(cfg)
    if cfg.plastic_eta not in ETA_SIGNS:
        raise ValueError(
            f"unknown model.plastic_eta {cfg.plastic_eta!r}; valid choices: {', '.join(ETA_SIGNS)}"
        )
    if cfg.form == "chunkwise" and not kind.is_affine(cfg.plastic_alpha):
        raise ValueError(
            "the plastic mixer has a chunkwise (parallel) form only where its rule is affine in "
            "S (plastic_on=input, plasticity=hebb, plastic_activation=identity, "
            "plastic_alpha=false); "
            f"set model.form=recurrent for plastic_on={kind.site}, plasticity={kind.rule}, "
            f"plastic_activation={kind.activation}"
        )
    if cfg.plastic_eta != "learned" and cfg.plastic_eta_init == 0:
        raise ValueError(f"model.plastic_eta={cfg.plastic_eta} needs a nonzero plastic_eta_init")
    if cfg.form not in ("recurrent", "chunkwise"):
        raise ValueError(
            f"the plastic mixer has no {cfg.form!r} form; valid forms: recurrent, chunkwise"
        )


class PlasticMixer(nnx.Module):
    """The plastic layer of a model config `cfg` (num_heads, key_dim, value_dim, plastic_*)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        check_plastic(cfg)
        self.kind = plastic_kind(cfg)
        H = cfg.num_heads
        V = cfg.value_dim or cfg.d_model // H
        K = (cfg.key_dim or cfg.d_model // H) if self.kind.site == "input" else V
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

    # the entry points: see fwpzoo.layers ----------------------------------------------------

    def __call__(self, x, *, reset=None, return_intermediates: bool = False):
        """x [B, T, D], reset [B, T] bool -> y [B, T, D] (and scalar intermediates when asked)."""
        y, _, stats = self._sequence(x, None, reset)
        return (y, stats) if return_intermediates else y

    def init_cache(self, batch_size: int, max_len: int):
        """Constant size whatever max_len: the plastic matrices (and h at the recurrent site)."""
        del max_len
        return {"state": plastic.zero_state(self.kind, batch_size, self.H, self.K, self.V)}

    def prefill(self, x, cache, reset=None):
        """x [B, T, D] from the cache (reset [B, T] bool or None) -> (y [B, T, D], cache)."""
        y, state, _ = self._sequence(x, cache["state"], reset)
        return y, {"state": state}

    def decode_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] or None) through the cell's `step` -> (y [B, D], cache)."""
        y, cache, _ = self.inspect_step(x, cache, reset)
        return y, cache

    # inspection: the fast weights and the per-token gates ------------------------------------

    def fast_weights(self, cache):
        """S [B, H, K, V] of a cache."""
        return cache["state"]["S"]

    def inspect_step(self, x, cache, reset=None):
        """decode_step, plus the per-token gates {name: [B, H]}: the learning rate eta_t
        (eta times the modulator for the neuromodulated rule) and the decay lambda."""
        u, p = self._drive(x[:, None])
        p = None if p is None else p[:, 0]
        params = self.params()
        state, h = plastic.step(self.kind, params, cache["state"], u[:, 0], p, reset=reset)
        eta_t = jnp.broadcast_to(params["eta"], h.shape[:2])  # [B, H]
        if self.kind.rule == "neuromodulated":
            eta_t = eta_t * jnp.tanh(jnp.sum(params["w_mod"] * h, axis=-1))
        gates = {"learning_rate": eta_t, "decay": jnp.broadcast_to(self.lam(), h.shape[:2])}
        return self._output(h[:, None])[:, 0], {"state": state}, gates

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

    def _sequence(self, x, state, reset):
        u, p = self._drive(x)
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
            "state_norm": jnp.mean(jnp.sqrt(jnp.sum(jnp.square(state["S"]), axis=(-2, -1)))),
            "eta_mean": jnp.mean(params["eta"]),
            "lambda_mean": jnp.mean(jnp.exp(params["log_lambda"])),
        }
        return self._output(h), state, stats

    def _output(self, h):
        """h [B, T, H, V] -> y [B, T, D]."""
        B, T = h.shape[:2]
        return self.out_proj(h.astype(self.dtype).reshape(B, T, self.H * self.V))
