"""The mixer contract: the base every token mixer implements, its typed config, its caches and
the description of what it keeps.

Every mixer maps x [B, T, D] -> [B, T, D] and offers (see Mixer):

    mixer(x, reset=None, return_intermediates=False)   full forward (and scalar intermediates)
    mixer.init_cache(batch_size, max_len)              a StateCache or a KVCache
    mixer.prefill(x, cache, reset=None)                the full-sequence form from the cache
    mixer.decode_step(x [B, D], cache, reset=None)     one token -> (y [B, D], cache)
    mixer.inspect_step(x [B, D], cache, reset=None)    decode_step plus the token's gates
    mixer.fast_weights(cache)                          the matrix the layer writes, or None
    mixer.describe()                                   a Description (no parameters needed:
                                                       mixer.cfg.describe() is the same)

Each mixer reads a typed view of the model config, its own MixerConfig subclass that lists exactly
the fields it reads, with head sizes resolved once and every check of those fields in its
`check`. The view is also where a field only that mixer reads is declared, with its default and
domain; a field several mixers read is declared once in fwpzoo.layers.fields.SharedFields, and
the model config is assembled from these declarations (fwpzoo.models.config). MixerConfig.of
builds a view from any object with those attributes (a layer's ModelConfig) by one rule for all
mixers:

- a field set for the layer itself (`explicit`: the keys of its entry in model.mixers) is taken as
  given, and a value the mixer cannot take is refused;
- a model-wide field is the default of every layer that reads it; where it is still the model
  config's default and the mixer has a default of its own (DEFAULTS: srwm's probability feature
  map), the mixer's is taken;
- forms: a mixer says which forms it has (`forms`); a model-wide `form` it does not have runs its
  exact sequential form, `recurrent`, and the view keeps a one-line `note` saying so, which the
  run prints once (ModelConfig.notes).

Dimension letters: B batch, T time, H heads, K key (feature) dim, V value dim, D model width.
"""

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo import cells
from fwpzoo.layers.fields import SharedFields

SEQUENTIAL = "recurrent"  # the exact sequential form every mixer with forms has


@dataclass(frozen=True)
class Description:
    """What a layer is and what it keeps, from its config alone (record labels, reports).

    mixer:        the registry name (fwp, attention, mamba2, ssm, plastic, rdn, srwm)
    rule:         how the state is written: the cell family for fwp and mamba2
                  (mamba2: gated_linear_attn), recurrent_delta, srwm, plastic_{site}_{rule},
                  kv_cache for attention, diagonal_linear for ssm
    feature_dim:  the size of the key axis the state is addressed by, after the feature map (K
                  of S [H, K, V]); attention's key head dim; None for the ssm (a vector state)
    heads:        heads with a state of their own (value heads where grouped); 1 for the ssm
    state_size:   numbers per sequence the layer keeps to process the next token, whatever came
                  before: its recurrent state (all parts of a dict state, a complex number
                  counted as two), not the short-conv buffer; 0 for attention
    per_token:    numbers per sequence the state grows by with each token: attention's keys and
                  values, G (K + V); 0 for every constant-size mixer
    form:         the form the layer runs over a sequence (None where the mixer has no forms)
    """

    mixer: str
    rule: str
    feature_dim: int | None
    heads: int
    state_size: int
    per_token: int = 0
    form: str | None = None

    def size_at(self, seq_len: int) -> int:
        """Numbers kept per sequence after seq_len tokens: state_size + seq_len * per_token."""
        return self.state_size + seq_len * self.per_token


class StateCache(NamedTuple):
    """The decoding cache of every mixer with a constant-size state: the rule's state (an array,
    or the cell's dict of arrays; float32, complex64 for a complex ssm) and the short
    convolution's buffer [B, W - 1, C] (None without one)."""

    state: Any
    conv: Any = None


