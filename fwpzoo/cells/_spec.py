"""What a cell module declares about itself, as data: its gates and the objective its update
takes one optimisation step on.

Every family module defines

    GATE_SPECS: tuple[Gate, ...]     # each gate's shape, range and whether it is per sub-step
    GATES = gate_names(GATE_SPECS)   # the names alone (the cell contract)
    OBJECTIVE: Objective             # the local loss, the kind of step, the state, the paper

The FWP layer builds each gate from its Gate (projection and range-keeping activation), so a new
rule needs no layer code; docs/rules.md and `fwpzoo list` are generated from OBJECTIVE; and
tests/test_rules.py checks in float64 that `step` is the optimiser step OBJECTIVE names, with the
gradient taken by jax.grad of OBJECTIVE.loss_fn (the primer's view: Irie & Gershman 2025,
"Fast weight programming and linear transformers", Table 1).

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N sub-steps per token.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp

# Gate shapes (trailing the [B, T] of a per-token gate).
PER_TOKEN = "per token"  # [B, T, H] ([B, T, H, N] when per sub-step)
PER_TOKEN_KEY = "per token and key"  # [B, T, H, K]
PER_TOKEN_VALUE = "per token and value"  # [B, T, H, V]
SCALAR_OR_PER_KEY = "scalar or per key"  # [B, T, H] or [B, T, H, K]: model.decay chooses
STATIC = "static per head and key"  # [H, K]: a parameter of the layer, no time axis
SHAPES: tuple[str, ...] = (PER_TOKEN, PER_TOKEN_KEY, PER_TOKEN_VALUE, SCALAR_OR_PER_KEY, STATIC)
KEY = "k"  # a `times` that names the key: the gate scales k channel by channel (Comba's p)

# Gate ranges, and so the activation the layer puts on the gate's projection.
BETA = "beta"  # (0, top of model.beta_range): sigmoid times 1 or 2
UNIT = "unit"  # (0, 1): sigmoid
LOG_DECAY = "log decay"  # <= 0: log of a decay factor in (0, 1]
POSITIVE = "positive"  # > 0: softplus
REAL = "real"  # any value: no activation
NEGATIVE_UNIT = "negative unit"  # (-1, 0): a sigmoid minus 1
DIRECTION = "direction"  # a unit vector along the key axis: the projection L2-normalised
RANGES: tuple[str, ...] = (BETA, UNIT, LOG_DECAY, POSITIVE, REAL, NEGATIVE_UNIT, DIRECTION)

# What one token's update is, in optimisation terms.
GRADIENT = "gradient"  # S <- S - lr * dL/dS (a linear loss makes it Hebbian)
GRADIENT_STEPS = "gradient steps"  # N gradient steps per token, one per sub-step (k_j, v_j)
IMPLICIT = "implicit"  # S_t = S_{t-1} - lr * dL/dS at S_t (the proximal step)
MOMENTUM = "momentum"  # M <- mu M + momentum_lr * dL/dS at S; S <- S - lr * M
MINIMISER = "exact minimiser"  # the read uses the exact minimiser of a regularised loss
AFFINE = "affine"  # S <- M S + X with a learned M: a gradient step only in special cases
# the state is a fast net's parameters and the step one of a named inner optimiser on its loss
# over a mini-batch or a window of tokens (cells/deep)
INNER = "inner optimiser"
STEPS: tuple[str, ...] = (GRADIENT, GRADIENT_STEPS, IMPLICIT, MOMENTUM, MINIMISER, AFFINE, INNER)

# How a span of tokens acts on the state it starts from (what its chunk summary holds,
# cells/chunked/summary.py): S_end = transition(S_start) + contribution, where
LEFT = "left matrix"  # M [R, R] S: the parts stacked along their rows (R = K, or 2K for S; M)
RIGHT = "right matrix"  # S M, M [V, V]: the rows of S evolve apart (Oja's rule)
DECAY = "decay"  # f S, f one factor per head or per key row, applied to every part
LOG_SCALE = "log scale"  # e^{F + m - m'} S with the state's log scale m (mLSTM's stabiliser)
# the update is not affine in the state (a fast net trained by an inner optimiser, cells/deep):
# a span has no summary, and the cell cannot split a sequence over context
NOT_AFFINE = "not affine"
TRANSITIONS: tuple[str, ...] = (LEFT, RIGHT, DECAY, LOG_SCALE, NOT_AFFINE)


@dataclass(frozen=True)
class Gate:
    """One gate input of a cell. `optional`: the cell runs without it (delta_product's decay,
    turned on by model.product_decay). `times`: the layer multiplies the gate by the gate of
    that name, listed before it in GATE_SPECS (dplr's b = -rate * a: RWKV-7's tie of the
    low-rank pair, which keeps the transition from expanding), or KEY: the gate times the key
    (Comba's p = c * k, which keeps its transition from expanding likewise). `start`: a static
    gate's value before training, as its raw parameter (None: 0; LayerNorm weights start at 1)."""

    name: str
    shape: str = PER_TOKEN
    range: str = REAL
    per_sub_step: bool = False
    optional: bool = False
    times: str | None = None
    start: float | None = None

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"gate {self.name!r}: unknown shape {self.shape!r}; valid: {SHAPES}")
        if self.range not in RANGES:
            raise ValueError(f"gate {self.name!r}: unknown range {self.range!r}; valid: {RANGES}")
        if self.per_sub_step and self.shape != PER_TOKEN:
            raise ValueError(f"gate {self.name!r}: only per-token gates can be per sub-step")
        if self.range == DIRECTION and self.shape != PER_TOKEN_KEY:
            raise ValueError(f"gate {self.name!r}: a direction needs the shape {PER_TOKEN_KEY!r}")

    @property
    def takes_per_key(self) -> bool:
        """Whether model.decay=per_key may give this gate a key axis."""
        return self.shape == SCALAR_OR_PER_KEY

    def head_shape(
        self, H: int, K: int, N: int, per_key: bool, V: int | None = None
    ) -> tuple[int, ...]:
        """The gate's shape after [B, T] ([H, K] whole for a static gate): per_key chooses for
        a gate that takes either a scalar or a per-key decay; N counts sub-steps; V is needed
        for a per-value gate only."""
        if self.shape == PER_TOKEN_VALUE:
            if V is None:
                raise ValueError(f"gate {self.name!r} is per value: its shape needs V")
            return (H, V)
        if self.shape in (PER_TOKEN_KEY, STATIC) or (self.takes_per_key and per_key):
            return (H, K)
        return (H, N) if self.per_sub_step else (H,)


