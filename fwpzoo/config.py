"""The run config: typed frozen dataclasses, read from YAML, changed by `key=value` overrides.

A run is `Config(model, data, train, checkpoint, eval)`. Every value is typed by its field, both in
YAML and in overrides: `train.learning_rate=3e-4` is a float (PyYAML alone would read `3e-4` as a
string), `model.mixers=[fwp,attention]` a tuple, `model.key_dim=null` None. A mapping inside a
section's field holds per-item values of that section's own fields (a layer's mixer fields in
`model.mixers=[{mixer: fwp, cell: delta_rule}, attention]`), typed by those fields the same way.
Every float must be finite, whatever its field: a NaN or inf setting would only show up as a
diverged run. Reading the file itself (and refusing alias bombs, duplicate keys, empty files,
unknown sections) happens in fwpzoo.config_file, before JAX is imported.

Why a small schema-driven decoder and not draccus: draccus parses argparse-style `--key=value`
flags, prints a multi-line usage text on an unknown key, and splits a bare string given for a tuple
field into characters (`--model.mixers=fwp` becomes ('f', 'w', 'p')); the `key=value` syntax and
the one-line error contract are simpler to keep with the ~100 lines below.
"""

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fwpzoo.config_file import (
    SECTIONS,
    ConfigError,
    apply_overrides,
    parse_yaml,
    read_config_file,
)
from fwpzoo.data.config import DataConfig
from fwpzoo.models.config import ModelConfig