class KVCache(NamedTuple):
    """Attention's decoding cache: k [B, L, G, K], v [B, L, G, V] for L = max_len slots, the next
    slot pos (int32 scalar) and each row's current segment start [B] int32."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    start: jax.Array


def floats_of(tree) -> int:
    """Numbers in a pytree of arrays or shapes per batch row (axis 0 dropped); a complex
    number counts as two."""
    leaves = jax.tree.leaves(tree)
    return sum(
        math.prod(x.shape[1:]) * (2 if jnp.issubdtype(x.dtype, jnp.complexfloating) else 1)
        for x in leaves
    )


@dataclass(frozen=True, kw_only=True)
class MixerConfig(ABC):
    """A mixer's typed view of the model config: a subclass lists the fields its mixer reads.

    A field only this mixer reads is declared here, with its default (and a comment saying what
    it is): the model config takes its type and default from the view. A field listed without a
    default is one the view reads from a declaration elsewhere: fwpzoo.layers.fields.SharedFields
    (several mixers read it) or the model's own fields (d_model, norm_eps, zero_centred_norm).
    Subclasses are kw_only dataclasses too, so the two kinds may come in any order.

    Subclasses set MIXER (the registry name), CHOICES ({field: its valid names}), MINIMUM
    ({field: its smallest value; None passes}) and ABOVE ({field: a bound its value must exceed;
    None passes}): the domain of each field it declares (a shared field's is SharedFields'),
    which the model config checks wherever the field is set, read or not. They may set DEFAULTS
    ({field: the mixer's own default where it differs from the model config's}), and define
    `check` (ValueError naming the model.<field> for a combination this mixer cannot take),
    `resolve` (sizes derived once), `forms` (for a mixer with a `form` field) and `describe`.
    How the mesh splits a layer is read from its view too: mesh.tensor splits the heads fields
    it reads (num_heads, num_kv_heads, num_value_heads), and CONTEXT_IN_CHUNKS and
    `context_refusal` say how its sequence splits over mesh.context.
    `note` is set by `of` where the model-wide form fell back."""

    MIXER: ClassVar[str] = ""
    # True where its sequence splits over mesh.context as its chunkwise form runs it: each
    # device holds whole chunks of chunk_size and the short conv's (conv_size - 1)-token halo
    CONTEXT_IN_CHUNKS: ClassVar[bool] = False
    CHOICES: ClassVar[dict[str, Any]] = {}
    MINIMUM: ClassVar[dict[str, int]] = {}
    ABOVE: ClassVar[dict[str, float]] = {}
    DEFAULTS: ClassVar[dict[str, Any]] = {}

    d_model: int
    note: str | None = field(default=None, kw_only=True, compare=False)

    def __post_init__(self):
        self.check()

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The model config fields this mixer reads."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "note")

    @classmethod
    def declared(cls) -> tuple[dataclasses.Field, ...]:
        """The fields this view declares: those only its mixer reads, each with its default."""
        return tuple(
            f
            for f in dataclasses.fields(cls)
            if f.name != "note" and f.default is not dataclasses.MISSING
        )

    @classmethod
    def domain(cls) -> tuple[dict, dict, dict]:
        """The domain of every field this mixer reads, as check_domain takes it: (choices,
        minimum, above), the shared fields' from SharedFields and its own from the view."""
        names = set(cls.names())
        shared = [
            {name: valid for name, valid in table.items() if name in names}
            for table in (SharedFields.CHOICES, SharedFields.MINIMUM)
        ]
        return shared[0] | cls.CHOICES, shared[1] | cls.MINIMUM, dict(cls.ABOVE)

    @classmethod
    def of(cls, source, explicit=frozenset()):
        """This view of `source` (a layer's ModelConfig, or any object with these fields), by the
        rule in the module docstring; `explicit`: the fields set for the layer itself."""
        if isinstance(source, cls):
            return source
        values = cls._read(source, explicit)
        check_domain(values, *cls.domain())
        values = cls.resolve(values)
        note = cls._settle_form(values, explicit) if "form" in values else None
        return cls(**values, note=note)

    @classmethod
    def _read(cls, source, explicit) -> dict:
        """The fields of `source` this mixer reads; the mixer's own default (DEFAULTS) for a
        field not set for the layer whose value is still the model config's default."""
        model_defaults = (
            {f.name: f.default for f in dataclasses.fields(source)}
            if dataclasses.is_dataclass(source)
            else {}
        )
        values = {}
        for name in cls.names():
            value = getattr(source, name)
            own = name in cls.DEFAULTS and name not in explicit
            if own and value == model_defaults.get(name, cls.DEFAULTS[name]):
                value = cls.DEFAULTS[name]
            values[name] = value
        return values

    @classmethod
    def _settle_form(cls, values: dict, explicit) -> str | None:
        """A form the mixer has not: refused where set for the layer, else values["form"] becomes
        the recurrent form and the note saying so is returned (None where the form is had)."""
        form, has = values["form"], cls.forms(values)
        if form in has:
            return None
        what = f"the {cls.MIXER} mixer{cls.kind(values)}"
        if "form" in explicit:
            raise ValueError(
                f"model.form {form!r}: {what} has no such form; its forms: {', '.join(has)}"
            )
        values["form"] = SEQUENTIAL
        return (
            f"model.form={form}: {what} has no {form} form (its forms: {', '.join(has)}), so "
            f"it runs {SEQUENTIAL}"
        )

    @classmethod
    def resolve(cls, values: dict) -> dict:
        """The values with anything derived resolved once; the default, which a mixer with more
        to resolve extends: the head sizes of a mixer that reads key_dim or value_dim."""
        return head_sizes(values)

    @classmethod
    def forms(cls, values: dict) -> tuple[str, ...]:
        """The forms this mixer has for these field values (only mixers with a `form` field)."""
        return (SEQUENTIAL,)

    @classmethod
    def kind(cls, values: dict) -> str:
        """Words after the mixer's name in a message about its forms, e.g. " (cell oja)"."""
        return ""

    def check(self) -> None:
        """ValueError (one line naming model.<field>) for values this mixer cannot take; the
        default: none beyond the fields' domains."""
        return None

    def context_refusal(self, where: str) -> str | None:
        """Why a layer of this config cannot split its sequence over mesh.context: one line
        beginning with `where` (e.g. "model.mixers[0]") and saying what would work; None where
        it can (the default: fwpzoo.layers.context splits it, or it gathers what it needs)."""
        return None

    def sequential_refusal(self, where: str) -> str:
        """The refusal of a layer whose every token reads the state the previous token left
        through a nonlinearity: no summary of a span of its tokens composes."""
        return (
            f"{where} ({self.MIXER}) is sequential by nature (each token reads the state "
            f"through a nonlinearity) and cannot split its sequence: use mesh.context=1"
        )

    @abstractmethod
    def describe(self) -> Description:
        """What a layer of this config is and keeps: see Description."""


