"""What each released architecture is in fwpzoo terms: its config mapped to a model section, and
every checkpoint tensor mapped to a parameter (docs/interop.md has the same as a table).

A Rule makes one fwpzoo parameter from pieces of checkpoint tensors:
  linear  kernel [in, out] = concat over pieces of W[rows].T, W [out, in] as torch stores it
  conv    kernel [W, C]    = weight[:, 0, :].T of a depthwise torch Conv1d weight [C, 1, W]
  copy    the same array (norm weights, A_log, dt_bias, the embedding [vocab, D])
  experts kernel [E, in, out] = W_e.T stacked over the experts e, one tensor [out, in] each
Every row of every checkpoint tensor goes to exactly one place, so export inverts import exactly.
"""

from dataclasses import dataclass

import numpy as np

from fwpzoo.interop.safetensors import InteropError


@dataclass(frozen=True)
class Piece:
    name: str  # the checkpoint tensor
    rows: tuple[int, ...] | None = None  # the output rows it gives (None: all, in order)


@dataclass(frozen=True)
class Rule:
    target: str  # the fwpzoo parameter, e.g. "blocks/0/mixer/qkv_proj/kernel"
    kind: str  # linear | conv | copy
    pieces: tuple[Piece, ...]


# fields that do not change what the causal LM computes in inference or fine-tuning (bookkeeping,
# initialisation ranges, token ids, caching); any field outside these and the mapped ones is
# refused, so a release with a new option is never imported as if it had none
BOOKKEEPING = {
    "architectures", "dtype", "torch_dtype", "transformers_version", "use_cache",
    "initializer_range", "max_position_embeddings", "bos_token_id", "eos_token_id",
    "pad_token_id", "attention_dropout", "model_type", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "tie_word_embeddings",
}  # fmt: skip


def _require(ok: bool, field: str, value, want: str) -> None:
    if not ok:
        raise InteropError(f"config field {field}={value!r} is not supported (fwpzoo maps {want})")


def check_fields(hf: dict, model_type: str, mapped: set[str]) -> None:
    unknown = sorted(set(hf) - BOOKKEEPING - mapped)
    if unknown:
        raise InteropError(
            f"config field {unknown[0]!r} of {model_type} is not known to the mapping "
            f"(unknown fields: {', '.join(unknown)})"
        )
    _require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "silu")
    bias = hf.get("attention_bias", False)
    _require(not bias, "attention_bias", bias, "false")


def rope(hf: dict, partial_default: float, known: set[str]):
    """(rope_base, rotary fraction) of rope_parameters (None when there is no position
    embedding); other rope types and keys refused."""
    params = hf.get("rope_parameters")
    _require(hf.get("rope_scaling") is None, "rope_scaling", hf.get("rope_scaling"), "none")
    if params is None or params.get("rope_theta") is None:
        return None, 0.0
    for key in set(params) - known:
        raise InteropError(f"config field rope_parameters.{key} is not known to the mapping")
    kind = params.get("rope_type", "default")
    _require(kind == "default", "rope_parameters.rope_type", kind, "default")
    return float(params["rope_theta"]), float(params.get("partial_rotary_factor", partial_default))


def linear(target: str, *pieces) -> Rule:
    return Rule(target, "linear", tuple(p if isinstance(p, Piece) else Piece(p) for p in pieces))


def rows(name: str, count: int) -> Piece:
    """All `count` rows of a tensor that is one of several pieces of a kernel."""
    return Piece(name, tuple(range(count)))


def copy(target: str, name: str) -> Rule:
    return Rule(target, "copy", (Piece(name),))


def conv(target: str, *pieces) -> Rule:
    return Rule(target, "conv", tuple(p if isinstance(p, Piece) else Piece(p) for p in pieces))


def mlp_rules(block: str, layer: str) -> list[Rule]:
    return [
        linear(f"{block}/mlp/gate/kernel", f"{layer}mlp.gate_proj.weight"),
        linear(f"{block}/mlp/up/kernel", f"{layer}mlp.up_proj.weight"),
        linear(f"{block}/mlp/down/kernel", f"{layer}mlp.down_proj.weight"),
    ]


