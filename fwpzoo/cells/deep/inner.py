"""The pieces of a deep fast weight, as data and small pure functions: fast nets (a pytree of
per-head parameters and how it maps a key to a value), the loss a token's inner step takes, and
the inner optimisers.

Fast nets, each parameter [..., shape] with any leading axes (B, H):

    linear   W [K, V]                               f(x) = x W
    mlp      W1 [K, F], b1 [F], W2 [F, V], b2 [V]   f(x) = gelu(x W1 + b1) W2 + b2
    swiglu   W1, W3 [K, F], W2 [F, V]               f(x) = (silu(x W1) * (x W3)) W2

Inner optimisers, on the gradient G_t of token t's loss with per-token gates (beta the step,
alpha = exp(log_alpha) a weight decay, eta and mu = exp(log_mu) the momentum's):

    sgd        theta <- alpha theta - beta G
    momentum   M <- mu M + eta G,  theta <- alpha theta - beta M
    muon       M <- mu M + eta G,  theta <- alpha theta - beta NS(M)   (NS on matrices; biases
               take M as momentum does)

NS is Muon's Newton-Schulz orthogonalisation (Jordan et al. 2024): X = M / ||M||_F, transposed
to be wide, then 5 times X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445,
-4.7750, 2.0315): a fast approximation of the orthogonal factor U V^T of M = U S V^T.

Dimension letters: B batch, H heads, K key dim, V value dim, F hidden width, U tokens.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

FAST_NETS: tuple[str, ...] = ("linear", "mlp", "swiglu")
OPTIMIZERS: tuple[str, ...] = ("sgd", "momentum", "muon")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
NS_EPS = 1e-7


@dataclass(frozen=True)
class Inner:
    """A deep cell's configuration (its forms' static arguments): the fast net and its hidden
    width F (None: 4 K), the optimiser, the tokens per inner step and the loss window."""

    fast_net: str = "linear"
    hidden: int | None = None
    optimizer: str = "sgd"
    inner_batch: int = 1
    window: int = 1

    def __post_init__(self):
        for name, value, valid in (
            ("fast_net", self.fast_net, FAST_NETS),
            ("optimizer", self.optimizer, OPTIMIZERS),
        ):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        for name in ("inner_batch", "window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.hidden is not None and self.hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {self.hidden!r}")

    @property
    def has_momentum(self) -> bool:
        return self.optimizer != "sgd"

    def shapes(self, K: int, V: int) -> dict[str, tuple[int, ...]]:
        """The fast net's parameters and their per-head shapes."""
        F = self.hidden or 4 * K
        if self.fast_net == "linear":
            return {"W": (K, V)}
        if self.fast_net == "mlp":
            return {"W1": (K, F), "b1": (F,), "W2": (F, V), "b2": (V,)}
        return {"W1": (K, F), "W3": (K, F), "W2": (F, V)}

    def state_shapes(self, K: int, V: int) -> dict[str, tuple[int, ...]]:
        """Every part of the cell's state: the parameters, their momenta ("M_" + name) and the
        window's last window - 1 keys and values with their validity ("past_k", "past_v",
        "past_valid")."""
        shapes = self.shapes(K, V)
        if self.has_momentum:
            shapes |= {"M_" + name: shape for name, shape in self.shapes(K, V).items()}
        if self.window > 1:
            c = self.window - 1
            shapes |= {"past_k": (c, K), "past_v": (c, V), "past_valid": (c,)}
        return shapes


def apply(fast_net: str, params: dict, x):
    """f(x): params with leading axes [...], x [..., U, K] -> [..., U, V]."""
    if fast_net == "linear":
        return x @ params["W"]
    if fast_net == "mlp":
        hidden = jax.nn.gelu(x @ params["W1"] + params["b1"][..., None, :])
        return hidden @ params["W2"] + params["b2"][..., None, :]
    return (jax.nn.silu(x @ params["W1"]) * (x @ params["W3"])) @ params["W2"]


def token_losses(fast_net: str, params: dict, k, v, weight):
    """sum over tokens of weight * 1/2 ||f(k) - v||^2: k [..., U, K], v [..., U, V], weight
    [..., U] (0 drops a token)."""
    error = apply(fast_net, params, k) - v  # [..., U, V]
    return 0.5 * jnp.sum(weight * jnp.sum(jnp.square(error), axis=-1))


def newton_schulz(m):
    """Muon's orthogonalisation of m [..., R, C] (see the module docstring), in m's dtype."""
    a, b, c = NS_COEFFICIENTS
    tall = m.shape[-2] > m.shape[-1]
    x = m.mT if tall else m
    x = x / (_frobenius(x) + NS_EPS)
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def _frobenius(x):
    """||x||_F over the last two axes [..., 1, 1], with a zero gradient (not NaN) at x = 0: a
    momentum that is still zero (an MLP's W1 before W2 has moved) gets no NaN through it."""
    squares = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
    positive = squares > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squares, 1.0)), 0.0)


def direction(optimizer: str, momentum):
    """What the step subtracts (before beta): M itself, or NS(M) for Muon's matrices."""
    if optimizer != "muon":
        return momentum
    return {name: newton_schulz(m) if name[0] == "W" else m for name, m in momentum.items()}
