"""The run config: YAML + typed overrides, one-line errors, and every committed config loads."""

import dataclasses
import re
from pathlib import Path

import pytest

from fwpzoo.config import (
    Config,
    ConfigError,
    TrainConfig,
    apply_overrides,
    differing_keys,
    from_dict,
    load,
    to_dict,
)
from fwpzoo.train import prepare

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 3e-4\n  steps: 10\nmodel:\n  key_dim: 8\n")
    cfg = load(
        path,
        [
            "train.steps=20",
            "train.weight_decay=1e-2",
            "train.batch_size=16",
            "checkpoint.async_save=false",
            "model.mixers=[fwp, attention]",
            "model.key_dim=null",
            "model.cell=linear_attn",
            "eval.lengths=128,256",
        ],
    )
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.steps == 20 and cfg.train.batch_size == 16
    assert cfg.train.weight_decay == 0.01
    assert cfg.checkpoint.async_save is False
    assert cfg.model.mixers == ("fwp", "attention")
    assert cfg.model.key_dim is None
    assert cfg.model.cell == "linear_attn"
    assert cfg.eval.lengths == (128, 256)
    assert cfg.data == Config().data  # an absent section keeps its defaults


def test_per_layer_mixer_fields_from_yaml_and_overrides(tmp_path):
    text = "model:\n  mixers:\n    - {mixer: fwp, cell: gated_delta_rule, qk_scale: 3e-1}\n"
    from_yaml = load(write(tmp_path, text + "    - attention\n"))
    from_override = load(
        write(tmp_path, "model:\n  cell: linear_attn\n"),
        ["model.mixers=[{mixer: fwp, cell: gated_delta_rule, qk_scale: 3e-1}, attention]"],
    )
    for cfg in (from_yaml, from_override):
        first, second = cfg.model.layers()
        assert cfg.model.mixers[0] == {"mixer": "fwp", "cell": "gated_delta_rule", "qk_scale": 0.3}
        assert first == dataclasses.replace(
            cfg.model, mixers=("fwp",), cell="gated_delta_rule", qk_scale=0.3
        )
        assert second == dataclasses.replace(cfg.model, mixers=("attention",))
    assert from_override.model.layers()[1].cell == "linear_attn"
    assert from_dict(Config, to_dict(from_yaml)) == from_yaml
    assert differing_keys(from_yaml, from_override) == ["model.cell"]


def test_a_later_override_wins_and_the_input_is_not_mutated():
    data = {"train": {"steps": 5}}
    out = apply_overrides(data, ["train.steps=6", "train.steps=7"])
    assert out == {"train": {"steps": "7"}} and data == {"train": {"steps": 5}}


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.stepz=3"], "unknown key train.stepz; valid keys in train: steps,"),
        (["nosection.steps=3"], "unknown key nosection; valid keys in the config: model, data"),
        (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["train.steps=1.5"], "train.steps: expected an integer"),
        (["train.learning_rate=fast"], "train.learning_rate: expected a number"),
        (["checkpoint.async_save=maybe"], "checkpoint.async_save: expected true or false"),
        (["eval.lengths=[64,x]"], "eval.lengths[1]: expected an integer, got 'x'"),
        (["train.steps"], "override 'train.steps' is not of the form key=value"),
        (["train.steps.deeper=1"], "train.steps is not a section"),
        (["model.cell=delta_rul"], "unknown model.cell 'delta_rul'; valid choices: linear_attn,"),
        (["model.feature_map=elu"], "unknown model.feature_map 'elu'; valid choices: identity,"),
        (
            ["model.mixers=[fwp,transformer]"],
            "unknown model.mixers[1] 'transformer'; valid choices",
        ),
        (["model.mixers=[fwp, {mixer: fwp, cel: x}]"], "unknown key model.mixers[1].cel; valid"),
        (["model.mixers=[{mixer: fwp, cell: x}]"], "unknown model.mixers[0].cell 'x'; valid"),
        (["model.mixers=[{mixer: rnn}]"], "unknown model.mixers[0].mixer 'rnn'; valid choices"),
        (["model.mixers=[fwp, {cell: delta_rule}]"], "model.mixers[1] has no 'mixer' key; give"),
        (["model.mixers=[{mixer: fwp, chunk_size: x}]"], "model.mixers[0].chunk_size: expected"),
        (["model.mixers=[{mixer: fwp, chunk_size: 0}]"], "model.mixers[0].chunk_size must be >="),
        (["model.mixers=[{mixer: fwp, d_model: 8}]"], "model.mixers[0].d_model cannot be set per"),
        (["model.mixers=[{mixer: fwp, qk_norm: sum}]"], "model.mixers[0]: qk_norm 'sum' needs"),
        (
            ["model.mixers=[{mixer: fwp, cell: [x}]"],
            "malformed YAML in model.mixers[0] at line 1",
        ),
        (["data.task=sorting"], "unknown data.task 'sorting'; valid tasks: mqar,"),
        (["train.compute_dtype=float16"], "valid: float32, bfloat16"),
        (
            ["model.matmul_precision=fast"],
            "unknown model.matmul_precision 'fast'; valid choices: default, high, highest",
        ),
        (["train.batch_size=6", "train.grad_accum=4"], "not divisible by train.grad_accum=4"),
    ],
)
def test_bad_values_raise_one_line_naming_the_culprit(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, "train:\n  steps: 10\n"), overrides)
    message = str(error.value)
    assert fragment in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train: [1, 2\n", "malformed YAML in"),
        ("train:\n  steps: 1\n bad indent: 2\n", "malformed YAML in"),
        ("- just\n- a list\n", "must hold a mapping of sections"),
        ("train: 5\n", "train: expected a mapping of TrainConfig fields"),
        ("train:\n  steps: true\n", "train.steps: expected an integer, got True"),
        ("model:\n  cell: 3\n", "model.cell: expected a string, got 3"),
    ],
)
def test_bad_yaml_files_raise_one_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as error:
        load(write(tmp_path, text))
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load(tmp_path / "nope.yaml")


