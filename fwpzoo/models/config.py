"""The model's part of the config: one frozen dataclass, every field typed and defaulted.

ModelConfig's fields have three homes, and model_config_class assembles them when the class is
built: the model's own fields (ModelBase below: the layer list, d_model, the embedding and head,
the block around each mixer), the fields several mixers read (fwpzoo.layers.fields.SharedFields)
and the fields one mixer alone reads (its view, a MixerConfig in fwpzoo/layers/, found through
the registry fwpzoo.layers.MIXERS). So a new mixer with new fields touches fwpzoo/layers/ and its
registry line only; its fields are flat YAML keys and `model.<field>=value` overrides like all
others.
"""

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fwpzoo.layers import MIXERS, Mixer, MixerConfig, mixer_config
from fwpzoo.layers.base import check_domain
from fwpzoo.layers.fields import SharedFields


def _one_of(key: str, value: str, valid) -> None:
    if value not in valid:
        choices = ", ".join(valid)
        raise ValueError(f"unknown model.{key} {value!r}; valid choices: {choices}")


# Fields one layer cannot set for itself: the layer list, the residual stream's width, and the
# embedding and head around the blocks.
MODEL_WIDE: tuple[str, ...] = ("mixers", "d_model", "vocab_size", "tie_embeddings")
# Fields the block reads around its mixer (norms, MLP, remat): any layer may set them.
BLOCK_FIELDS: tuple[str, ...] = (
    "mlp_ratio",
    "mlp_hidden",
    "moe_experts",
    "moe_top_k",
    "moe_norm_top_k",
    "moe_shared_hidden",
    "norm_eps",
    "zero_centred_norm",
    "block_norm",
    "remat",
)
BLOCK_NORMS: tuple[str, ...] = ("pre", "post")
REMATS: tuple[str, ...] = ("none", "block", "mixer")


def _domains() -> tuple[dict, dict, dict]:
    """Every mixer's field domains merged: ({field: valid names}, {field: smallest value},
    {field: the bound it must exceed})."""
    choices, minimum, above = {}, {}, {}
    for mixer in MIXERS.values():
        mixer_choices, mixer_minimum, mixer_above = mixer.Config.domain()
        choices |= mixer_choices
        minimum |= mixer_minimum
        above |= mixer_above
    return choices, minimum, above