def outer_rules(hf: dict, prefix: str) -> list[Rule]:
    rules = [
        copy("embed/embedding", f"{prefix}embed_tokens.weight"),
        copy("final_norm/weight", f"{prefix}norm.weight"),
    ]
    if not hf.get("tie_word_embeddings", False):
        rules.append(linear("head/kernel", "lm_head.weight"))
    return rules


def gated_deltanet_rules(mixer: str, attn: str, names: dict, hf: dict) -> list[Rule]:
    """The fwp layer of a gated DeltaNet; `names` gives the checkpoint's name of each part."""
    key_width = hf["linear_num_key_heads"] * hf["linear_key_head_dim"]
    value_width = hf["linear_num_value_heads"] * hf["linear_value_head_dim"]
    widths = [key_width, key_width, value_width]

    if len(names["qkv"]) == 1:  # one fused projection, or one each for q, k and v
        qkv = [f"{attn}{names['qkv'][0]}.weight"]
    else:
        qkv = [rows(f"{attn}{n}.weight", w) for n, w in zip(names["qkv"], widths, strict=True)]
    return [
        linear(f"{mixer}/qkv_proj/kernel", *qkv),
        conv(f"{mixer}/conv/kernel", *(f"{attn}{n}.weight" for n in names["conv"])),
        linear(f"{mixer}/gates/beta/proj/kernel", f"{attn}{names['beta']}.weight"),
        linear(f"{mixer}/gates/log_alpha/proj/kernel", f"{attn}{names['alpha']}.weight"),
        copy(f"{mixer}/gates/log_alpha/decay/A_log", f"{attn}A_log"),
        copy(f"{mixer}/gates/log_alpha/decay/dt_bias", f"{attn}dt_bias"),
        copy(f"{mixer}/out_norm/weight", f"{attn}{names['norm']}.weight"),
        linear(f"{mixer}/gate_proj/kernel", f"{attn}{names['gate']}.weight"),
        linear(f"{mixer}/out_proj/kernel", f"{attn}{names['out']}.weight"),
    ]


def gated_deltanet_layer(hf: dict, beta_range: str, norm_eps: float) -> dict:
    return {
        "mixer": "fwp",
        "cell": "gated_delta_rule",
        "form": "chunkwise",
        "num_heads": hf["linear_num_key_heads"],
        "num_value_heads": hf["linear_num_value_heads"],
        "key_dim": hf["linear_key_head_dim"],
        "value_dim": hf["linear_value_head_dim"],
        "feature_map": "identity",
        "qk_norm": "l2",
        "beta_range": beta_range,
        "decay": "scalar",
        "conv_size": hf.get("linear_conv_kernel_dim", 4),
        "conv_activation": "silu",
        "output_norm": True,
        "output_norm_eps": norm_eps,
        "output_gate": True,
        "gate_activation": "silu",
    }


