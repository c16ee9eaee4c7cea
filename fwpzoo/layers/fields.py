"""The model config fields that several mixers read, declared once: name, type, default, domain.

Where a config field comes from (fwpzoo.models.config builds ModelConfig from all three):
- the model's own fields (the layer list, d_model, the embedding, the block around each mixer:
  norms, MLP, remat) are declared in fwpzoo.models.config;
- a field several mixers read is declared here, so it has one default for all of them;
- a field one mixer alone reads is declared in that mixer's view (its MixerConfig subclass),
  with its default, and its domain in the view's CHOICES / MINIMUM / ABOVE.
A view lists every field it reads; one it does not declare itself (no default in the view) is
one of the first two kinds. So a new mixer with new fields is its module in fwpzoo/layers/ and
its line in the registry (fwpzoo.layers.MIXERS): the model config, the YAML keys and the
`model.<field>=value` overrides follow from its view.
"""

from dataclasses import dataclass
from typing import ClassVar

from fwpzoo.cells import FORMS
from fwpzoo.cells.chunked.precision import PRECISIONS
from fwpzoo.layers.feature_maps import FEATURE_MAPS, QK_NORMS
from fwpzoo.layers.gates import GATE_ACTIVATIONS


@dataclass(frozen=True)
class SharedFields:
    """The fields several mixers read, with their defaults (a declaration: never built).

    CHOICES ({field: its valid names}) and MINIMUM ({field: its smallest value; None passes}) are
    their domains, which every view reading the field checks (d_model, the model's own field, is
    read by every mixer: its minimum is here too)."""

    CHOICES: ClassVar[dict] = {
        "form": FORMS,
        "matmul_precision": PRECISIONS,
        "feature_map": tuple(FEATURE_MAPS),
        "qk_norm": QK_NORMS,
        "gate_activation": tuple(GATE_ACTIVATIONS),
    }
    MINIMUM: ClassVar[dict] = {
        "d_model": 1,
        "num_heads": 1,
        "key_dim": 1,
        "value_dim": 1,
        "chunk_size": 1,
        "dpfp_nu": 1,
        "favor_features": 1,
        "conv_size": 0,
    }

    num_heads: int = 2
    key_dim: int | None = None  # per head; None means d_model // num_heads
    value_dim: int | None = None  # per head; None means d_model // num_heads
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
    # every log decay (gated cells, mamba2) starts as Mamba-2's: -A dt with A uniform in
    # decay_a_range and dt log-uniform in decay_dt_range (alpha = exp(-A dt) at the start)
    decay_a_range: tuple[float, ...] = (1.0, 16.0)
    decay_dt_range: tuple[float, ...] = (0.001, 0.1)
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 disables it
    output_norm: bool = True  # per-head RMSNorm of the read-out (fwp, rdn, srwm)
    # fwp and attention: y = o * act(W_g x) before the output projection, act = gate_activation
    # (silu: with fwp's output norm, the gated RMSNorm of gated DeltaNet; sigmoid: Qwen3.5's
    # output-gated attention)
    output_gate: bool = False
    gate_activation: str = "silu"
