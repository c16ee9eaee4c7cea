"""The fast weight programmer mixer: a layer around any cell family and any of its forms.

    x [B, T, D] -> q, k, v and the family's gates -> optional short causal conv on q, k, v
    -> feature map phi and q/k normalisation -> q * scale -> cell form (state: the cell's)
    -> optional per-head RMSNorm and SiLU output gate -> output projection [B, T, D]

K below is the key feature dim (phi's output size). The form (recurrent, chunkwise, associative)
is the layer's config value (FWPConfig: a model-wide form the cell has not resolves once, with a
note, to recurrent; see fwpzoo.layers.base) and is used as given; decoding calls the cell's
`step`.

What the layer makes for a cell comes from the cell module itself (fwpzoo.cells._spec): each gate
of GATE_SPECS gets a projection (or, static, a parameter) and the activation that keeps it in its
range; a cell whose OBJECTIVE takes N gradient steps per token gets N keys and values per token;
the zero state and the cache follow OBJECTIVE.state. No code here names a cell.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo import cells
from fwpzoo.cells import FORMS, _spec
from fwpzoo.cells.deep.inner import FAST_NETS, OPTIMIZERS
from fwpzoo.cells.forms import reset_option, run_form
from fwpzoo.layers import context
from fwpzoo.layers.base import (
    CellMixer,
    Description,
    FixedRandom,
    MixerConfig,
    StateCache,
    cell_fast_weights,
    cell_zero_state,
    check_decay_init,
    floats_of,
    mean_state_norm,
)
from fwpzoo.layers.conv import ShortConv
from fwpzoo.layers.feature_maps import (
    apply_feature_map,
    check_qk_norm,
    favor_projection,
    feature_dim,
    qk_normalize,
)
from fwpzoo.layers.gates import BETA_RANGES, GATE_ACTIVATIONS, StaticGate, TokenGate, beta_scale
from fwpzoo.layers.norms import RMSNorm

DECAYS: tuple[str, ...] = ("scalar", "per_key")  # model.decay, for gates that take either
CONV_ACTIVATIONS: tuple[str, ...] = ("none", "silu")  # model.conv_activation


def has_sub_steps(module) -> bool:
    """Whether the cell takes N keys and values per token (N gradient steps per token)."""
    return module.OBJECTIVE.step == _spec.GRADIENT_STEPS


def active_gates(module, optional: bool) -> tuple[_spec.Gate, ...]:
    """The gates the layer makes: all but the optional ones unless `optional` (product_decay)."""
    return tuple(gate for gate in module.GATE_SPECS if optional or not gate.optional)


def check_decay(cell: str, decay: str) -> None:
    """model.decay: one of DECAYS, and per_key only for a cell with a gate that takes it."""
    if decay not in DECAYS:
        raise ValueError(f"unknown model.decay {decay!r}; valid choices: {', '.join(DECAYS)}")
    takes = lambda m: any(g.takes_per_key for g in m.GATE_SPECS)  # noqa: E731
    if decay == "per_key" and not takes(cells.get(cell)):
        valid = ", ".join(name for name, m in cells.CELLS.items() if takes(m))
        raise ValueError(
            f"model.decay='per_key' needs a cell with a per-key decay, and cell {cell!r} has "
            f"none; cells with one: {valid}"
        )


def check_beta_init(cell: str, beta_init: float | None, beta_range: str) -> None:
    """model.beta_init: None, or a value inside beta's range for a cell that has a beta."""
    if beta_init is None:
        return
    has_beta = lambda m: any(g.range == _spec.BETA for g in m.GATE_SPECS)  # noqa: E731
    if not has_beta(cells.get(cell)):
        valid = ", ".join(name for name, m in cells.CELLS.items() if has_beta(m))
        raise ValueError(
            f"model.beta_init needs a cell with a write strength beta, and cell {cell!r} has "
            f"none; cells with one: {valid}"
        )
    top = beta_scale(beta_range)
    if not 0 < beta_init < top:
        raise ValueError(
            f"model.beta_init must be in (0, {top:g}) for beta_range {beta_range!r}, "
            f"got {beta_init}"
        )


