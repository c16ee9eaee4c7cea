"""Layers: token mixers, norms, MLP, short conv and feature maps.

Every mixer implements the contract of fwpzoo.layers.base.Mixer (call, init_cache, prefill,
decode_step, inspect_step, fast_weights, describe) and reads its own typed view of the model
config (a MixerConfig). The mixers built on a cell also offer
    mixer.cell_inputs(x [B, T, D])         what the layer feeds its cell over a sequence read from
                                           the start: {"q", "k", "v", gate name: array}

MIXERS is the registry: a new mixer is a module here and one line below, even when it reads new
config fields: its view declares them and fwpzoo.models.config builds ModelConfig from the
registered views (fields several mixers read are declared once, in fields.SharedFields). No mixer
module imports another; what they share lives in base, fields, feature_maps, gates, norms, conv
and context. Every
parameter has a kind by role (params: GateParam, ScaleParam, or a plain nnx.Param weight), which
weight decay reads.
"""

from fwpzoo.layers.attention import Attention
from fwpzoo.layers.base import Description, KVCache, Mixer, MixerConfig, StateCache
from fwpzoo.layers.fwp import FWPMixer
from fwpzoo.layers.mamba2 import Mamba2Mixer
from fwpzoo.layers.mlp import SwiGLU
from fwpzoo.layers.norms import RMSNorm
from fwpzoo.layers.plastic import PlasticMixer
from fwpzoo.layers.programmed import RecurrentDeltaMixer, SRWMMixer
from fwpzoo.layers.ssm import DiagonalSSM

MIXERS: dict[str, type[Mixer]] = {
    "fwp": FWPMixer,
    "attention": Attention,
    "mamba2": Mamba2Mixer,
    "ssm": DiagonalSSM,
    "plastic": PlasticMixer,
    "rdn": RecurrentDeltaMixer,
    "srwm": SRWMMixer,
}


def get_mixer(name: str) -> type[Mixer]:
    """The mixer class called `name`; a ValueError listing the valid names otherwise."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(MIXERS)}")
    return MIXERS[name]


def mixer_config(name: str, source, explicit=frozenset()) -> MixerConfig:
    """The typed view of mixer `name` of `source` (a layer's ModelConfig), `explicit` naming the
    fields set for that layer itself (see fwpzoo.layers.base); ValueError naming a bad field."""
    return get_mixer(name).Config.of(source, explicit)


def describe(layer) -> Description:
    """The Description of a layer's ModelConfig (ModelConfig.layers()), without building it."""
    return mixer_config(layer.mixers[0], layer).describe()


__all__ = [
    "MIXERS",
    "Attention",
    "Description",
    "DiagonalSSM",
    "FWPMixer",
    "KVCache",
    "Mamba2Mixer",
    "Mixer",
    "MixerConfig",
    "PlasticMixer",
    "RMSNorm",
    "RecurrentDeltaMixer",
    "SRWMMixer",
    "StateCache",
    "SwiGLU",
    "describe",
    "get_mixer",
    "mixer_config",
]
