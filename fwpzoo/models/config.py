"""The model's part of the config: one frozen dataclass, every field typed and defaulted."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM: embed -> blocks (norm -> mixer -> residual -> norm -> MLP -> residual) -> head.

    `mixers` names the mixer of each layer in order, so a hybrid is one list, e.g.
    ["fwp", "attention"]; its length is the number of layers.
    """

    mixers: tuple[str, ...] = ("fwp", "fwp")  # each one of: fwp, attention, mamba2, ssm
    d_model: int = 64
    num_heads: int = 2
    key_dim: int | None = None  # per head; None means d_model // num_heads
    value_dim: int | None = None  # per head; None means d_model // num_heads
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio * d_model (0 disables the MLP)
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
    num_householder: int = 2  # delta_product sub-steps N
    product_decay: bool = False  # delta_product: a per-head decay before the sub-steps
    conv_size: int = 4  # short causal depthwise conv on q, k, v; 0 disables it
    output_norm: bool = True
    output_gate: bool = False
    # ssm (diagonal vector state) mixer
    ssm_state_dim: int = 64
    ssm_complex: bool = True  # complex diagonal (LRU) or real diagonal recurrence
    # attention: rotary position embedding base
    rope_base: float = 10000.0
