"""The model's part of the config: one frozen dataclass, every field typed and defaulted."""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from fwpzoo.layers import MIXERS, MixerConfig, mixer_config
from fwpzoo.layers.base import check_domain


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
        choices |= mixer.Config.CHOICES
        minimum |= mixer.Config.MINIMUM
        above |= mixer.Config.ABOVE
    return choices, minimum, above


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
    "attention"]. `layers()` resolves the entries into one config per layer, and
    `mixer_configs()` into each layer's mixer view (fwpzoo.layers.base.MixerConfig).

    Who checks what: a value outside its field's domain (a name not among its choices, a size
    below its minimum) is refused here wherever it is set; a combination a mixer cannot take is
    refused by that mixer's view, for the layers that read it. A per-layer field the layer's
    mixer (or its block) does not read is refused. A model-wide field is the default of every
    layer that reads it and inert for the others, so one config serves any mixer list; a
    model-wide form a mixer does not have runs its recurrent form, named once by `notes()`.
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
    # jax's precision= of the chunkwise form's matmuls (fwp, mamba2): default | high | highest;
    # their operands take the inputs' dtype, bfloat16 under train.compute_dtype=bfloat16, while
    # the state and its scan stay float32 (fwpzoo/cells/chunked/precision.py)
    matmul_precision: str = "default"
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
