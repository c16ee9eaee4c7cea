"""The model's part of the config: one frozen dataclass, every field typed and defaulted."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from fwpzoo.cells import CELLS, FORMS
from fwpzoo.cells.forms import form_fn
from fwpzoo.cells.programmed.plastic import ACTIVATIONS, RULES, SITES
from fwpzoo.layers import MIXERS
from fwpzoo.layers.attention import KERNELS as ATTENTION_KERNELS
from fwpzoo.layers.feature_maps import FEATURE_MAPS
from fwpzoo.layers.fwp import (
    DECAYS,
    QK_NORMS,
    check_beta_init,
    check_decay,
    check_inner,
    check_qk_norm,
)
from fwpzoo.layers.gates import BETA_RANGES
from fwpzoo.layers.mamba2 import DECAY_RANGES
from fwpzoo.layers.plastic import ETA_SIGNS, check_plastic
from fwpzoo.layers.programmed import check_probability_map


def _one_of(key: str, value: str, valid) -> None:
    if value not in valid:
        choices = ", ".join(valid)
        raise ValueError(f"unknown model.{key} {value!r}; valid choices: {choices}")


# Fields one layer cannot set for itself: the layer list, the residual stream's width, and the
# embedding and head around the blocks.
MODEL_WIDE: tuple[str, ...] = ("mixers", "d_model", "vocab_size", "tie_embeddings")
BLOCK_NORMS: tuple[str, ...] = ("pre", "post")
ATTENTION_QK_NORMS: tuple[str, ...] = ("none", "head", "all")
GATE_ACTIVATIONS: tuple[str, ...] = ("silu", "sigmoid")
CONV_ACTIVATIONS: tuple[str, ...] = ("none", "silu")


REMATS: tuple[str, ...] = ("none", "block", "mixer")


def _positive(key: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        raise ValueError(f"model.{key} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM: embed -> blocks (norm -> mixer -> residual -> norm -> MLP -> residual) -> head.

    `mixers` gives the mixer of each layer in order, so a hybrid is one list; its length is the
    number of layers. An entry is a mixer name, or a mapping with a `mixer` key and any other
    fields of this config for that layer only, e.g.
    [{"mixer": "fwp", "cell": "gated_delta_rule"}, {"mixer": "fwp", "cell": "delta_rule"},
    "attention"]. `layers()` resolves the entries into one config per layer.
    """

    # each a name (fwp, attention, mamba2, ssm, plastic, rdn, srwm) or
    # {"mixer": name, field: value, ...}
    mixers: tuple[str | Mapping, ...] = ("fwp", "fwp")
    d_model: int = 64
    num_heads: int = 2
    key_dim: int | None = None  # per head; None means d_model // num_heads
    value_dim: int | None = None  # per head; None means d_model // num_heads
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
    # fwp mixer
    cell: str = "delta_rule"  # a name in fwpzoo.cells.CELLS
    form: str = "chunkwise"  # recurrent | chunkwise | associative
    chunk_size: int = 64
    feature_map: str = "identity"  # identity, elu1, relu, silu, dpfp, favor, softmax
    dpfp_nu: int = 1
    favor_features: int = 32  # FAVOR+ random features m (feature dim 2m)
    qk_norm: str = "l2"  # none | sum | l2
    qk_scale: float | None = None  # multiplies q; None means key feature dim ** -0.5
    beta_range: str = "0,1"  # "0,1": sigmoid; "0,2": 2 * sigmoid (negative eigenvalues)
    # beta's value at init, through a trained bias on its projection; None: no bias, so beta
    # starts near the middle of its range (0.5 for "0,1")
    beta_init: float | None = None
    decay: str = "scalar"  # scalar | per_key: the decay's shape for cells that take either
    num_householder: int = 2  # delta_product sub-steps N
    product_decay: bool = False  # delta_product: a per-head decay before the sub-steps
    # deep fast weights (the cells whose OPTIONS name these: ttt_linear, deep): the fast net
    # (linear | mlp | swiglu) and its hidden width (None: 4 x key dim), the inner optimiser
    # (sgd | momentum | muon), tokens per inner step (TTT's mini-batch, LaCT's chunk; it
    # divides chunk_size) and the loss window (ATLAS's Omega rule; 1: the token alone)
    fast_net: str = "linear"
    fast_hidden: int | None = None
    inner_optimizer: str = "sgd"
    inner_batch: int = 1
    inner_window: int = 1
    # every log decay (gated cells, mamba2) starts as Mamba-2's: -A dt with A uniform in
    # decay_a_range and dt log-uniform in decay_dt_range (alpha = exp(-A dt) at the start)
    decay_a_range: tuple[float, ...] = (1.0, 16.0)
    decay_dt_range: tuple[float, ...] = (0.001, 0.1)
    # mamba2: "0,1" alpha = exp(-A dt); "-1,1" alpha = 2 exp(-A dt) - 1 (negative eigenvalues)
    decay_range: str = "0,1"
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 disables it
    output_norm: bool = True
    output_norm_eps: float | None = None  # the fwp output norm's epsilon; None: norm_eps
    # fwp and attention: y = o * act(W_g x) before the output projection, act = gate_activation
    # (silu: with fwp's output norm, the gated RMSNorm of gated DeltaNet; sigmoid: Qwen3.5's
    # output-gated attention)
    output_gate: bool = False
    gate_activation: str = "silu"
    # fwp: value heads, a multiple of num_heads (the key heads); each key head serves
    # num_value_heads / num_heads consecutive value heads, each with its own state and gates.
    # None: num_heads
    num_value_heads: int | None = None
    conv_activation: str = "none"  # none | silu: after the short convolution on q, k, v
    # ssm (diagonal vector state) mixer
    ssm_state_dim: int = 64
    ssm_complex: bool = True  # complex diagonal (LRU) or real diagonal recurrence
    # plastic mixer (fwpzoo.layers.plastic, fwpzoo.cells.programmed.plastic)
    plastic_on: str = "input"  # input (HebbFF) | recurrent (Miconi's differentiable plasticity)
    plasticity: str = "hebb"  # hebb | oja | neuromodulated
    plastic_activation: str = "tanh"  # tanh | sigmoid | relu | identity
    plastic_eta: str = "learned"  # learned (either sign) | positive | negative
    plastic_eta_init: float = (
        1.0  # eta K at init (K presynaptic; HebbFF: -5); a fixed sign keeps |.|
    )
    plastic_alpha: bool = False  # per-synapse plasticity coefficients alpha [H, K, V]
    # attention: rotary position embedding base; how the full causal sequence is computed
    # (dense: the masked [T, T] square; dot_product: jax.nn.dot_product_attention; blockwise:
    # blocks of attention_block_size tokens, those wholly after their queries skipped)
    rope_base: float = 10000.0
    # attention: rotate the first rotary_dim features of each q/k head (None: all, 0: none,
    # i.e. no position embedding); key and value heads for grouped-query attention (None:
    # num_heads); RMSNorm on q and k after projection: none, head (each head's features,
    # Qwen3) or all (all heads' features at once, OLMo 2)
    rotary_dim: int | None = None
    num_kv_heads: int | None = None
    attention_qk_norm: str = "none"
    attention_kernel: str = "dense"
    attention_block_size: int = 256
    # activation checkpointing: none; block (each block's activations recomputed in the backward
    # pass from its input); mixer (only the mixer's)
    remat: str = "none"

    def __post_init__(self):
        if not self.mixers:
            raise ValueError("model.mixers is empty; name one mixer per layer")
        self._check_fields()
        self.layers()  # every layer's own fields checked the same way

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
        for key in fields:
            if key in MODEL_WIDE:
                raise ValueError(f"{where}.{key} cannot be set per layer; set model.{key}")
            if key not in valid:
                raise ValueError(
                    f"unknown key {where}.{key}; valid keys: mixer, {', '.join(valid)}"
                )
        try:  # the layer's own fields pass the same checks, named by the layer, in one step so
            # every check sees the layer's values, not the model-wide ones they replace
            return dataclasses.replace(self, mixers=(name,), **fields)
        except ValueError as error:
            message = str(error)
            named = message.replace("model.", f"{where}.")
            raise ValueError(named if named != message else f"{where}: {message}") from None

    def _check_fields(self) -> None:
        _one_of("cell", self.cell, CELLS)
        _one_of("form", self.form, FORMS)
        _one_of("feature_map", self.feature_map, FEATURE_MAPS)
        _one_of("qk_norm", self.qk_norm, QK_NORMS)
        _one_of("beta_range", self.beta_range, BETA_RANGES)
        _one_of("decay", self.decay, DECAYS)
        _one_of("decay_range", self.decay_range, DECAY_RANGES)
        one_mixer = self.mixers[0] if len(self.mixers) == 1 else None
        if self.decay_range != "0,1" and isinstance(one_mixer, str) and one_mixer != "mamba2":
            raise ValueError(
                f"model.decay_range {self.decay_range!r} is an option of the mamba2 mixer, not "
                f"of {one_mixer} (in a hybrid, set it on the mamba2 layers: "
                f"{{mixer: mamba2, decay_range: {self.decay_range!r}}})"
            )
        if self.beta_init is not None and isinstance(one_mixer, str) and one_mixer != "fwp":
            raise ValueError(
                f"model.beta_init is an option of the fwp mixer, not of {one_mixer} (in a "
                f"hybrid, set it on the fwp layers: {{mixer: fwp, beta_init: {self.beta_init}}})"
            )
        _one_of("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _one_of("remat", self.remat, REMATS)
        _one_of("block_norm", self.block_norm, BLOCK_NORMS)
        _one_of("attention_qk_norm", self.attention_qk_norm, ATTENTION_QK_NORMS)
        _one_of("gate_activation", self.gate_activation, GATE_ACTIVATIONS)
        _one_of("conv_activation", self.conv_activation, CONV_ACTIVATIONS)
        self._check_heads()
        check_qk_norm(self.qk_norm, self.feature_map)
        check_decay(self.cell, self.decay)
        check_beta_init(self.cell, self.beta_init, self.beta_range)
        if "fwp" in self.mixers:
            form_fn(self.cell, self.form)
            check_inner(self)
        _one_of("plastic_on", self.plastic_on, SITES)
        _one_of("plasticity", self.plasticity, RULES)
        _one_of("plastic_activation", self.plastic_activation, ACTIVATIONS)
        _one_of("plastic_eta", self.plastic_eta, ETA_SIGNS)
        if "plastic" in self.mixers:
            check_plastic(self)
        if "srwm" in self.mixers:
            check_probability_map(self.feature_map, self.qk_norm)
        for key in ("d_model", "num_heads", "key_dim", "value_dim", "chunk_size", "dpfp_nu"):
            _positive(key, getattr(self, key))
        for key in ("favor_features", "num_householder", "ssm_state_dim", "attention_block_size"):
            _positive(key, getattr(self, key))
        for key in ("vocab_size", "num_value_heads", "num_kv_heads"):
            _positive(key, getattr(self, key))
        _positive("mlp_hidden", self.mlp_hidden, minimum=0)
        for key in ("moe_experts", "moe_shared_hidden"):
            _positive(key, getattr(self, key), minimum=0)
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(
                f"model.moe_top_k must be in 1..moe_experts={self.moe_experts}, got "
                f"{self.moe_top_k}"
            )
        for key in ("norm_eps", "output_norm_eps"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ValueError(f"model.{key} must be > 0, got {getattr(self, key)}")
        _positive("conv_size", self.conv_size, minimum=0)
        if self.mlp_ratio < 0:
            raise ValueError(f"model.mlp_ratio must be >= 0, got {self.mlp_ratio}")
        if self.qk_scale is not None and self.qk_scale <= 0:
            raise ValueError(f"model.qk_scale must be > 0, got {self.qk_scale}")
        for key in ("decay_a_range", "decay_dt_range"):
            low_high = getattr(self, key)
            if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1]:
                raise ValueError(
                    f"model.{key} must be [low, high] with 0 < low <= high, got {low_high}"
                )
        if self.rope_base <= 1:  # the rotary frequencies are rope_base ** (-2i / d)
            raise ValueError(f"model.rope_base must be > 1, got {self.rope_base}")
        for key in ("key_dim", "value_dim"):
            if getattr(self, key) is None and self.d_model % self.num_heads:
                raise ValueError(
                    f"model.{key}=None needs d_model ({self.d_model}) divisible by "
                    f"num_heads ({self.num_heads})"
                )

    def _check_heads(self) -> None:
        """Grouped heads divide evenly; the rotary features are an even part of a key head."""
        for key, grouped in (("num_value_heads", True), ("num_kv_heads", False)):
            count = getattr(self, key)
            if count is None:
                continue
            many, few = (count, self.num_heads) if grouped else (self.num_heads, count)
            if many % few:
                raise ValueError(
                    f"model.{key}={count} and model.num_heads={self.num_heads}: the "
                    f"{'value' if grouped else 'query'} heads must be a multiple of the "
                    f"{'key' if grouped else 'key/value'} heads"
                )
        head_dim = self.key_dim or self.d_model // self.num_heads
        rotates = self.mixers == ("attention",)  # the one layer kind with rotary embeddings
        odd_or_long = self.rotary_dim is not None and (
            self.rotary_dim % 2 or self.rotary_dim > head_dim
        )
        if rotates and odd_or_long:
            raise ValueError(
                f"model.rotary_dim must be even and at most the key head dim {head_dim}, got "
                f"{self.rotary_dim}"
            )