COMPUTE_DTYPES = ("float32", "bfloat16")
# Keys that may differ from the stored config when a run is resumed: they change how long the run
# goes and what it records, not the trajectory of steps already taken.
RUN_LENGTH_KEYS = (
    "train.steps",
    "train.log_every",
    "train.stall_timeout",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "eval.every",
    "eval.num_batches",
    "eval.lengths",
)
# Keys that may also differ on resume: where the same computation runs (the device mesh) and what
# it keeps for the backward pass (model.remat). A checkpoint restores onto any mesh.
LAYOUT_KEYS = ("mesh.data", "mesh.fsdp", "mesh.tensor", "mesh.context", "model.remat")
MESH_AXES = ("data", "fsdp", "tensor", "context")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global: split over all devices of all processes
    seed: int = 0  # seeds the parameters and the data stream
    learning_rate: float = 1e-3  # peak of the warmup-cosine schedule
    warmup_steps: int = 100
    end_learning_rate_ratio: float = 0.1  # cosine decays to learning_rate * this at train.steps
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    grad_clip: float = 1.0  # global-norm clipping; 0 disables it
    grad_accum: int = 1  # micro-batches per step, each batch_size / grad_accum sequences
    compute_dtype: str = "float32"  # float32 | bfloat16 (parameters stay float32)
    log_every: int = 50
    # stop at the first eval where this valid-split metric reaches stop_at (None: run all steps)
    stop_metric: str | None = None
    stop_at: float = 1.0
    # seconds without progress (a step, an eval, a save, the first compilation) after which the
    # run names what it was doing and exits (code 4): a deadlock never holds a machine overnight
    stall_timeout: float = 900.0

    def __post_init__(self):
        _require(self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(
            self.learning_rate > 0, f"train.learning_rate must be > 0, got {self.learning_rate}"
        )
        _require(
            self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}"
        )
        _require(
            0 <= self.end_learning_rate_ratio <= 1,
            f"train.end_learning_rate_ratio must be in [0, 1], got {self.end_learning_rate_ratio}",
        )
        _require(
            self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}"
        )
        for name in ("b1", "b2"):  # Adam's moment decays; 1 would never forget, > 1 diverges
            value = getattr(self, name)
            _require(0 <= value < 1, f"train.{name} must be in [0, 1), got {value}")
        _require(self.grad_clip >= 0, f"train.grad_clip must be >= 0, got {self.grad_clip}")
        _require(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _require(
            self.batch_size % self.grad_accum == 0,
            f"train.batch_size={self.batch_size} is not divisible by "
            f"train.grad_accum={self.grad_accum}",
        )
        _require(
            self.compute_dtype in COMPUTE_DTYPES,
            f"unknown train.compute_dtype {self.compute_dtype!r}; "
            f"valid: {', '.join(COMPUTE_DTYPES)}",
        )
        _require(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _require(
            self.stall_timeout > 0, f"train.stall_timeout must be > 0, got {self.stall_timeout}"
        )


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # save every this many steps, and at the last step
    keep: int = 3  # the latest this many are kept, plus the best by best_metric
    best_metric: str | None = "loss"  # a valid-split eval metric; None keeps only the latest
    async_save: bool = True  # write in the background while training goes on

    def __post_init__(self):
        _require(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        _require(self.keep >= 1, f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class EvalConfig:
    # evaluate on the valid split every this many steps, at the last step, and at every checkpoint
    # when checkpoint.best_metric ranks them
    every: int = 500
    batch_size: int = 32
    num_batches: int = 4
    lengths: tuple[int, ...] = ()  # extra sequence lengths to evaluate (length generalisation)

    def __post_init__(self):
        _require(self.every >= 1, f"eval.every must be >= 1, got {self.every}")
        _require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _require(self.num_batches >= 1, f"eval.num_batches must be >= 1, got {self.num_batches}")
        _require(all(n >= 1 for n in self.lengths), f"eval.lengths must be >= 1: {self.lengths}")


@dataclass(frozen=True)
class MeshConfig:
    """The device mesh: batch over data x fsdp, parameters' largest axis over fsdp, heads and the
    MLP's hidden axis over tensor, the sequence over context. One axis may be -1: the devices
    the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    def __post_init__(self):
        for name in MESH_AXES:
            size = getattr(self, name)
            _require(size >= 1 or size == -1, f"mesh.{name} must be >= 1 or -1, got {size}")
        rest = [name for name in MESH_AXES if getattr(self, name) == -1]
        _require(len(rest) <= 1, f"only one mesh axis may be -1, got {', '.join(rest)}")

    def shape(self, devices: int) -> dict[str, int]:
        """{axis: size} over `devices` devices, -1 resolved; ConfigError if they do not match."""
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        fixed = math.prod(size for size in sizes.values() if size != -1)
        rest = [name for name, size in sizes.items() if size == -1]
        if rest and devices % fixed == 0:
            sizes[rest[0]] = devices // fixed
        if math.prod(sizes.values()) != devices:
            given = " x ".join(f"{name}={getattr(self, name)}" for name in MESH_AXES)
            product = f"a multiple of {fixed}" if rest else f"product {fixed}"
            raise ConfigError(
                f"mesh {given} ({product}) does not match the run's {devices} devices; make "
                f"the product {devices} or set one axis to -1 (on a CPU: --cpu-devices N)"
            )
        return sizes


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    def __post_init__(self):
        # ATLAS's Omega window spans past tokens of the training sequence: one longer than the
        # sequence never fills and only costs (the model section alone cannot see data.seq_len)
        seq_len = self.data.seq_len
        layers = zip(self.model.layers(), self.model.mixers, strict=True)
        for i, (layer, entry) in enumerate(layers):
            own = isinstance(entry, Mapping) and "inner_window" in entry  # set per layer
            _require(
                layer.inner_window <= seq_len,
                f"model.{f'mixers[{i}].' if own else ''}inner_window={layer.inner_window} is "
                f"longer than data.seq_len={seq_len}; valid inner_window: 1..{seq_len}",
            )


assert tuple(f.name for f in dataclasses.fields(Config)) == SECTIONS


# ---------------------------------------------------------------------------------------------
# Decoding: a value from YAML (already typed, or a string) or from an override (always a string)
# is checked and converted by the type of its field.

_NULLS = ("null", "none", "~")
_BOOLS = {"true": True, "false": False}


def _describe(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is Mapping:
        return "a mapping"
    if _union_args(tp):
        return " or ".join(_describe(arg) for arg in _union_args(tp))
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(tp, "null" if tp is type(None) else getattr(tp, "__name__", str(tp)))


def _union_args(tp) -> tuple:
    is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
    return typing.get_args(tp) if is_union else ()


def _split_list(text: str) -> list[str]:
    """'[a, b]' or 'a,b' -> ['a', 'b']; '[]' -> []; commas inside {...} or [...] do not split."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items] if text.strip() else []


def _as_mapping(value, key: str):
    """A mapping, or a string in YAML flow style ('{mixer: fwp, cell: delta_rule}') read as one;
    None for anything else."""
    if isinstance(value, str) and value.strip().startswith("{"):
        value = parse_yaml(value, key)  # the config file's strict reader, named by the key
    return value if isinstance(value, Mapping) else None


def _decode_fields(owner, mapping: Mapping, key: str) -> dict:
    """A mapping of per-item values: the keys that are fields of dataclass `owner` typed by them,
    the others kept as given (the owner's own checks name any it does not take)."""
    hints = typing.get_type_hints(owner)
    return {
        name: _decode(hints[name], value, f"{key}.{name}", owner) if name in hints else value
        for name, value in mapping.items()
    }


def _decode(tp, value, key: str, owner=None):
    """`value` converted to type `tp`; a ConfigError naming `key` if it does not fit. `owner` is
    the dataclass whose field is being decoded: a Mapping in it holds that dataclass's fields."""
    fail = ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is Mapping:
        mapping = _as_mapping(value, key)
        if mapping is None or not all(isinstance(name, str) for name in mapping):
            raise fail
        return _decode_fields(owner, mapping, key) if owner is not None else dict(mapping)
    if _union_args(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULLS):
            if type(None) in _union_args(tp):
                return None
            raise fail
        inner = [arg for arg in _union_args(tp) if arg is not type(None)]
        if Mapping in inner and _as_mapping(value, key) is not None:
            return _decode(Mapping, value, key, owner)
        return _decode(inner[0], value, key, owner)
    if typing.get_origin(tp) is tuple:
        (item_type, *_) = typing.get_args(tp)
        if isinstance(value, str):
            value = _split_list(value)
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise fail
        return tuple(_decode(item_type, item, f"{key}[{i}]", owner) for i, item in enumerate(value))
    if tp is bool:
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        if not isinstance(value, bool):
            raise fail
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise fail
        if isinstance(value, str):
            try:
                value = tp(value.strip())
            except ValueError:
                raise fail from None
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise fail
        if not isinstance(value, int | float):
            raise fail
        value = tp(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise fail
        return value
    raise TypeError(f"{key}: field type {tp} is not supported by the config decoder")


def from_dict(cls, data: Mapping, prefix: str = ""):
    """An instance of dataclass `cls` from a nested mapping; missing fields keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in fields:
            section = prefix.rstrip(".") or "the config"
            raise ConfigError(
                f"unknown key {prefix}{key!s}; valid keys in {section}: {', '.join(fields)}"
            )
    values = {key: _decode(hints[key], value, f"{prefix}{key}", cls) for key, value in data.items()}
    try:
        return cls(**values)
    except ValueError as error:  # a section's own checks (__post_init__) refused the values
        raise ConfigError(str(error)) from None


def load(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The Config in YAML file `path` with `overrides` applied; ConfigError if anything is wrong."""
    return from_data(read_config_file(path), overrides)


def from_data(data: dict, overrides: Sequence[str] = ()) -> Config:
    """The Config of a mapping read by read_config_file, with `overrides` applied."""
    return from_dict(Config, apply_overrides(data, overrides))


def to_dict(cfg) -> dict:
    """A JSON-ready nested dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(data: Mapping, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differing_keys(a: Config, b: Config) -> list[str]:
    """Dotted keys whose values differ between two configs, run-length keys left out."""
    flat_a, flat_b = flatten(to_dict(a)), flatten(to_dict(b))
    keys = sorted(set(flat_a) | set(flat_b))
    free = (*RUN_LENGTH_KEYS, *LAYOUT_KEYS)
    return [k for k in keys if flat_a.get(k) != flat_b.get(k) and k not in free]