def gate_names(specs: tuple[Gate, ...]) -> tuple[str, ...]:
    return tuple(gate.name for gate in specs)


def tie(specs: tuple[Gate, ...], gates: dict, k=None) -> dict:
    """The gates with each one that names `times` multiplied by that gate (in spec order), or
    by the keys k [B, T, H, K] where it names KEY."""
    gates = dict(gates)
    for gate in specs:
        if gate.times == KEY:
            gates[gate.name] = gates[gate.name] * k
        elif gate.times is not None:
            gates[gate.name] = gates[gate.name] * gates[gate.times]
    return gates


@dataclass(frozen=True)
class State:
    """The fast-weight state of one head: named parts with their axes after [B, H], e.g.
    (("S", "K V"),) for a matrix; `is_dict` when the cell takes and returns {name: array};
    `transition`: how a span of tokens acts on it (one of TRANSITIONS; every rule whose update
    is S <- A_t S + X_t with A_t independent of S is LEFT)."""

    parts: tuple[tuple[str, str], ...] = (("S", "K V"),)
    is_dict: bool = False
    transition: str = LEFT

    def __post_init__(self):
        if self.transition not in TRANSITIONS:
            raise ValueError(f"unknown transition {self.transition!r}; valid: {TRANSITIONS}")

    def zeros(self, B: int, H: int, K: int, V: int, dtype=jnp.float32):
        """The zero state (the cell's state=None) as an array or a dict of arrays."""
        sizes = {"K": K, "V": V}
        arrays = {
            name: jnp.zeros((B, H, *(sizes[a] for a in axes.split())), dtype)
            for name, axes in self.parts
        }
        return arrays if self.is_dict else arrays[self.parts[0][0]]

    def floats(self, K: int, V: int) -> int:
        """Floats per head."""
        sizes = {"K": K, "V": V}
        return sum(math.prod(sizes[a] for a in axes.split()) for _, axes in self.parts)

    def size(self) -> str:
        """Floats per head as a formula, e.g. "K V", "2 K V", "K^2 + K V", "K V + K + 1"."""
        counts: dict[str, int] = {}
        for _, axes in self.parts:
            term = _monomial(axes.split())
            counts[term] = counts.get(term, 0) + 1
        return " + ".join(term if n == 1 else f"{n} {term}" for term, n in counts.items())

    def describe(self) -> str:
        """E.g. "S [K, V]" or "S [K, V], M [K, V]"."""
        return ", ".join(f"{name} [{', '.join(axes.split())}]" for name, axes in self.parts)