def head_sizes(values: dict) -> dict:
    """key_dim and value_dim, where the values have them, resolved: None means
    d_model // num_heads (ValueError where that does not divide)."""
    for key in ("key_dim", "value_dim"):
        if key in values and values[key] is None:
            H, D = values["num_heads"], values["d_model"]
            if H < 1 or D % H:
                raise ValueError(
                    f"model.{key}=None needs d_model ({D}) divisible by num_heads ({H})"
                )
            values[key] = D // H
    return values


def check_domain(values: dict, choices: dict, minimum: dict, above: dict) -> None:
    """ValueError (one line naming model.<field>) for a value outside its field's domain: a name
    not among its choices, a size below its minimum, a number not above its bound (None
    passes)."""
    for name, valid in choices.items():
        if name in values and values[name] not in valid:
            raise ValueError(
                f"unknown model.{name} {values[name]!r}; valid choices: {', '.join(valid)}"
            )
    for name, smallest in minimum.items():
        value = values.get(name)
        if value is not None and value < smallest:
            raise ValueError(f"model.{name} must be >= {smallest}, got {value}")
    for name, bound in above.items():
        value = values.get(name)
        if value is not None and not value > bound:
            raise ValueError(f"model.{name} must be > {bound}, got {value}")


def check_decay_init(view) -> None:
    """decay_a_range and decay_dt_range (every log decay's start, Mamba-2's): [low, high] with
    0 < low <= high."""
    for key in ("decay_a_range", "decay_dt_range"):
        low_high = getattr(view, key)
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
            raise ValueError(
                f"model.{key} must be [low, high] with 0 < low <= high, got {low_high}"
            )


