"""Models: the causal LM built from a ModelConfig, and its sampler."""

from fwpzoo.models.config import ModelConfig
from fwpzoo.models.lm import Block, CausalLM, build_model
from fwpzoo.models.sampling import generate

__all__ = ["Block", "CausalLM", "ModelConfig", "build_model", "generate"]