def _monomial(letters: list[str]) -> str:
    """["K", "V"] -> "K V", ["K", "K"] -> "K^2", [] -> "1"."""
    if not letters:
        return "1"
    if len(letters) > 1 and len(set(letters)) == 1:
        return f"{letters[0]}^{len(letters)}"
    return " ".join(letters)


@dataclass(frozen=True)
class Objective:
    """The local objective a rule optimises at every token, and how.

    loss_fn(S [K, V], k [K], v [V]) -> scalar is the per-head loss whose gradient the step takes
    (gradient-type steps; None for the exact minimiser, whose objective spans the whole past).
    lr names the gate that scales the step (None: 1); decay the log-decay gate applied first,
    S <- exp(decay) S (weight decay as a shrinkage step); momentum and momentum_lr the momentum's
    log decay and the gate scaling the gradient into it. `weights`: the key of a dict state the
    loss is on (None: the state is the weight matrix itself). `unit_values`: the step contracts
    only for L2-normalised values, which the layer then feeds it (Oja's values play the delta
    rule's keys). `log_scale`: the key of a dict state's log scale m (mLSTM's stabiliser): the
    weights are then e^m state[weights], and lr names a log learning rate. MINIMISER and AFFINE
    rules have no per-token loss_fn."""

    update: str
    loss: str
    step: str
    paper: str
    loss_fn: Callable | None = None
    lr: str | None = None
    decay: str | None = None
    momentum: str | None = None
    momentum_lr: str | None = None
    state: State = State()
    weights: str | None = None
    unit_values: bool = False
    log_scale: str | None = None

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"unknown step kind {self.step!r}; valid: {', '.join(STEPS)}")
        if self.step not in (MINIMISER, AFFINE) and self.loss_fn is None:
            raise ValueError(f"a {self.step!r} step needs loss_fn")

    def describe_step(self) -> str:
        """The step in words, e.g. "decay exp(log_alpha), then gradient step (lr beta)"."""
        if self.step == MOMENTUM:
            return (
                f"momentum: M <- exp({self.momentum}) M + {self.momentum_lr} grad, "
                f"S <- exp({self.decay}) S - {self.lr} M"
            )
        words = {
            GRADIENT: "gradient step",
            GRADIENT_STEPS: "N gradient steps",
            IMPLICIT: "implicit step",
            MINIMISER: "exact minimiser",
            AFFINE: "affine map",
            INNER: "inner optimiser step",
        }[self.step]
        if self.loss_fn is negative_correlation:
            words = "Hebbian " + words
        words += f" (lr {self.lr})" if self.lr else ""
        return f"decay exp({self.decay}), then {words}" if self.decay else words


# The two losses of the delta-rule family and of the sum rule, per head: S [K, V], k [K], v [V].


def squared_error(S, k, v):
    """1/2 ||S^T k - v||^2: the delta rule's regression of values on keys."""
    return 0.5 * jnp.sum(jnp.square(S.T @ k - v))


def negative_correlation(S, k, v):
    """-v^T S^T k: linear, so its gradient -k v^T does not depend on S (the sum rule)."""
    return -(v @ (S.T @ k))