class Qwen35:
    """Qwen3.5's dense text model (Qwen3_5ForCausalLM; the language model of a qwen3_5
    checkpoint): three gated DeltaNet layers per output-gated attention layer by default."""

    model_type = "qwen3_5_text"
    architecture = "Qwen3_5ForCausalLM"
    MAPPED = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
        "rope_parameters", "rope_scaling", "attention_bias", "head_dim", "linear_conv_kernel_dim",
        "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
        "linear_num_value_heads", "layer_types", "full_attention_interval", "attn_output_gate",
        "mamba_ssm_dtype", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings",
        "partial_rotary_factor",
    }  # fmt: skip
    ROPE_KEYS = {"rope_theta", "rope_type", "partial_rotary_factor", "mrope_section",
                 "mrope_interleaved"}  # fmt: skip
    # tensors a full checkpoint holds beyond the text model: the vision tower and the
    # multi-token-prediction head (not part of the causal LM)
    IGNORED = ("model.visual.", "mtp.")
    PREFIXES = ("model.", "model.language_model.")  # where the text model's tensors may sit

    @staticmethod
    def layer_types(hf: dict) -> list[str]:
        if hf.get("layer_types") is not None:
            return list(hf["layer_types"])
        every = hf.get("full_attention_interval", 4)
        return [
            "full_attention" if (i + 1) % every == 0 else "linear_attention"
            for i in range(hf["num_hidden_layers"])
        ]

    @classmethod
    def model_section(cls, hf: dict) -> dict:
        check_fields(hf, cls.model_type, cls.MAPPED)
        gated = hf.get("attn_output_gate", True)
        _require(gated is True, "attn_output_gate", gated, "true")
        state_dtype = hf.get("mamba_ssm_dtype", "float32")
        _require(state_dtype == "float32", "mamba_ssm_dtype", state_dtype, "float32")
        base, fraction = rope(hf, hf.get("partial_rotary_factor", 0.25), cls.ROPE_KEYS)
        H = hf.get("num_attention_heads", 16)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // H
        eps = hf.get("rms_norm_eps", 1e-6)
        attention = {
            "mixer": "attention",
            "num_heads": H,
            "num_kv_heads": hf.get("num_key_value_heads", H),
            "key_dim": head_dim,
            "value_dim": head_dim,
            "rotary_dim": int(head_dim * fraction),
            "attention_qk_norm": "head",
            "output_gate": True,
            "gate_activation": "sigmoid",
        }
        if base is not None:
            attention["rope_base"] = base
        fwp = gated_deltanet_layer(hf, "0,1", eps)
        mixers = [fwp if t == "linear_attention" else attention for t in cls.layer_types(hf)]
        return common_section(hf, H, head_dim, mixers, zero_centred=True)

    @classmethod
    def rules(cls, hf: dict, prefix: str) -> list[Rule]:
        H = hf.get("num_attention_heads", 16)
        G = hf.get("num_key_value_heads", H)
        head_dim = hf.get("head_dim") or hf["hidden_size"] // H
        rules = outer_rules(hf, prefix)
        names = {"qkv": ["in_proj_qkv"], "conv": ["conv1d"], "beta": "in_proj_b",
                 "alpha": "in_proj_a", "norm": "norm", "gate": "in_proj_z",
                 "out": "out_proj"}  # fmt: skip
        # q_proj holds each head's query then its gate: [q_0, g_0, q_1, g_1, ...], head_dim each
        starts = np.arange(H)[:, None] * 2 * head_dim + np.arange(head_dim)  # [H, head_dim]
        q_rows, gate_rows = (
            tuple(starts.ravel().tolist()),
            tuple((starts + head_dim).ravel().tolist()),
        )
        for i, kind in enumerate(cls.layer_types(hf)):
            block, layer = f"blocks/{i}", f"{prefix}layers.{i}."
            rules += [
                copy(f"{block}/mixer_norm/weight", f"{layer}input_layernorm.weight"),
                copy(f"{block}/mlp_norm/weight", f"{layer}post_attention_layernorm.weight"),
                *mlp_rules(block, layer),
            ]
            mixer = f"{block}/mixer"
            if kind == "linear_attention":
                rules += gated_deltanet_rules(mixer, f"{layer}linear_attn.", names, hf)
                continue
            attn = f"{layer}self_attn."
            rules += [
                linear(
                    f"{mixer}/qkv_proj/kernel",
                    Piece(f"{attn}q_proj.weight", q_rows),
                    rows(f"{attn}k_proj.weight", G * head_dim),
                    rows(f"{attn}v_proj.weight", G * head_dim),
                ),
                linear(f"{mixer}/gate_proj/kernel", Piece(f"{attn}q_proj.weight", gate_rows)),
                copy(f"{mixer}/q_norm/weight", f"{attn}q_norm.weight"),
                copy(f"{mixer}/k_norm/weight", f"{attn}k_norm.weight"),
                linear(f"{mixer}/out_proj/kernel", f"{attn}o_proj.weight"),
            ]
        return rules