# The deep fast-weight fields and their defaults: a cell takes those its OPTIONS name.
INNER_FIELDS = {
    "fast_net": "linear",
    "fast_hidden": None,
    "inner_optimizer": "sgd",
    "inner_batch": 1,
    "inner_window": 1,
}


def check_inner(cfg) -> None:
    """model.fast_net, fast_hidden, inner_optimizer, inner_batch, inner_window: valid values,
    set only for a cell that takes them, and an inner_batch that divides chunk_size in the
    chunkwise form (a chunk holds whole inner mini-batches)."""
    for key, valid in (("fast_net", FAST_NETS), ("inner_optimizer", OPTIMIZERS)):
        if getattr(cfg, key) not in valid:
            choices = ", ".join(valid)
            raise ValueError(f"unknown model.{key} {getattr(cfg, key)!r}; valid choices: {choices}")
    for key in ("fast_hidden", "inner_batch", "inner_window"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise ValueError(f"model.{key} must be >= 1, got {value}")
    takes = lambda m, field: field in getattr(m, "OPTIONS", {}).values()  # noqa: E731
    module = cells.get(cfg.cell)
    for field, default in INNER_FIELDS.items():
        if getattr(cfg, field) != default and not takes(module, field):
            valid = ", ".join(name for name, m in cells.CELLS.items() if takes(m, field))
            raise ValueError(
                f"model.{field}={getattr(cfg, field)!r} needs a cell that takes it, and cell "
                f"{cfg.cell!r} does not; cells that take it: {valid}"
            )
    if cfg.form == "chunkwise" and cfg.chunk_size % cfg.inner_batch:
        sizes = range(1, cfg.chunk_size + 1)
        divisors = ", ".join(str(d) for d in sizes if cfg.chunk_size % d == 0)
        raise ValueError(
            f"model.inner_batch={cfg.inner_batch} must divide model.chunk_size={cfg.chunk_size} "
            f"(a chunk holds whole inner mini-batches); valid inner_batch: {divisors}"
        )


def check_decodable(cfg) -> None:
    """Decoding runs the cell's `step`, one token per inner step: a ValueError naming the
    field for a layer whose cell takes model.inner_batch and has it above 1 (the state holds no
    mini-batch in progress). cfg: a ModelConfig."""
    for i, layer in enumerate(cfg.layers()):
        takes = "inner_batch" in getattr(cells.get(layer.cell), "OPTIONS", {}).values()
        if "fwp" in layer.mixers and takes and layer.inner_batch > 1:
            raise ValueError(
                f"model.mixers[{i}] ({layer.cell}) has model.inner_batch={layer.inner_batch}; "
                "decoding takes one token per inner step (valid: inner_batch 1), since the "
                "state holds no mini-batch in progress"
            )


def beta_bias(beta_init: float | None, beta_max: float) -> float | None:
    """The pre-activation bias that starts beta = beta_max * sigmoid(bias) at beta_init."""
    if beta_init is None:
        return None
    p = beta_init / beta_max
    return math.log(p / (1 - p))


def gate_values(specs, gates) -> dict:
    """The per-token gates, a log decay `log_x` as its factor `x`, each averaged over every axis
    after the first two: one token's [B, H(, N | K)] -> [B, H]; static gates left out."""
    out = {}
    for gate in specs:
        if gate.shape == _spec.STATIC:
            continue
        value = gates[gate.name]
        name = gate.name
        if gate.range == _spec.LOG_DECAY and name.startswith("log_"):
            value, name = jnp.exp(value), name[4:]
        out[name] = value.reshape(*value.shape[:2], -1).mean(-1)
    return out


def gate_means(specs, gates) -> dict:
    """Mean of every per-token gate: `{name}_mean`; a log decay `log_x` as the mean of the
    factor exp(log_x), `x_mean` (alpha_mean for log_alpha)."""
    return {f"{name}_mean": jnp.mean(value) for name, value in gate_values(specs, gates).items()}


@dataclass(frozen=True, kw_only=True)
class FWPConfig(MixerConfig):
    """The fields the FWP layer reads, head sizes resolved: num_value_heads (the cell's heads H)
    and key_dim (before the feature map) and value_dim per head. The fields with a default are
    the fwp layer's own (see MixerConfig); the others are shared."""

    MIXER: ClassVar[str] = "fwp"
    CONTEXT_IN_CHUNKS: ClassVar[bool] = True
    CHOICES: ClassVar[dict] = {
        "cell": tuple(cells.CELLS),
        "beta_range": tuple(BETA_RANGES),
        "decay": DECAYS,
        "fast_net": FAST_NETS,
        "inner_optimizer": OPTIMIZERS,
        "conv_activation": CONV_ACTIVATIONS,
    }
    MINIMUM: ClassVar[dict] = {
        "num_value_heads": 1,
        "num_householder": 1,
        "fast_hidden": 1,
        "inner_batch": 1,
        "inner_window": 1,
    }
    ABOVE: ClassVar[dict] = {"qk_scale": 0, "output_norm_eps": 0}

    num_heads: int  # key (and query) heads
    # H: value heads, a multiple of num_heads (the key heads); each key head serves
    # num_value_heads / num_heads consecutive value heads, each with its own state and gates.
    # None: num_heads (resolved in the view)
    num_value_heads: int | None = None
    key_dim: int
    value_dim: int
    cell: str = "delta_rule"  # a name in fwpzoo.cells.CELLS
    form: str
    chunk_size: int
    matmul_precision: str
    feature_map: str
    dpfp_nu: int
    favor_features: int
    qk_norm: str
    qk_scale: float | None = None  # multiplies q; None means key feature dim ** -0.5
    # "0,1": sigmoid; "0,2": 2 * sigmoid (negative eigenvalues); "0,0.1": 0.1 * sigmoid (a bounded
    # inner step for a deep cell)
    beta_range: str = "0,1"
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
    decay_a_range: tuple[float, ...]
    decay_dt_range: tuple[float, ...]
    conv_size: int
    conv_activation: str = "none"  # none | silu: after the short convolution on q, k, v
    output_norm: bool
    output_norm_eps: float | None = None  # the output norm's epsilon; None: norm_eps
    norm_eps: float
    output_gate: bool
    gate_activation: str

    @classmethod
    def resolve(cls, values):
        values = super().resolve(values)
        values["num_value_heads"] = values["num_value_heads"] or values["num_heads"]
        return values

    @classmethod
    def forms(cls, values):
        return tuple(form for form in FORMS if hasattr(cells.get(values["cell"]), form))

    @classmethod
    def kind(cls, values):
        return f" (cell {values['cell']})"

    def check(self):
        if self.num_value_heads % self.num_heads:
            raise ValueError(
                f"model.num_value_heads={self.num_value_heads} and model.num_heads="
                f"{self.num_heads}: the value heads must be a multiple of the key heads"
            )
        check_qk_norm(self.qk_norm, self.feature_map)
        check_decay(self.cell, self.decay)
        check_beta_init(self.cell, self.beta_init, self.beta_range)
        check_inner(self)
        check_decay_init(self)

    def context_refusal(self, where):
        if cells.get(self.cell).OBJECTIVE.state.transition != _spec.NOT_AFFINE:
            return None
        return (
            f"{where} cell {self.cell} is not affine in its state, so a span of "
            f"its tokens has no summary and its sequence cannot split: use mesh.context=1"
        )

    @property
    def feature_dim(self) -> int:
        """K: the key feature dim, phi's output size."""
        return feature_dim(
            self.feature_map, self.key_dim, nu=self.dpfp_nu, num_features=self.favor_features
        )

    def options(self) -> tuple:
        """The static arguments of the cell's forms, from the fields its OPTIONS name, as pairs
        (a module's static attributes must be hashable)."""
        options = getattr(cells.get(self.cell), "OPTIONS", {})
        return tuple((arg, getattr(self, field)) for arg, field in options.items())

    def describe(self) -> Description:
        H, K, V = self.num_value_heads, self.feature_dim, self.value_dim
        options = dict(self.options())
        state = jax.eval_shape(lambda: cell_zero_state(self.cell, 1, H, K, V, options))
        return Description("fwp", self.cell, K, H, floats_of(state), form=self.form)


class FWPMixer(CellMixer):
    """The FWP layer of a model config `cfg` (its fields: FWPConfig)."""

    Config = FWPConfig

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        module = cells.get(cfg.cell)
        H_k = cfg.num_heads  # key (and query) heads
        H = cfg.num_value_heads  # value heads: the cell's heads, each its own state
        head_dim, V, K = cfg.key_dim, cfg.value_dim, cfg.feature_dim  # head_dim: before phi
        self.sub_steps = has_sub_steps(module)
        self.unit_values = module.OBJECTIVE.unit_values
        N = cfg.num_householder if self.sub_steps else 1  # writes per token
        self.cell, self.form, self.chunk_size = cfg.cell, cfg.form, cfg.chunk_size
        self.matmul_precision = cfg.matmul_precision
        self.feature_map, self.dpfp_nu, self.qk_norm = cfg.feature_map, cfg.dpfp_nu, cfg.qk_norm
        self.H, self.head_dim, self.K, self.V, self.N = H, head_dim, K, V, N
        self.H_k = H_k
        self.conv_activation = cfg.conv_activation
        self.scale = cfg.qk_scale if cfg.qk_scale is not None else K**-0.5
        self.dtype = dtype
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731

        self.qkv_width = H_k * head_dim * (1 + N) + H * N * V
        self.qkv_proj = linear(cfg.d_model, self.qkv_width)
        self.conv = (
            ShortConv(self.qkv_width, cfg.conv_size, rngs=rngs, dtype=dtype)
            if cfg.conv_size > 0
            else None
        )
        self.projection = (
            FixedRandom(favor_projection(rngs.params(), head_dim, cfg.favor_features))
            if cfg.feature_map == "favor"
            else None
        )
        self.options = cfg.options()  # static arguments of the cell's forms
        specs_for = getattr(module, "gate_specs", None)  # gates that depend on the options
        self.gate_specs = (
            specs_for(**dict(self.options))
            if specs_for
            else active_gates(module, cfg.product_decay)
        )
        beta_max = beta_scale(cfg.beta_range)
        per_key = cfg.decay == "per_key"
        gates = {}
        for gate in self.gate_specs:
            shape = gate.head_shape(H, K, N, per_key, V)
            bias = beta_bias(cfg.beta_init, beta_max) if gate.range == _spec.BETA else None
            if gate.shape == _spec.STATIC:
                gates[gate.name] = StaticGate(gate, shape, beta_max, bias)
            else:
                decay_init = (cfg.decay_a_range, cfg.decay_dt_range)
                gates[gate.name] = TokenGate(
                    gate, cfg.d_model, shape, beta_max, decay_init, bias, rngs=rngs, dtype=dtype
                )
        self.gates = nnx.Dict(gates)
        out_eps = cfg.output_norm_eps or cfg.norm_eps
        self.out_norm = RMSNorm(V, eps=out_eps) if cfg.output_norm else None
        self.gate_proj = linear(cfg.d_model, H * V) if cfg.output_gate else None
        self.gate_activation = GATE_ACTIVATIONS[cfg.gate_activation]
        self.out_proj = linear(H * V, cfg.d_model)

    # the entry points: see fwpzoo.layers.base; all but inspect_step come from Mixer and CellMixer

    def inspect_step(self, x, cache, reset=None):
        """decode_step (the cell's `step`), plus the token's gates {name: [B, H]} (a log decay as
        its factor, a gate with sub-steps or keys averaged over them)."""
        reset_t = None if reset is None else reset[:, None]  # [B, 1]
        q, k, v, gates, buffer = self._inputs(x[:, None], cache.conv, reset_t)
        at_0 = lambda a: a[:, 0]  # noqa: E731  drop the time axis of length 1
        step = cells.get(self.cell).step
        # per-token gates sliced at the token, static ones whole
        gates = {
            name: gate if spec.shape == _spec.STATIC else at_0(gate)
            for spec, (name, gate) in zip(self.gate_specs, gates.items(), strict=True)
        }
        inputs = (at_0(q), at_0(k), at_0(v))
        options = dict(self.options)
        state, o = step(cache.state, *inputs, **reset_option(reset), **gates, **options)
        y = self._output(o[:, None], x[:, None])[:, 0]
        return y, StateCache(state, buffer), gate_values(self.gate_specs, gates)

    def cell_inputs(self, x):
        """x [B, T, D], read from the start -> the cell's inputs: {"q": [B, T, H, K], "k", "v":
        [B, T, H, (N,) K | V], each gate: per-token [B, T, H, ...] or static [H, K]}; the
        family's forms map them, with a state, to this layer's outputs before its projection."""
        q, k, v, gates, _ = self._inputs(x, None)
        return {"q": q, "k": k, "v": v, **gates}

    # the pieces ------------------------------------------------------------------------------

    def _run(self, x, state, buffer, reset):
        q, k, v, gates, buffer = self._inputs(x, buffer, reset)
        if state is None and context.context_mesh() is not None:  # the sequence split: exact
            inputs = (q, k, v, gates, reset)
            precision = self.matmul_precision
            o, state = context.run_cell(
                self.cell, self.chunk_size, self._form, *inputs, precision=precision
            )
        else:
            o, state = self._form(q, k, v, state, gates, reset)
        weights = cell_fast_weights(self.cell, state)
        stats = {"state_norm": mean_state_norm(weights)} | gate_means(self.gate_specs, gates)
        return self._output(o, x), state, buffer, stats

    def _form(self, q, k, v, state, gates, reset):
        gates = gates | dict(self.options)  # the options ride along as keywords of the form
        precision = self.matmul_precision
        cell, form, chunk_size = self.cell, self.form, self.chunk_size
        return run_form(cell, form, chunk_size, q, k, v, state, gates, reset, precision)

    def _inputs(self, x, buffer, reset=None):
        """x [B, T, D] -> q [B, T, H, K], k, v ([B, T, H, (N,) K | V]: an N axis for a cell with
        sub-steps), the gates (per-token [B, T, ...], static [H, K])."""
        B, T, _ = x.shape
        H, H_k, N, head_dim, V = self.H, self.H_k, self.N, self.head_dim, self.V
        qkv = self.qkv_proj(x)  # [B, T, H_k (1 + N) head_dim + H N V]
        if self.conv is not None:
            qkv, buffer = context.short_conv(self.conv, qkv, buffer, reset)
        if self.conv_activation == "silu":  # on q, k and v alike (gated DeltaNet)
            qkv = jax.nn.silu(qkv)
        q, k, v = jnp.split(qkv, [H_k * head_dim, H_k * head_dim * (1 + N)], axis=-1)
        q = self._features(q.reshape(B, T, H_k, head_dim)) * self.scale  # [B, T, H_k, K]
        k = self._features(k.reshape(B, T, H_k, N, head_dim))  # [B, T, H_k, N, K]
        if H_k != H:  # each key head serves H / H_k consecutive value heads
            q, k = jnp.repeat(q, H // H_k, axis=2), jnp.repeat(k, H // H_k, axis=2)
        v = v.reshape(B, T, H, N, V)  # [B, T, H, N, V]
        if self.unit_values:  # the rule is stable only for unit values (its OBJECTIVE says)
            v = qk_normalize(v.astype(jnp.float32), "l2")
        gates = {
            spec.name: self.gates[spec.name]()
            if spec.shape == _spec.STATIC
            else self.gates[spec.name](x)
            for spec in self.gate_specs
        }  # [B, T, H(, N | K)] per token, [H, K] static
        if not self.sub_steps:  # one write per token: drop the N axis
            k, v = k[:, :, :, 0], v[:, :, :, 0]
        gates = _spec.tie(self.gate_specs, gates, k)
        return q.astype(self.dtype), k.astype(self.dtype), v, gates, buffer

    def _features(self, x):
        """phi then the q/k norm over the last axis: [..., head_dim] -> [..., K], float32."""
        projection = None if self.projection is None else self.projection[...]
        phi = apply_feature_map(
            self.feature_map, x.astype(jnp.float32), nu=self.dpfp_nu, projection=projection
        )
        return qk_normalize(phi, self.qk_norm)

    def _output(self, o, x):
        """o [B, T, H, V] -> y [B, T, D]."""
        B, T = o.shape[:2]
        o = o.astype(self.dtype)
        if self.out_norm is not None:
            o = self.out_norm(o)
        if self.gate_proj is not None:
            o = o * self.gate_activation(self.gate_proj(x).reshape(B, T, self.H, self.V))
        return self.out_proj(o.reshape(B, T, self.H * self.V))