def _positive(key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"model.{key} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class ModelBase:
    """A causal LM: embed -> blocks (norm -> mixer -> residual -> norm -> MLP -> residual) -> head.

    `mixers` gives the mixer of each layer in order, so a hybrid is one list; its length is the
    number of layers. An entry is a mixer name, or a mapping with a `mixer` key and any other
    fields of this config for that layer only, e.g.
    [{"mixer": "fwp", "cell": "gated_delta_rule"}, {"mixer": "fwp", "cell": "delta_rule"},
    "attention"]. `layers()` resolves the entries into one config per layer, and
    `mixer_configs()` into each layer's mixer view (fwpzoo.layers.base.MixerConfig).

    Who checks what: a value outside its field's domain (a name not among its choices, a size
    below its minimum) is refused here wherever it is set; a combination a mixer cannot take is
    refused by that mixer's view, for the layers that read it. A per-layer field the layer's
    mixer (or its block) does not read is refused. A model-wide field is the default of every
    layer that reads it and inert for the others, so one config serves any mixer list; a
    model-wide form a mixer does not have runs its recurrent form, named once by `notes()`.

    The fields below are the model's own; ModelConfig (model_config_class) adds every
    registered mixer's, declared in fwpzoo/layers/ (see the module docstring).
    """

    # each a name (fwp, attention, mamba2, ssm, plastic, rdn, srwm) or
    # {"mixer": name, field: value, ...}
    mixers: tuple[str | Mapping, ...] = ("fwp", "fwp")
    d_model: int = 64
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio * d_model (0 disables the MLP)
    mlp_hidden: int | None = None  # SwiGLU hidden width, given as is (overrides mlp_ratio)
    # a sparse mixture of moe_experts SwiGLU experts of that width in place of the MLP (0: the
    # dense MLP): the top moe_top_k by router probability, renormalised with moe_norm_top_k,
    # plus a shared expert of width moe_shared_hidden behind a sigmoid gate (0: none); Qwen3-Next
    moe_experts: int = 0
    moe_top_k: int = 1
    moe_norm_top_k: bool = True
    moe_shared_hidden: int = 0
    # the token vocabulary of the embedding and head; None: the task's. It may exceed the
    # task's (released models pad theirs), never fall short of it
    vocab_size: int | None = None
    tie_embeddings: bool = False  # the head reads the embedding matrix (no head parameter)
    # every RMSNorm of the blocks, the final norm and attention's q/k norms: its epsilon, and
    # zero-centred (scale 1 + weight, weight starting at 0: Qwen3.5) or not (scale = weight)
    norm_eps: float = 1e-6
    zero_centred_norm: bool = False
    # pre: x + mixer(norm(x)) and x + mlp(norm(x)); post (OLMo 2): x + norm(mixer(x)), and so on
    block_norm: str = "pre"
    # activation checkpointing: none; block (each block's activations recomputed in the backward
    # pass from its input); mixer (only the mixer's)
    remat: str = "none"

    def __post_init__(self):
        if not self.mixers:
            raise ValueError("model.mixers is empty; name one mixer per layer")
        self._check_fields()
        self.mixer_configs()  # every layer's mixer checks the fields it reads

    def mixer_configs(self) -> tuple[MixerConfig, ...]:
        """The typed view of each layer's mixer, built from exactly the fields that layer sees
        (its own fields set explicitly); a ValueError naming the layer and key otherwise."""
        return tuple(self._mixer_config(i, entry) for i, entry in enumerate(self.mixers))

    def notes(self) -> tuple[str, ...]:
        """One line for each thing the layers run otherwise than the model-wide fields say (a
        model-wide form a mixer does not have), naming the layers; what a run prints once."""
        layers: dict[str, list[int]] = {}
        for i, view in enumerate(self.mixer_configs()):
            if view.note is not None:
                layers.setdefault(view.note, []).append(i)
        return tuple(f"model.mixers{indices}: {note}" for note, indices in layers.items())

    def _mixer_config(self, i: int, entry) -> MixerConfig:
        layer = self._layer(i, entry)
        explicit = frozenset(entry) - {"mixer"} if isinstance(entry, Mapping) else frozenset()
        try:
            return mixer_config(layer.mixers[0], layer, explicit)
        except ValueError as error:
            raise ValueError(self._named(i, entry, str(error))) from None

    def _named(self, i: int, entry, message: str) -> str:
        """A layer's error named by the layer: its own fields as model.mixers[i].<field>; a
        model-wide field's, in a model of several layers, prefixed by the layer."""
        where = f"model.mixers[{i}]"
        if isinstance(entry, Mapping):
            named = message.replace("model.", f"{where}.")
            return named if named != message else f"{where}: {message}"
        return f"{where} ({entry}): {message}" if len(self.mixers) > 1 else message

    def layers(self) -> tuple["ModelConfig", ...]:
        """The config of each layer: this one with the layer's own fields applied and
        `mixers` = (its mixer name,); a ValueError naming the layer index and key otherwise."""
        return tuple(self._layer(i, entry) for i, entry in enumerate(self.mixers))

    def _layer(self, i: int, entry) -> "ModelConfig":
        where = f"model.mixers[{i}]"
        if not isinstance(entry, Mapping):
            _one_of(f"mixers[{i}]", entry, MIXERS)
            if len(self.mixers) == 1:
                return self
            return dataclasses.replace(self, mixers=(entry,))
        fields = dict(entry)
        if "mixer" not in fields:
            raise ValueError(f"{where} has no 'mixer' key; give one of: {', '.join(MIXERS)}")
        name = fields.pop("mixer")
        if not isinstance(name, str):
            raise ValueError(f"{where}.mixer: expected a string, got {name!r}")
        _one_of(f"mixers[{i}].mixer", name, MIXERS)
        valid = [f.name for f in dataclasses.fields(self) if f.name not in MODEL_WIDE]
        reads = (*MIXERS[name].Config.names(), *BLOCK_FIELDS)
        for key in fields:
            if key in MODEL_WIDE:
                raise ValueError(f"{where}.{key} cannot be set per layer; set model.{key}")
            if key not in valid:
                raise ValueError(
                    f"unknown key {where}.{key}; valid keys: mixer, {', '.join(valid)}"
                )
            if key not in reads:
                own = [key for key in reads if key not in MODEL_WIDE]
                raise ValueError(
                    f"{where}.{key} is not read by the {name} mixer or its block; its keys: "
                    f"mixer, {', '.join(own)}"
                )
        try:  # the layer's own fields pass the same checks, named by the layer, in one step so
            # every check sees the layer's values, not the model-wide ones they replace
            return dataclasses.replace(self, mixers=(name,), **fields)
        except ValueError as error:
            raise ValueError(self._named(i, entry, str(error))) from None

    def _check_fields(self) -> None:
        """The domain of every field, read by a layer or not, and the block's own fields."""
        check_domain(dataclasses.asdict(self), *_domains())
        _one_of("remat", self.remat, REMATS)
        _one_of("block_norm", self.block_norm, BLOCK_NORMS)
        for key in ("vocab_size",):
            _positive(key, getattr(self, key))
        _positive("mlp_hidden", self.mlp_hidden, minimum=0)
        for key in ("moe_experts", "moe_shared_hidden"):
            _positive(key, getattr(self, key), minimum=0)
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(
                f"model.moe_top_k must be in 1..moe_experts={self.moe_experts}, got "
                f"{self.moe_top_k}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be > 0, got {self.norm_eps}")
        if self.mlp_ratio < 0:
            raise ValueError(f"model.mlp_ratio must be >= 0, got {self.mlp_ratio}")


def mixer_fields(registry: Mapping[str, type[Mixer]]) -> dict[str, tuple[Any, Any]]:
    """{field: (type, default)} of every field a registered mixer reads that the model does not
    declare itself, in the registry's order: a field several mixers read from SharedFields, one
    a mixer alone reads from its view. A TypeError (the maintainer's, at import) for a field
    declared twice or read but declared nowhere."""
    model = {f.name for f in dataclasses.fields(ModelBase)}
    shared = {f.name: f for f in dataclasses.fields(SharedFields)}
    fields: dict[str, tuple[Any, Any]] = {}
    owner: dict[str, str] = {}
    for name, mixer in registry.items():
        view = mixer.Config
        hints = typing.get_type_hints(view)
        declared = {f.name: f for f in view.declared()}
        for key in view.names():
            where = f"{view.__name__}.{key} (the {name} mixer's view)"
            if key in declared:
                if key in model or key in shared or key in owner:
                    other = "the model" if key in model else owner.get(key, "SharedFields")
                    raise TypeError(
                        f"{where} declares model.{key}, already declared by {other}; declare a "
                        "field several mixers read once, in fwpzoo.layers.fields.SharedFields, "
                        "and list it in the views without a default"
                    )
                fields[key], owner[key] = (hints[key], declared[key].default), name
            elif key in shared:
                fields.setdefault(key, (shared[key].type, shared[key].default))
            elif key not in model:
                raise TypeError(
                    f"{where} reads model.{key}, declared nowhere: give it a default in the view "
                    "(a field only this mixer reads) or declare it in "
                    "fwpzoo.layers.fields.SharedFields"
                )
    return fields


def model_config_class(registry: Mapping[str, type[Mixer]] = MIXERS) -> type[ModelBase]:
    """ModelConfig for the mixers of `registry`: ModelBase's fields, then mixer_fields'."""
    fields = mixer_fields(registry)
    namespace = {
        "__module__": __name__,
        "__qualname__": "ModelConfig",
        "__doc__": ModelBase.__doc__,
        "__annotations__": {key: tp for key, (tp, _) in fields.items()},
        **{key: default for key, (_, default) in fields.items()},
    }
    return dataclass(frozen=True)(type("ModelConfig", (ModelBase,), namespace))


ModelConfig = model_config_class()