class OlmoHybrid:
    """OLMo Hybrid (OlmoHybridForCausalLM): gated DeltaNet layers (pre-norm, beta in (0, 2)
    with negative eigenvalues allowed) and OLMo 2 attention layers (post-norm, q/k RMSNorm over
    all heads at once).

    Tensor names are those on disk, as the release and transformers' save_pretrained write
    them (transformers renames them when loading): a gated DeltaNet layer's norms are
    attention_layer_norm and feedforward_layer_norm, its short convolution three tensors
    q_conv1d, k_conv1d, v_conv1d (one depthwise convolution over concat(q, k, v) is exactly
    the three side by side); an attention layer's post-attention norm is feedforward_layer_norm
    and its post-MLP norm post_feedforward_layernorm."""

    model_type = "olmo_hybrid"
    architecture = "OlmoHybridForCausalLM"
    MAPPED = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps",
        "rope_parameters", "rope_scaling", "attention_bias", "head_dim", "layer_types",
        "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "linear_allow_neg_eigval",
        "linear_a_log_min", "linear_a_log_max", "linear_dt_min", "linear_dt_max",
        "linear_dt_init_floor",
    }  # fmt: skip
    ROPE_KEYS = {"rope_theta", "rope_type"}
    IGNORED = ("mtp.",)
    PREFIXES = ("model.",)
    GATED_NORM_EPS = 1e-5  # the gated DeltaNet's output norm: fixed in the release's code

    @staticmethod
    def resolved(hf: dict) -> dict:
        """The config with the defaults OlmoHybridConfig fills in."""
        hf = dict(hf)
        H = hf.setdefault("num_attention_heads", 30)
        hf.setdefault("num_key_value_heads", H)
        hf.setdefault("linear_num_key_heads", H)
        hf.setdefault("linear_num_value_heads", H)
        hf.setdefault(
            "linear_key_head_dim", int(0.75 * hf["hidden_size"] / hf["linear_num_key_heads"])
        )
        hf.setdefault("linear_value_head_dim", 2 * hf["linear_key_head_dim"])
        if hf.get("layer_types") is None:
            n = hf["num_hidden_layers"]
            types = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(n)]
            if "full_attention" not in types:
                types[-1] = "full_attention"
            hf["layer_types"] = types
        return hf

    @classmethod
    def model_section(cls, hf: dict) -> dict:
        check_fields(hf, cls.model_type, cls.MAPPED)
        hf = cls.resolved(hf)
        base, _ = rope(hf, 1.0, cls.ROPE_KEYS)
        H = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // H
        attention = {
            "mixer": "attention",
            "num_heads": H,
            "num_kv_heads": hf["num_key_value_heads"],
            "key_dim": head_dim,
            "value_dim": head_dim,
            "attention_qk_norm": "all",
            "block_norm": "post",
        }
        if base is None:
            attention["rotary_dim"] = 0  # no position embedding (OLMo's NoPE)
        else:
            attention["rope_base"] = base
        beta_range = "0,2" if hf.get("linear_allow_neg_eigval", True) else "0,1"
        fwp = gated_deltanet_layer(hf, beta_range, cls.GATED_NORM_EPS)
        mixers = [fwp if t == "linear_attention" else attention for t in hf["layer_types"]]
        return common_section(hf, H, head_dim, mixers, zero_centred=False)

    @classmethod
    def rules(cls, hf: dict, prefix: str) -> list[Rule]:
        hf = cls.resolved(hf)
        H, G = hf["num_attention_heads"], hf["num_key_value_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // H
        rules = outer_rules(hf, prefix)
        names = {"qkv": ["q_proj", "k_proj", "v_proj"],
                 "conv": ["q_conv1d", "k_conv1d", "v_conv1d"], "beta": "b_proj",
                 "alpha": "a_proj", "norm": "o_norm", "gate": "g_proj",
                 "out": "o_proj"}  # fmt: skip
        for i, kind in enumerate(hf["layer_types"]):
            block, layer, mixer = f"blocks/{i}", f"{prefix}layers.{i}.", f"blocks/{i}/mixer"
            rules += mlp_rules(block, layer)
            if kind == "linear_attention":
                rules += [
                    copy(f"{block}/mixer_norm/weight", f"{layer}attention_layer_norm.weight"),
                    copy(f"{block}/mlp_norm/weight", f"{layer}feedforward_layer_norm.weight"),
                    *gated_deltanet_rules(mixer, f"{layer}linear_attn.", names, hf),
                ]
                continue
            attn = f"{layer}self_attn."
            rules += [
                copy(f"{block}/mixer_norm/weight", f"{layer}feedforward_layer_norm.weight"),
                copy(f"{block}/mlp_norm/weight", f"{layer}post_feedforward_layernorm.weight"),
                linear(
                    f"{mixer}/qkv_proj/kernel",
                    rows(f"{attn}q_proj.weight", H * head_dim),
                    rows(f"{attn}k_proj.weight", G * head_dim),
                    rows(f"{attn}v_proj.weight", G * head_dim),
                ),
                copy(f"{mixer}/q_norm/weight", f"{attn}q_norm.weight"),
                copy(f"{mixer}/k_norm/weight", f"{attn}k_norm.weight"),
                linear(f"{mixer}/out_proj/kernel", f"{attn}o_proj.weight"),
            ]
        return rules


def common_section(hf: dict, heads: int, head_dim: int, mixers: list, zero_centred: bool):
    """The model section: what every layer shares, then one mapping per layer."""
    return {
        "d_model": hf["hidden_size"],
        "vocab_size": hf["vocab_size"],
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "mlp_hidden": hf["intermediate_size"],
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "zero_centred_norm": zero_centred,
        "num_heads": heads,
        "key_dim": head_dim,
        "value_dim": head_dim,
        "mixers": mixers,
    }


class Qwen3Next(Qwen35):
    """Qwen3-Next (Qwen3NextForCausalLM): Qwen3.5's layers with a sparse mixture of experts and
    a gated shared expert as the MLP, and the gated DeltaNet's projections fused per key-head
    group: in_proj_qkvz rows are, for each key head g, [q_g, k_g, v and z of its value heads],
    in_proj_ba rows [b, a of its value heads]."""

    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    MAPPED = (Qwen35.MAPPED - {"attn_output_gate", "mamba_ssm_dtype", "mtp_num_hidden_layers",
              "mtp_use_dedicated_embeddings"}) | {
        "decoder_sparse_step", "moe_intermediate_size", "shared_expert_intermediate_size",
        "num_experts_per_tok", "num_experts", "norm_topk_prob", "output_router_logits",
        "router_aux_loss_coef", "mlp_only_layers",
    }  # fmt: skip
    IGNORED = ("mtp.",)
    PREFIXES = ("model.",)

    @staticmethod
    def sparse(hf: dict, i: int) -> bool:
        """Whether layer i's MLP is the mixture of experts."""
        experts, step = hf.get("num_experts", 512), hf.get("decoder_sparse_step", 1)
        return i not in (hf.get("mlp_only_layers") or []) and experts > 0 and (i + 1) % step == 0

    @classmethod
    def model_section(cls, hf: dict) -> dict:
        section = Qwen35.model_section.__func__(cls, hf)  # its gate on attention is always on
        layers = []
        for i, layer in enumerate(section["mixers"]):
            layer = dict(layer)
            if cls.sparse(hf, i):
                layer |= {
                    "mlp_hidden": hf.get("moe_intermediate_size", 512),
                    "moe_experts": hf.get("num_experts", 512),
                    "moe_top_k": hf.get("num_experts_per_tok", 10),
                    "moe_norm_top_k": bool(hf.get("norm_topk_prob", True)),
                    "moe_shared_hidden": hf.get("shared_expert_intermediate_size", 512),
                }
            layers.append(layer)
        return section | {"mixers": layers}

    @classmethod
    def rules(cls, hf: dict, prefix: str) -> list[Rule]:
        rules = []
        Hk, Hv = hf["linear_num_key_heads"], hf["linear_num_value_heads"]
        Kd, Vd, r = hf["linear_key_head_dim"], hf["linear_value_head_dim"], Hv // Hk
        group = 2 * Kd + 2 * r * Vd  # in_proj_qkvz rows per key head
        at = np.arange(Hk)[:, None] * group  # [Hk, 1]
        part = lambda start, width: tuple((at + start + np.arange(width)).ravel().tolist())  # noqa: E731
        q, k, v, z = part(0, Kd), part(Kd, Kd), part(2 * Kd, r * Vd), part(2 * Kd + r * Vd, r * Vd)
        ba = np.arange(Hk)[:, None] * 2 * r
        b = tuple((ba + np.arange(r)).ravel().tolist())
        a = tuple((ba + r + np.arange(r)).ravel().tolist())
        for rule in Qwen35.rules.__func__(cls, hf, prefix):
            name = rule.pieces[0].name
            if "linear_attn.in_proj_qkv." in name:
                fused = name.replace("in_proj_qkv", "in_proj_qkvz")
                rule = linear(rule.target, Piece(fused, q), Piece(fused, k), Piece(fused, v))
            elif "linear_attn.in_proj_z." in name:
                rule = linear(rule.target, Piece(name.replace("in_proj_z", "in_proj_qkvz"), z))
            elif "linear_attn.in_proj_b." in name:
                rule = linear(rule.target, Piece(name.replace("in_proj_b", "in_proj_ba"), b))
            elif "linear_attn.in_proj_a." in name:
                rule = linear(rule.target, Piece(name.replace("in_proj_a", "in_proj_ba"), a))
            elif ".mlp." in name and cls.sparse(hf, int(name.split("layers.")[1].split(".")[0])):
                continue  # the experts below take the MLP's place
            rules.append(rule)
        for i in range(hf["num_hidden_layers"]):
            if cls.sparse(hf, i):
                rules += expert_rules(f"blocks/{i}/mlp", f"{prefix}layers.{i}.mlp.", hf)
        return rules


def expert_rules(mlp: str, layer: str, hf: dict) -> list[Rule]:
    experts = range(hf.get("num_experts", 512))
    stacked = lambda part: tuple(Piece(f"{layer}experts.{e}.{part}.weight") for e in experts)  # noqa: E731
    return [
        linear(f"{mlp}/router/kernel", f"{layer}gate.weight"),
        Rule(f"{mlp}/gate", "experts", stacked("gate_proj")),
        Rule(f"{mlp}/up", "experts", stacked("up_proj")),
        Rule(f"{mlp}/down", "experts", stacked("down_proj")),
        linear(f"{mlp}/shared/gate/kernel", f"{layer}shared_expert.gate_proj.weight"),
        linear(f"{mlp}/shared/up/kernel", f"{layer}shared_expert.up_proj.weight"),
        linear(f"{mlp}/shared/down/kernel", f"{layer}shared_expert.down_proj.weight"),
        linear(f"{mlp}/shared_gate/kernel", f"{layer}shared_expert_gate.weight"),
    ]


ARCHITECTURES = {arch.model_type: arch for arch in (Qwen35, OlmoHybrid, Qwen3Next)}
# model_type -> how its text model is found: (the key of its text config or None, tensor prefix)
CONTAINERS = {"qwen3_5": ("text_config", "model.language_model.")}


def resolve(raw: dict):
    """(architecture, its config, the prefix of its text model's tensors) of a config.json;
    InteropError naming the model_type if it is not one fwpzoo maps."""
    model_type = raw.get("model_type")
    if model_type in CONTAINERS:
        key, prefix = CONTAINERS[model_type]
        text = dict(raw.get(key) or {})
        text.setdefault("model_type", "qwen3_5_text")
        if text["model_type"] not in ARCHITECTURES:
            raise InteropError(f"the {key} of {model_type} has model_type {text['model_type']!r}")
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        return ARCHITECTURES[text["model_type"]], text, prefix
    if model_type not in ARCHITECTURES:
        valid = ", ".join([*ARCHITECTURES, *CONTAINERS])
        raise InteropError(f"model_type {model_type!r} is not supported; supported: {valid}")
    return ARCHITECTURES[model_type], raw, "model."