def test_to_dict_round_trips():
    cfg = from_dict(Config, {"model": {"mixers": ["fwp", "attention"]}, "eval": {"lengths": [8]}})
    assert from_dict(Config, to_dict(cfg)) == cfg


def test_differing_keys_ignore_run_length():
    base = Config()
    longer = from_dict(Config, {"train": {"steps": 99, "log_every": 3}, "checkpoint": {"every": 7}})
    other = from_dict(Config, {"train": {"steps": 99, "seed": 4}, "model": {"cell": "linear_attn"}})
    assert differing_keys(base, longer) == []
    assert differing_keys(base, other) == ["model.cell", "train.seed"]


def test_section_checks_run_at_construction():
    with pytest.raises(ConfigError, match="train.steps must be >= 1"):
        TrainConfig(steps=0)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_committed_config_loads_and_resolves(path):
    cfg = load(path)
    prepare(cfg)  # every name resolves and every size fits, as before a real run


def test_the_embedded_default_is_mqar_with_deltanet():
    cfg = load(Path(__file__).parent.parent / "configs" / "mqar.yaml")
    assert cfg.data.task == "mqar"
    assert cfg.model.cell == "delta_rule" and set(cfg.model.mixers) == {"fwp"}


@pytest.mark.parametrize("mixer", ["fwp", "mamba2"])
def test_compute_dtype_and_matmul_precision_reach_the_chunk_matmuls(tmp_path, mixer):
    """train.compute_dtype=bfloat16 and model.matmul_precision=highest (one chunkwise layer, a
    delta rule or a Mamba-2 mixer): the cell's chunk matmuls take bfloat16 operands and
    accumulate in float32, every one at HIGHEST precision (traced, not run)."""
    import jax
    import jax.numpy as jnp
    from jax.extend import core as jax_core

    from fwpzoo.train.state import new_model

    overrides = [
        "train.compute_dtype=bfloat16",
        "model.matmul_precision=highest",
        f"model.mixers=[{mixer}]",
        "model.chunk_size=8",
    ]
    cfg = load(write(tmp_path, "train:\n  steps: 10\n"), overrides)
    model = new_model(cfg, vocab_size=16)
    tokens = jnp.zeros((1, 16), jnp.int32)

    def products(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for param in eqn.params.values():
                for sub in param if isinstance(param, tuple | list) else (param,):
                    if isinstance(sub, jax_core.ClosedJaxpr):
                        yield from products(sub.jaxpr)

    rounded = [
        eqn
        for eqn in products(jax.make_jaxpr(lambda t: model(t))(tokens).jaxpr)
        if eqn.outvars[0].aval.dtype == jnp.float32
        and all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
    ]
    assert rounded and all(
        eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for eqn in rounded
    )


def test_a_new_mixer_with_a_new_field_needs_only_its_view_and_its_registry_line(monkeypatch):
    """A mixer declared here (its view: a field of its own with default and domain, shared
    fields without) and added to the registry alone: the model config built from the registry
    takes `model.toy_width=...` through the config decoder, model-wide and per layer, and it
    reaches the view and the built layer; an unknown field and a field set for a layer whose
    mixer does not read it are still refused in one line. The shipped ModelConfig is untouched."""
    from dataclasses import dataclass
    from typing import ClassVar

    import jax.numpy as jnp
    from flax import nnx

    from fwpzoo import layers
    from fwpzoo.layers.base import Description, Mixer, MixerConfig
    from fwpzoo.models import build_model
    from fwpzoo.models.config import ModelConfig, model_config_class

    @dataclass(frozen=True, kw_only=True)
    class ToyConfig(MixerConfig):
        MIXER: ClassVar[str] = "toy"
        MINIMUM: ClassVar[dict] = {"toy_width": 1}

        num_heads: int  # shared: declared in fwpzoo.layers.fields
        key_dim: int  # shared, resolved by the default resolve (d_model // num_heads)
        toy_width: int = 3  # its own: the hidden width of its two projections

        def describe(self):
            return Description("toy", "none", None, self.num_heads, 0)

    class ToyMixer(Mixer):
        Config = ToyConfig

        def __init__(self, cfg, *, rngs, dtype=jnp.float32):
            super().__init__(cfg)
            self.up = nnx.Linear(self.cfg.d_model, self.cfg.toy_width, rngs=rngs, dtype=dtype)
            self.down = nnx.Linear(self.cfg.toy_width, self.cfg.d_model, rngs=rngs, dtype=dtype)

        def _sequence(self, x, cache, reset):
            return self.down(jnp.tanh(self.up(x))), cache, {}

    monkeypatch.setitem(layers.MIXERS, "toy", ToyMixer)  # the registry line
    Model = model_config_class()

    def decode(*overrides):
        return from_dict(Model, apply_overrides({}, overrides).get("model", {}), "model.")

    cfg = decode("model.mixers=[fwp, toy, {mixer: toy, toy_width: 7}]", "model.toy_width=5")
    assert cfg.toy_width == 5 and dataclasses.fields(Model)[-1].name == "toy_width"
    views = cfg.mixer_configs()
    assert [view.toy_width for view in views[1:]] == [5, 7] and views[1].key_dim == 32
    model = build_model(cfg, vocab_size=11, rngs=nnx.Rngs(0))
    assert [block.mixer.up.kernel.shape for block in model.blocks[1:]] == [(64, 5), (64, 7)]
    assert model(jnp.zeros((1, 4), jnp.int32)).shape == (1, 4, 11)
    assert decode().toy_width == 3  # its view's default
    for overrides, message in [
        (["model.toy_widht=5"], "unknown key model.toy_widht; valid keys in model: mixers,"),
        (["model.mixers=[toy]", "model.toy_width=0"], "model.toy_width must be >= 1, got 0"),
        (
            ["model.mixers=[{mixer: fwp, toy_width: 2}]"],
            "model.mixers[0].toy_width is not read by the fwp mixer or its block",
        ),
        (
            ["model.mixers=[{mixer: toy, cell: oja}]"],
            "model.mixers[0].cell is not read by the toy mixer or its block",
        ),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            decode(*overrides)
    assert "toy_width" not in {f.name for f in dataclasses.fields(ModelConfig)}


def test_each_model_field_is_declared_once():
    """A field a view declares (with a default) that another home declares too, or that a view
    reads but nothing declares, is a maintainer's error at import, naming the field; every
    SharedFields field is read by two mixers or more, and ModelConfig has no field that neither
    the model nor a mixer reads."""
    from dataclasses import dataclass

    from fwpzoo.layers import MIXERS, Mixer
    from fwpzoo.layers.base import MixerConfig
    from fwpzoo.layers.fields import SharedFields
    from fwpzoo.models.config import ModelBase, ModelConfig, mixer_fields

    @dataclass(frozen=True, kw_only=True)
    class Twice(MixerConfig):
        chunk_size: int = 8  # SharedFields declares it

    @dataclass(frozen=True, kw_only=True)
    class Nowhere(MixerConfig):
        toy_depth: int  # no default, and no other home declares it

    for view, message in [(Twice, "already declared by SharedFields"), (Nowhere, "nowhere")]:
        mixer = type("Toy", (Mixer,), {"Config": view})
        with pytest.raises(TypeError, match=rf"model\.\w+.*{message}"):
            mixer_fields({**MIXERS, "toy": mixer})
    readers = {f.name: 0 for f in dataclasses.fields(SharedFields)}
    read = {f.name for f in dataclasses.fields(ModelBase)}
    for mixer in MIXERS.values():
        read |= set(mixer.Config.names())
        for name in set(readers) & set(mixer.Config.names()):
            readers[name] += 1
    assert all(count >= 2 for count in readers.values()), readers
    assert {f.name for f in dataclasses.fields(ModelConfig)} == read