class Mixer(nnx.Module):
    """The base of every mixer: the contract in the module docstring.

    A subclass sets Config (its MixerConfig) and HAS_FAST_WEIGHTS, builds its parameters from
    `self.cfg` (set by Mixer.__init__ from whatever config it is given), and defines
    _sequence(x, cache, reset) -> (y [B, T, D], cache, stats) (cache None: from the start),
    init_cache and inspect_step; it overrides fast_weights where it has a matrix to show.
    """

    Config: ClassVar[type[MixerConfig]] = MixerConfig
    HAS_FAST_WEIGHTS: ClassVar[bool] = False

    def __init__(self, cfg):
        self.cfg = self.Config.of(cfg)

    def __call__(self, x, *, reset=None, return_intermediates: bool = False):
        """x [B, T, D], reset [B, T] bool or None -> y [B, T, D] (and a dict of scalar
        intermediates when asked)."""
        y, _, stats = self._sequence(x, None, reset)
        return (y, stats) if return_intermediates else y

    def prefill(self, x, cache, reset=None):
        """The full-sequence form over x [B, T, D] from the cache (reset [B, T] bool or None)
        -> (y [B, T, D], cache)."""
        y, cache, _ = self._sequence(x, cache, reset)
        return y, cache

    def decode_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] bool or None) -> (y [B, D], cache)."""
        y, cache, _ = self.inspect_step(x, cache, reset)
        return y, cache

    def fast_weights(self, cache):
        """The fast weights [B, H, K, V] of a cache; None for a mixer without a matrix state."""
        del cache
        return None

    def describe(self) -> Description:
        """What this layer is and keeps: see Description."""
        return self.cfg.describe()


class FixedRandom(nnx.Variable):
    """A random constant drawn at init (FAVOR+ projection): saved with the model, never trained."""


def mean_state_norm(state):
    """Mean over batch and heads of the Frobenius norm of S [B, H, K, V]."""
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(state), axis=(-2, -1))))


def cell_zero_state(cell: str, batch_size: int, H: int, K: int, V: int, options: dict):
    """A cell's state before any token: OBJECTIVE.state's zeros, or the cell's start_state where
    it depends on the options (cells/deep's fast nets)."""
    module = cells.get(cell)
    start = getattr(module, "start_state", None)
    if start is None:
        return module.OBJECTIVE.state.zeros(batch_size, H, K, V)
    return start(batch_size, H, K, V, **options)


def cell_fast_weights(cell: str, state):
    """The weight matrix of a cell's state [B, H, K, V] (the objective's part of a dict; for a
    fast net without it, cells/deep's MLP and SwiGLU, its first layer [B, H, K, F])."""
    if not isinstance(state, dict):
        return state
    module = cells.get(cell)
    name = module.OBJECTIVE.weights or module.OBJECTIVE.state.parts[0][0]
    return state[name] if name in state else state["W1"]


class CellMixer(Mixer):
    """The base of the mixers built on a cell of fwpzoo.cells (fwp and mamba2).

    A subclass sets cell (the family's name), H, K, V, options (pairs of the cell's static
    arguments) and conv (a ShortConv or None), and defines inspect_step, cell_inputs and
    _run(x, state, buffer, reset) -> (y [B, T, D], state, buffer, stats), which runs the
    configured form from the cell's `state` and the conv `buffer`, with segment resets [B, T] (or
    None) in both.
    """

    HAS_FAST_WEIGHTS = True

    def init_cache(self, batch_size: int, max_len: int) -> StateCache:
        """Constant size whatever max_len: the cell's zero state and the conv buffer."""
        del max_len
        state = cell_zero_state(self.cell, batch_size, self.H, self.K, self.V, dict(self.options))
        buffer = None if self.conv is None else self.conv.init_buffer(batch_size)
        return StateCache(state, buffer)

    def fast_weights(self, cache: StateCache):
        """The fast weights S [B, H, K, V] of a cache."""
        return cell_fast_weights(self.cell, cache.state)

    def _sequence(self, x, cache, reset):
        state, buffer = (None, None) if cache is None else cache
        y, state, buffer, stats = self._run(x, state, buffer, reset)
        return y, StateCache(state, buffer), stats
