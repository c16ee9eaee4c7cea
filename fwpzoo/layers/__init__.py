"""Layers: token mixers, norms, MLP, short conv and feature maps.

Every mixer maps x [B, T, D] -> [B, T, D] and offers the same four entry points:
    mixer(x, return_intermediates=False)   full forward (and a dict of scalar intermediates)
    mixer.init_cache(batch_size, max_len)  the decoding state, a pytree of arrays
    mixer.prefill(x, cache)                the full-sequence form from the cache -> (y, cache)
    mixer.decode_step(x [B, D], cache)     one token -> (y [B, D], cache)

Mixers with a matrix state (fast weights) also offer, for `fwpzoo inspect`:
    mixer.fast_weights(cache)              the fast weights S [B, H, K, V] of a cache
    mixer.inspect_step(x [B, D], cache)    decode_step plus the token's gates {name: [B, H]}
    mixer.cell_inputs(x [B, T, D])         what the layer feeds its cell over a sequence read from
                                           the start: {"q", "k", "v", gate name: array}
"""

from fwpzoo.layers.attention import Attention
from fwpzoo.layers.fwp import FWPMixer
from fwpzoo.layers.mamba2 import Mamba2Mixer
from fwpzoo.layers.mlp import SwiGLU
from fwpzoo.layers.norms import RMSNorm
from fwpzoo.layers.plastic import PlasticMixer
from fwpzoo.layers.programmed import RecurrentDeltaMixer, SRWMMixer
from fwpzoo.layers.ssm import DiagonalSSM

MIXERS: dict[str, type] = {
    "fwp": FWPMixer,
    "attention": Attention,
    "mamba2": Mamba2Mixer,
    "ssm": DiagonalSSM,
    "plastic": PlasticMixer,
    "rdn": RecurrentDeltaMixer,
    "srwm": SRWMMixer,
}


def get_mixer(name: str) -> type:
    """The mixer class called `name`; a ValueError listing the valid names otherwise."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; valid mixers: {', '.join(MIXERS)}")
    return MIXERS[name]


__all__ = [
    "MIXERS",
    "Attention",
    "DiagonalSSM",
    "FWPMixer",
    "Mamba2Mixer",
    "PlasticMixer",
    "RMSNorm",
    "RecurrentDeltaMixer",
    "SRWMMixer",
    "SwiGLU",
    "get_mixer",
]
