"""The layers on their own: FWP mixer options, gates, the SSM scan, the conv buffer, registries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh

from fwpzoo import cells
from fwpzoo.cells.forms import run_form
from fwpzoo.layers import MIXERS, Description, FWPMixer, get_mixer
from fwpzoo.layers.conv import ShortConv
from fwpzoo.layers.feature_maps import FEATURE_MAPS, feature_dim, qk_normalize
from fwpzoo.layers.gates import beta_scale
from fwpzoo.layers.mamba2 import signed_run
from fwpzoo.layers.programmed import initial_matrix
from fwpzoo.layers.ssm import linear_recurrence
from fwpzoo.models import ModelConfig

B, T, D = 2, 5, 8


def tiny(**overrides):
    base = dict(d_model=D, num_heads=2, form="recurrent", favor_features=3, dpfp_nu=2)
    return ModelConfig(**{**base, **overrides})


def inputs(seed=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(seed), shape)


# the order matters only for readability: every map once with l2, every norm once
FEATURE_MAP_CASES = [(name, "l2") for name in FEATURE_MAPS] + [("elu1", "sum"), ("relu", "none")]


@pytest.mark.parametrize(("feature_map", "qk_norm"), FEATURE_MAP_CASES)
def test_every_feature_map_and_qk_norm_builds_and_runs(feature_map, qk_norm):
    cfg = tiny(feature_map=feature_map, qk_norm=qk_norm, conv_size=0)
    mixer = FWPMixer(cfg, rngs=nnx.Rngs(0))
    y, stats = mixer(inputs(), return_intermediates=True)
    assert y.shape == (B, T, D)
    assert bool(jnp.all(jnp.isfinite(y)))
    expected_k = feature_dim(feature_map, D // 2, nu=2, num_features=3)
    assert mixer.init_cache(B, T).state.shape == (B, 2, expected_k, D // 2)
    assert float(stats["state_norm"]) > 0


def test_favor_projection_is_fixed_not_trained():
    mixer = FWPMixer(tiny(feature_map="favor"), rngs=nnx.Rngs(0))
    params = nnx.state(mixer, nnx.Param)
    flat_paths = ["/".join(map(str, path)) for path, _ in nnx.to_flat_state(params)]
    assert not any("projection" in path for path in flat_paths)
    assert mixer.projection[...].shape == (3, D // 2)


def test_qk_normalize():
    x = jnp.array([[1.0, 3.0], [3.0, 4.0]])
    np.testing.assert_allclose(qk_normalize(x, "sum"), [[0.25, 0.75], [3 / 7, 4 / 7]], rtol=1e-5)
    np.testing.assert_allclose(qk_normalize(x, "l2")[1], [0.6, 0.8], rtol=1e-5)
    np.testing.assert_array_equal(qk_normalize(x, "none"), x)


def test_sum_norm_needs_a_non_negative_feature_map():
    with pytest.raises(ValueError, match="non-negative feature map .*'identity'"):
        tiny(qk_norm="sum", feature_map="identity")


def _gates(cfg):
    """The gates an FWP layer of `cfg` writes on inputs(): its cell inputs but q, k and v."""
    written = FWPMixer(cfg, rngs=nnx.Rngs(3)).cell_inputs(inputs())
    return {name: x for name, x in written.items() if name not in ("q", "k", "v")}


def test_beta_range_0_2_doubles_beta():
    beta_01 = _gates(tiny(cell="delta_rule", beta_range="0,1"))["beta"]
    beta_02 = _gates(tiny(cell="delta_rule", beta_range="0,2"))["beta"]
    assert bool(jnp.all((beta_01 > 0) & (beta_01 < 1)))
    np.testing.assert_allclose(beta_02, 2 * beta_01, rtol=1e-6)
    assert float(beta_02.max()) > 1.0


@pytest.mark.parametrize(
    ("cell", "beta_range"), [("delta_rule", "0,1"), ("delta_product", "0,2"), ("deep", "0,0.1")]
)
def test_beta_init_sets_where_beta_starts(cell, beta_range):
    """beta starts at beta_init for a token whose projection is 0, and the bias it adds is a
    trained parameter; without beta_init the projection has no bias and beta starts at half."""
    top = beta_scale(beta_range)
    cfg = tiny(cell=cell, beta_range=beta_range, beta_init=0.1 * top)
    gate = FWPMixer(cfg, rngs=nnx.Rngs(0)).gates["beta"]
    zero = jnp.zeros((1, 1, cfg.d_model))
    np.testing.assert_allclose(gate(zero), 0.1 * top, rtol=1e-5)
    assert isinstance(gate.bias, nnx.Param)
    plain = FWPMixer(tiny(cell=cell, beta_range=beta_range), rngs=nnx.Rngs(0)).gates["beta"]
    assert plain.bias is None
    np.testing.assert_allclose(plain(zero), 0.5 * top, rtol=1e-6)
    # the bias shifts every token's beta the same way: lower than without it, token by token
    default = _gates(tiny(cell=cell, beta_range=beta_range))["beta"]
    assert bool(jnp.all(_gates(cfg)["beta"] < default))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"beta_init": 1.0}, "model.beta_init must be in \\(0, 1\\) for beta_range '0,1', got 1.0"),
        ({"beta_init": 0.0, "beta_range": "0,2"}, "must be in \\(0, 2\\) .* got 0.0"),
        ({"beta_init": 0.1, "cell": "linear_attn"}, "cell 'linear_attn' has none; .*delta_rule"),
        (
            {"beta_init": 0.1, "mixers": ({"mixer": "rdn", "beta_init": 0.1},)},
            "model.mixers\\[0\\].beta_init is not read by the rdn mixer",
        ),
    ],
)
def test_bad_beta_init_is_one_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


@pytest.mark.parametrize(
    ("cell", "overrides", "shapes"),
    [
        ("linear_attn", {}, {}),
        ("delta_rule", {}, {"beta": (B, T, 2)}),
        ("gated_linear_attn", {}, {"log_alpha": (B, T, 2)}),  # scalar (Mamba-2 SSD)
        ("gated_linear_attn", {"decay": "per_key"}, {"log_alpha": (B, T, 2, 4)}),  # GLA
        ("gated_delta_rule", {}, {"beta": (B, T, 2), "log_alpha": (B, T, 2)}),
        # Kimi Delta Attention
        ("gated_delta_rule", {"decay": "per_key"}, {"beta": (B, T, 2), "log_alpha": (B, T, 2, 4)}),
        ("delta_product", {"num_householder": 3}, {"beta": (B, T, 2, 3)}),
        (
            "delta_product",
            {"num_householder": 3, "product_decay": True},
            {"beta": (B, T, 2, 3), "log_alpha": (B, T, 2)},
        ),
    ],
)
def test_gate_shapes_follow_the_family(cell, overrides, shapes):
    gates = _gates(tiny(cell=cell, **overrides))
    assert {name: g.shape for name, g in gates.items()} == shapes
    if "log_alpha" in gates:
        assert bool(jnp.all(gates["log_alpha"] < 0))


@pytest.mark.parametrize(
    "mixer, cell", [("fwp", "delta_rule"), ("fwp", "gated_delta_rule"), ("mamba2", None)]
)
def test_cell_inputs_are_what_the_layer_feeds_its_cell(mixer, cell):
    """The cell's reference form on a layer's cell_inputs ends in the state the layer's own
    prefill leaves: the inputs are the ones its forms run on, gates included."""
    layer = get_mixer(mixer)(
        tiny(mixers=(mixer,), **({"cell": cell} if cell else {})), rngs=nnx.Rngs(1)
    )
    x = inputs(seed=4)
    _, cache = layer.prefill(x, layer.init_cache(B, T))
    _, state = cells.get(layer.cell).recurrent(**layer.cell_inputs(x))
    np.testing.assert_allclose(state, cache.state, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(state))) > 0  # a state something was written into


def test_per_key_decay_is_refused_for_a_cell_without_one():
    with pytest.raises(
        ValueError, match="cell 'delta_rule' has none; cells with one: .*gated_linear_attn"
    ):
        tiny(cell="delta_rule", decay="per_key")
    with pytest.raises(
        ValueError, match="unknown model.decay 'diagonal'; valid choices: scalar, per_key"
    ):
        tiny(cell="gated_linear_attn", decay="diagonal")


@pytest.mark.parametrize("mixer", ["fwp", "mamba2"])
def test_decay_init_ranges_set_where_alpha_starts(mixer):
    """alpha = exp(-A dt) of every head starts inside the bounds the A and dt ranges give, for a
    token whose projection is 0 (dt = softplus(dt_bias) = the drawn dt)."""
    ranges = {"decay_a_range": (1.0, 2.0), "decay_dt_range": (0.001, 0.005)}
    cfg = tiny(cell="gated_delta_rule", mixers=(mixer,), **ranges)
    layer = get_mixer(mixer)(cfg, rngs=nnx.Rngs(0))
    decay = layer.decay if mixer == "mamba2" else layer.gates["log_alpha"].decay
    alpha = jnp.exp(decay(jnp.zeros(decay.shape))[1])
    assert bool(jnp.all(alpha >= np.exp(-2.0 * 0.005) - 1e-6) and jnp.all(alpha <= np.exp(-0.001)))
    with pytest.raises(ValueError, match="model.decay_dt_range must be \\[low, high\\]"):
        tiny(decay_dt_range=(0.1, 0.01))


def signed_recurrence(q, k, v, alpha, state, reset):
    """Mamba-2's recurrence written out with a decay of either sign, alpha [B, T, H]:
    S_t = alpha_t S_{t-1} + k_t v_t^T (S_{t-1} = 0 at a reset), o_t = S_t^T q_t."""

    def step(state, token):
        q, k, v, alpha, reset = token
        write = k[..., :, None] * v[..., None, :]
        state = jnp.where(reset[:, None, None, None], 0.0, alpha[..., None, None] * state) + write
        return state, jnp.einsum("bhkv,bhk->bhv", state, q)

    state, o = jax.lax.scan(step, state, [jnp.swapaxes(x, 0, 1) for x in (q, k, v, alpha, reset)])
    return jnp.swapaxes(o, 0, 1), state


@pytest.mark.parametrize("form", ["recurrent", "chunkwise", "associative"])
def test_a_negative_decay_runs_through_every_form_as_the_signed_recurrence(form):
    """model.decay_range -1,1 runs the cell's log-space forms on |alpha| with the sign product
    folded into the values, outputs and final state: outputs, final state and the gradients of
    q, k, v, alpha and the initial state equal the signed recurrence's, with resets and a state
    carried in. Chunks of 4 over 11 tokens: padding included."""
    Bs, Ts, H, K, V = 2, 11, 3, 4, 5
    keys = jax.random.split(jax.random.key(0), 6)
    q, k = (jax.random.normal(key, (Bs, Ts, H, K)) for key in keys[:2])
    v = jax.random.normal(keys[2], (Bs, Ts, H, V))
    alpha = jax.random.uniform(keys[3], (Bs, Ts, H), minval=-1.0, maxval=1.0)
    state = jax.random.normal(keys[4], (Bs, H, K, V))
    reset = jnp.zeros((Bs, Ts), bool).at[0, 4].set(True).at[1, 0].set(True).at[1, 9].set(True)
    cotangent = jax.random.normal(keys[5], (Bs, Ts, H, V))
    assert bool(jnp.any(alpha < -0.5) and jnp.any(alpha > 0.5))

    def through_the_form(q, k, v, alpha, state):
        def run(v, log_decay):
            gates = {"log_alpha": log_decay}
            return run_form("gated_linear_attn", form, 4, q, k, v, state, gates, reset)

        return signed_run(run, v, alpha)

    @jax.jit
    def outputs_and_grads(args):
        def run_and_grad(fn):
            loss = lambda *a: jnp.sum(fn(*a)[0] * cotangent) + jnp.sum(fn(*a)[1] ** 2)  # noqa: E731
            return fn(*args), jax.grad(loss, argnums=range(5))(*args)

        written_out = lambda *a: signed_recurrence(*a, reset)  # noqa: E731
        return run_and_grad(through_the_form), run_and_grad(written_out)

    (got, grads), (want, expected) = outputs_and_grads((q, k, v, alpha, state))
    for name, a, b in zip(["o", "state"], got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
    for name, a, b in zip(["q", "k", "v", "alpha", "state"], grads, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_decay_range_is_a_mamba2_option():
    """Set for a layer that does not read it, it is refused; model-wide, it is the default of
    the layers that read it (the mamba2 ones) and inert for the others."""
    assert tiny(mixers=("mamba2",), decay_range="-1,1").decay_range == "-1,1"
    with pytest.raises(ValueError, match="model.mixers\\[0\\].decay_range is not read by the fwp"):
        tiny(mixers=({"mixer": "fwp", "decay_range": "-1,1"}, "mamba2"))
    model_wide = tiny(mixers=("fwp", "mamba2"), decay_range="-1,1").mixer_configs()
    assert not hasattr(model_wide[0], "decay_range") and model_wide[1].decay_range == "-1,1"
    hybrid = tiny(mixers=("fwp", {"mixer": "mamba2", "decay_range": "-1,1"}))
    assert [layer.decay_range for layer in hybrid.layers()] == ["0,1", "-1,1"]


def test_delta_product_takes_n_keys_and_values_per_token():
    mixer = FWPMixer(tiny(cell="delta_product", num_householder=3), rngs=nnx.Rngs(0))
    written = mixer.cell_inputs(inputs())
    assert written["q"].shape == (B, T, 2, 4)
    assert written["k"].shape == (B, T, 2, 3, 4)
    assert written["v"].shape == (B, T, 2, 3, 4)


def test_short_conv_is_causal_and_resumable():
    conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = inputs(shape=(B, 7, 3))
    full, buffer = conv(x)
    first, mid = conv(x[:, :2])
    second, end = conv(x[:, 2:], mid)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-6)
    np.testing.assert_array_equal(end, buffer)
    np.testing.assert_array_equal(buffer, x[:, -3:])
    # y_t by hand: sum_w kernel[w] x_{t - 3 + w}
    kernel = conv.kernel[...]
    by_hand = sum(kernel[w] * x[:, 6 - 3 + w] for w in range(4))
    np.testing.assert_allclose(full[:, 6], by_hand, atol=1e-6)


def _sequential_recurrence(a, b, h0):
    def body(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    time_major = (jnp.moveaxis(a, 1, 0), jnp.moveaxis(b, 1, 0))
    return jnp.moveaxis(jax.lax.scan(body, h0, time_major)[1], 0, 1)


@pytest.mark.parametrize("is_complex", [False, True])
def test_ssm_associative_scan_matches_sequential_reference(is_complex):
    keys = jax.random.split(jax.random.key(0), 6)
    shape = (B, 9, 4)
    a = jax.random.uniform(keys[0], shape, minval=0.5, maxval=0.99)
    b, h0 = jax.random.normal(keys[1], shape), jax.random.normal(keys[2], (B, 4))
    if is_complex:
        a = a * jnp.exp(1j * jax.random.uniform(keys[3], shape))
        b = b + 1j * jax.random.normal(keys[4], shape)
        h0 = h0 + 1j * jax.random.normal(keys[5], (B, 4))

    @jax.jit
    def outputs_and_grads(a, b, h0):
        def run(fn):
            loss = lambda *x: jnp.sum(jnp.abs(fn(*x)) ** 2)  # noqa: E731
            return fn(a, b, h0), jax.grad(loss, argnums=(0, 1, 2))(a, b, h0)

        return run(linear_recurrence), run(_sequential_recurrence)

    (h, grads), (h_ref, grads_ref) = outputs_and_grads(a, b, h0)
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_ssm_eigenvalues_stay_inside_the_unit_circle():
    mixer = get_mixer("ssm")(tiny(ssm_state_dim=16), rngs=nnx.Rngs(0))
    radius = jnp.abs(mixer._lambda())
    assert bool(jnp.all((radius > 0.85) & (radius < 1.0)))


def test_describe_tells_the_rule_the_feature_dim_and_the_state_from_the_config_alone():
    """D = 8, two heads of 4: fast weights H K V, a dict state counted whole, phi's size as the
    feature dim, attention's keys and values per token, a complex SSM state as two numbers."""
    from fwpzoo.layers import describe

    def of(**fields):
        return describe(tiny(**fields).layers()[0])

    assert of() == Description("fwp", "delta_rule", 4, 2, 2 * 4 * 4, form="recurrent")
    assert of(cell="momentum_delta").state_size == 2 * (2 * 4 * 4)  # S and its momentum M
    assert of(feature_map="dpfp").feature_dim == 2 * 4 * 2  # dpfp with nu = 2
    attention = of(mixers=("attention",), num_kv_heads=1)
    assert (attention.state_size, attention.per_token, attention.form) == (0, 1 * (4 + 4), None)
    assert attention.size_at(10) == 80
    assert of(mixers=("ssm",), ssm_state_dim=3).state_size == 6
    assert of(mixers=("mamba2",)).rule == "gated_linear_attn"
    srwm = of(mixers=("srwm",))
    assert (srwm.rule, srwm.feature_dim, srwm.state_size) == ("srwm", 4, 2 * (3 * 4 + 4) * 4)
    assert of(mixers=("plastic",)).rule == "plastic_input_hebb"


def test_unknown_mixer_lists_the_valid_names():
    with pytest.raises(
        ValueError, match="valid mixers: fwp, attention, mamba2, ssm, plastic, rdn, srwm"
    ):
        get_mixer("transformer")
    assert set(MIXERS) == {"fwp", "attention", "mamba2", "ssm", "plastic", "rdn", "srwm"}


@pytest.mark.parametrize(
    ("feature_map", "qk_norm"),
    [("identity", "l2"), ("silu", "none"), ("elu1", "none"), ("softmax", "l2")],
)
def test_srwm_refuses_a_feature_map_that_is_not_a_probability_map(feature_map, qk_norm):
    """Set for the layer, every pair is refused; model-wide, the model config's defaults
    (identity, l2) give way to srwm's own (softmax, none), any other value is srwm's."""
    layer = {"mixer": "srwm", "feature_map": feature_map, "qk_norm": qk_norm}
    refused = "probability feature map: model.mixers\\[0\\].feature_map"
    with pytest.raises(ValueError, match=refused):
        tiny(mixers=(layer,))
    if feature_map != "identity" and qk_norm != "l2":
        with pytest.raises(ValueError, match="srwm needs a probability feature map"):
            tiny(mixers=("srwm",), feature_map=feature_map, qk_norm=qk_norm)
    tiny(mixers=("rdn",), feature_map=feature_map, qk_norm=qk_norm)  # rdn takes any map


def test_srwm_takes_its_own_feature_map_where_the_models_is_the_default():
    (view,) = tiny(mixers=("srwm",)).mixer_configs()
    assert (view.feature_map, view.qk_norm) == ("softmax", "none")
    (view,) = tiny(mixers=("srwm",), feature_map="elu1", qk_norm="sum").mixer_configs()
    assert (view.feature_map, view.qk_norm) == ("elu1", "sum")


def test_srwm_initial_matrix_follows_the_papers_code():
    """Rows for y and k N(0, 1/D), for q 100x smaller, learning-rate entries N(-1, 1/D)."""
    H, D = 64, 16
    W0 = np.asarray(initial_matrix(jax.random.key(0), H, D))  # [H, 3D + 4, D]
    y_k, q, beta = W0[:, : 2 * D], W0[:, 2 * D : 3 * D], W0[:, 3 * D :]
    std = 1 / np.sqrt(D)
    assert abs(y_k.mean()) < 0.02 and abs(y_k.std() / std - 1) < 0.05
    assert abs(q.std() / (0.01 * std) - 1) < 0.05
    assert abs(beta.mean() + 1) < 0.03 and abs(beta.std() / std - 1) < 0.1


def test_rdn_with_zero_recurrence_is_a_delta_rule_layer():
    """R = 0: the rdn layer computes the delta rule on its projected phi(q), phi(k), v,
    sigmoid(beta)."""
    from fwpzoo.cells import delta_rule

    cfg = tiny(mixers=("rdn",), feature_map="softmax", qk_norm="none", output_norm=False)
    mixer = get_mixer("rdn")(cfg, rngs=nnx.Rngs(0))
    mixer.R[...] = jnp.zeros_like(mixer.R[...])
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    inputs, _ = mixer._inputs(x)
    phi = mixer.phi
    o, _ = delta_rule.recurrent(
        phi(inputs["q"]), phi(inputs["k"]), inputs["v"], beta=jax.nn.sigmoid(inputs["beta"])
    )
    np.testing.assert_allclose(mixer(x), mixer._output(o), atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "listing"),
    [
        ("cell", "deltanet", "delta_rule"),
        ("form", "parallel", "chunkwise"),
        ("feature_map", "gelu", "dpfp"),
        ("qk_norm", "l1", "l2"),
        ("beta_range", "0,3", "0,2"),
        ("mixers", ("fwp", "lstm"), "mamba2"),
    ],
)
def test_bad_names_raise_value_errors_listing_valid_ones(field, value, listing):
    with pytest.raises(
        ValueError, match=f"unknown model.{field}(\\[1\\])? .*valid choices: .*{listing}"
    ):
        tiny(**{field: value})


def test_a_form_a_mixer_lacks_runs_recurrent_model_wide_and_is_refused_per_layer(monkeypatch):
    """One rule for every mixer: a model-wide form the layer's mixer has not runs its exact
    sequential form, `recurrent`, and the config says so in one note; set for the layer itself,
    the form is refused, naming the forms it has."""
    from fwpzoo import cells

    monkeypatch.delattr(cells.get("delta_rule"), "associative", raising=False)
    cfg = tiny(cell="delta_rule", form="associative", mixers=("fwp", "fwp", "attention"))
    assert [view.form for view in cfg.mixer_configs()[:2]] == ["recurrent", "recurrent"]
    assert cfg.notes() == (
        "model.mixers[0, 1]: model.form=associative: the fwp mixer (cell delta_rule) has no "
        "associative form (its forms: recurrent, chunkwise), so it runs recurrent",
    )
    lacking = (
        "model.mixers\\[0\\].form 'associative': the fwp mixer \\(cell delta_rule\\) has no such "
        "form; its forms: recurrent, chunkwise"
    )
    with pytest.raises(ValueError, match=lacking):
        tiny(mixers=({"mixer": "fwp", "cell": "delta_rule", "form": "associative"},))
    assert tiny(form="recurrent").notes() == ()


def test_attention_can_express_a_previous_token_head():
    """Hand-set weights: every query is the shared key rotated back one position, so with rotary
    embeddings the score peaks at s = t - 1 whatever t is; the values are the token contents.
    The output is then the previous token: rotary angles relative in q and k, causal mask and
    value routing all have to be right (the first half of an induction head, as MQAR needs)."""
    from fwpzoo.layers.attention import Attention, rope

    vocab, length, K = 15, 40, 16
    attention = Attention(tiny(d_model=16, num_heads=1), rngs=nnx.Rngs(0))
    key = 8.0 * jnp.ones(K)  # every rotary frequency, so no other offset scores as high
    query = rope(key[None, None, None], jnp.array([-1]), attention.rope_base)[0, 0, 0]
    qkv = jnp.zeros((16, 3 * K))  # input dims: token one-hot in 0 .. 14, a constant 1 in 15
    qkv = qkv.at[15, :K].set(query).at[15, K : 2 * K].set(key)
    attention.qkv_proj.kernel[...] = qkv.at[:vocab, 2 * K : 2 * K + vocab].set(jnp.eye(vocab))
    attention.out_proj.kernel[...] = jnp.eye(16)
    tokens = jax.random.randint(jax.random.key(0), (B, length), 0, vocab)
    x = jnp.concatenate([jax.nn.one_hot(tokens, vocab), jnp.ones((B, length, 1))], axis=-1)
    y = attention(x)  # [B, T, D]
    np.testing.assert_allclose(y[:, 1:, :vocab], jax.nn.one_hot(tokens[:, :-1], vocab), atol=1e-3)
    np.testing.assert_allclose(y[:, 0, :vocab], jax.nn.one_hot(tokens[:, 0], vocab), atol=1e-3)


def test_attention_cache_refuses_writes_past_max_len():
    """A prefill longer than the cache raises; under jit, where the position is traced, the
    step whose write would not fit returns NaN instead of overwriting the newest keys."""
    from fwpzoo.layers.attention import Attention

    attention = Attention(tiny(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (B, 4, D))
    with pytest.raises(ValueError, match="do not fit a KV cache of max_len 3"):
        attention.prefill(x, attention.init_cache(B, 3))

    def decode(cache, x_t):
        y, cache = attention.decode_step(x_t, cache)
        return cache, y

    decode_all = jax.jit(lambda cache: jax.lax.scan(decode, cache, jnp.swapaxes(x, 0, 1))[1])
    ys = jnp.swapaxes(decode_all(attention.init_cache(B, 3)), 0, 1)  # [B, 4, D]
    assert bool(jnp.all(jnp.isfinite(ys[:, :3])))
    assert bool(jnp.all(jnp.isnan(ys[:, 3])))


def test_a_rule_stable_only_for_unit_values_is_fed_unit_values():
    """Oja's values play the delta rule's keys: its OBJECTIVE asks for unit values."""
    mixer = FWPMixer(tiny(cell="oja"), rngs=nnx.Rngs(0))
    v = mixer.cell_inputs(inputs())["v"]
    np.testing.assert_allclose(jnp.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)


def test_dplr_low_rank_pair_is_tied_as_rwkv7_ties_it():
    """a is a unit direction kappa and b = -rate * kappa with per-key rates in (0, 1), so the
    transition Diag(w) - (rate * kappa) kappa^T does not expand: with free projections the
    state of a 64-token sequence was inf at init."""
    cfg = tiny(cell="dplr", d_model=64)  # K = 32 per head
    mixer = FWPMixer(cfg, rngs=nnx.Rngs(0))
    x = inputs(shape=(B, 64, 64))
    gates = mixer.cell_inputs(x)
    a, b = gates["a"], gates["b"]  # [B, T, H, K]
    np.testing.assert_allclose(jnp.linalg.norm(a, axis=-1), 1.0, rtol=1e-5)
    rate = -b / a
    assert bool(jnp.all((rate > 0) & (rate < 1)))
    transition = jax.vmap(jnp.diag)(jnp.exp(gates["log_w"]).reshape(-1, 32)) + jnp.einsum(
        "nk,nj->nkj", b.reshape(-1, 32), a.reshape(-1, 32)
    )
    assert float(jnp.abs(jnp.linalg.eigvals(transition)).max()) <= 1.0 + 1e-5
    y, stats = mixer(x, return_intermediates=True)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert float(stats["state_norm"]) < 64.0  # at most one unit write per token, never expanded


def test_a_tied_gate_names_an_earlier_gate_of_its_shape():
    from fwpzoo import cells
    from fwpzoo.cells import _spec

    for name, module in cells.CELLS.items():
        seen = {}
        for gate in module.GATE_SPECS:
            if gate.times == _spec.KEY:  # times the key itself (comba's p = c * k)
                assert gate.shape == _spec.PER_TOKEN_KEY, (name, gate.name)
            elif gate.times is not None:
                assert seen.get(gate.times) == gate.shape, (name, gate.name)
            seen[gate.name] = gate.shape


@pytest.mark.parametrize("mixer", ["rdn", "srwm"])
def test_programmed_mixers_restart_at_a_reset(mixer):
    """A reset at t: the rest of that row equals the row's tail run alone (prefill and decode),
    whether the backward in use is the reversible one (no reset) or the checkpointed one."""
    cfg = tiny(mixers=(mixer,), feature_map="softmax", qk_norm="none", chunk_size=2)
    layer = get_mixer(mixer)(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, cfg.d_model))
    reset = jnp.zeros((2, 6), bool).at[0, 3].set(True)
    y = layer(x, reset=reset)
    np.testing.assert_allclose(y[0, 3:], layer(x[:1, 3:])[0], atol=1e-5)
    np.testing.assert_allclose(y[1], layer(x[1:])[0], atol=1e-5)
    cache = layer.init_cache(2, 6)
    _, cache = layer.prefill(x[:, :3], cache)
    decoded, _ = layer.decode_step(x[:, 3], cache, reset[:, 3])
    np.testing.assert_allclose(decoded, y[:, 3], atol=1e-5)


@pytest.mark.parametrize(
    ("kind", "low", "high"),
    [
        ("beta", 0.0, 2.0),
        ("unit", 0.0, 1.0),
        ("log decay", -np.inf, 0.0),
        ("positive", 0.0, np.inf),
        ("negative unit", -1.0, 0.0),
    ],
)
def test_gate_activations_keep_their_range(kind, low, high):
    from fwpzoo.layers.gates import activate

    raw = jnp.linspace(-30.0, 30.0, 61)
    gate = activate(kind, raw, beta_max=2.0)
    assert bool(jnp.all((gate >= low) & (gate <= high)))
    assert bool(jnp.all(jnp.diff(gate) >= 0))  # monotone: the projection sets the value


def test_a_static_gate_is_a_trained_parameter_without_time_axis():
    from fwpzoo.cells._spec import POSITIVE, STATIC, Gate
    from fwpzoo.layers.gates import StaticGate

    lam = StaticGate(Gate("lam", STATIC, POSITIVE), (2, 4), beta_max=1.0)
    np.testing.assert_allclose(lam(), np.full((2, 4), np.log(2.0)), rtol=1e-6)
    assert [p.shape for p in jax.tree.leaves(nnx.state(lam, nnx.Param))] == [(2, 4)]


# Packed rows: row 0 starts a segment at t = 0 too, row 1 continues its initial (zero) state.
SEGMENT_LENGTHS = ((3, 1, 4, 2), (5, 5))
PACKED_T = 10
RESETTING_MIXERS = [
    pytest.param({"mixers": ("fwp",), "cell": "gated_delta_rule", "conv_size": 3}, id="fwp"),
    pytest.param(
        {"mixers": ("fwp",), "cell": "delta_product", "product_decay": True, "conv_size": 2},
        id="fwp-delta_product",
    ),
    pytest.param(  # chunks of 4: resets at a chunk's first token and inside chunks
        {"mixers": ("fwp",), "cell": "gated_delta_rule", "form": "chunkwise", "chunk_size": 4},
        id="fwp-chunkwise",
    ),
    pytest.param({"mixers": ("fwp",), "form": "associative"}, id="fwp-associative"),
    pytest.param({"mixers": ("mamba2",), "conv_size": 3}, id="mamba2"),
    pytest.param(
        {"mixers": ("mamba2",), "form": "chunkwise", "chunk_size": 4}, id="mamba2-chunkwise"
    ),
    pytest.param(
        {"mixers": ("mamba2",), "decay_range": "-1,1", "form": "chunkwise", "chunk_size": 4},
        id="mamba2-negative",
    ),
    pytest.param({"mixers": ("ssm",), "ssm_state_dim": 4}, id="ssm"),
    pytest.param({"mixers": ("attention",)}, id="attention"),
    pytest.param({"mixers": ("plastic",), "plastic_on": "recurrent"}, id="plastic-recurrent"),
    pytest.param({"mixers": ("rdn",), "feature_map": "softmax", "qk_norm": "none"}, id="rdn"),
    pytest.param({"mixers": ("srwm",), "feature_map": "softmax", "qk_norm": "none"}, id="srwm"),
    pytest.param(
        {"mixers": ("plastic",), "plasticity": "oja", "plastic_alpha": True}, id="plastic-input"
    ),
    pytest.param(
        {"mixers": ("plastic",), "plastic_activation": "identity", "form": "chunkwise"},
        id="plastic-chunkwise",
    ),
]


def test_the_resetting_cases_cover_every_registered_mixer():
    """A mixer added to the registry fails here until it has its packed-row case."""
    assert {case.values[0]["mixers"][0] for case in RESETTING_MIXERS} == set(MIXERS)


def segment_bounds(lengths):
    ends = np.cumsum(lengths)
    return list(zip(ends - np.asarray(lengths), ends, strict=True))


PACKED_SEGMENTS = [  # (row, start, end) of every segment
    (row, start, end)
    for row, lengths in enumerate(SEGMENT_LENGTHS)
    for start, end in segment_bounds(lengths)
]


def packed_reset():
    """[B, T] True at each segment start of SEGMENT_LENGTHS, except t = 0 of row 1."""
    reset = np.zeros((len(SEGMENT_LENGTHS), PACKED_T), bool)
    for row, start, _ in PACKED_SEGMENTS:
        reset[row, start] = True
    reset[1, 0] = False
    return jnp.asarray(reset)


def one_segment_per_row(x):
    """x [B, T, ...] -> [segments, T, ...]: each segment of PACKED_SEGMENTS alone at the start of
    its own row, zeros after it (a causal layer's outputs there never see the zeros)."""
    rows = np.zeros((len(PACKED_SEGMENTS), PACKED_T), int)
    times = np.zeros((len(PACKED_SEGMENTS), PACKED_T), int)
    inside = np.zeros((len(PACKED_SEGMENTS), PACKED_T), bool)
    for i, (row, start, end) in enumerate(PACKED_SEGMENTS):
        rows[i], times[i, : end - start], inside[i, : end - start] = row, range(start, end), True
    return jnp.where(inside.reshape(inside.shape + (1,) * (x.ndim - 2)), x[rows, times], 0)


def assert_segments_equal(packed, alone, **tolerance):
    """packed [B, T, ...] from a packed run, alone [segments, T, ...] from one_segment_per_row."""
    for i, (row, start, end) in enumerate(PACKED_SEGMENTS):
        np.testing.assert_allclose(packed[row, start:end], alone[i, : end - start], **tolerance)


@pytest.mark.parametrize("overrides", RESETTING_MIXERS)
def test_a_packed_row_equals_its_segments_run_alone(overrides):
    """Every mixer that keeps state (the fast weights, the SSM state, the conv buffer, the
    attention keys) forgets it at a reset: each segment's outputs equal a run of that segment
    alone. Row 0 resets at t = 0 and at adjacent tokens (a one-token segment); the rows reset
    at different places, so nothing leaks between rows either."""
    mixer = get_mixer(overrides["mixers"][0])(tiny(**overrides), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mixer)
    x = inputs(7, (len(SEGMENT_LENGTHS), PACKED_T, D))

    @jax.jit
    def packed_and_alone(state, x, reset):
        layer = nnx.merge(graphdef, state)
        return layer(x, reset=reset), layer(one_segment_per_row(x))

    assert_segments_equal(*packed_and_alone(state, x, packed_reset()), atol=2e-6)


def test_short_conv_with_resets_reads_zeros_before_each_segment_and_carries_its_buffer():
    conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = inputs(shape=(1, 7, 3))
    reset = jnp.zeros((1, 7), bool).at[0, 5].set(True)
    full, buffer = conv(x, reset=reset)
    np.testing.assert_allclose(full[:, 5:], conv(x[:, 5:])[0], atol=1e-6)
    np.testing.assert_allclose(full[:, :5], conv(x[:, :5])[0], atol=1e-6)
    np.testing.assert_array_equal(buffer, jnp.concatenate([jnp.zeros((1, 1, 3)), x[:, 5:]], 1))
    # in pieces: the reset inside the second piece, the buffer of the first carried
    first, mid = conv(x[:, :4], reset=reset[:, :4])
    second, end = conv(x[:, 4:], mid, reset=reset[:, 4:])
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-6)
    np.testing.assert_array_equal(end, buffer)


@pytest.mark.parametrize(("T", "block_size"), [(37, 8), (5, 8), (32, 16)])
def test_blockwise_and_dot_product_attention_equal_the_dense_square(T, block_size):
    """Outputs and gradients wrt q, k, v: odd T (padded last block), T below one block, and T a
    multiple of the block."""
    from fwpzoo.layers.attention import attend, blockwise_attention, dot_product_attention

    q, k, v = (inputs(i, (B, T, 3, 4)) for i in range(3))
    cotangent = inputs(3, (B, T, 3, 4))
    positions = jnp.arange(T)
    kernels = {
        "dense": lambda q, k, v: attend(q, k, v, positions[:, None] >= positions[None, :]),
        "blockwise": lambda q, k, v: blockwise_attention(q, k, v, block_size),
        "dot_product": dot_product_attention,
    }

    @jax.jit
    def outputs_and_grads(q, k, v):
        def run(kernel):
            loss = lambda *x: jnp.sum(kernel(*x) * cotangent)  # noqa: E731
            return kernel(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

        return {name: run(kernel) for name, kernel in kernels.items()}

    results = outputs_and_grads(q, k, v)
    reference, reference_grads = results.pop("dense")
    for name, (o, grads) in results.items():
        np.testing.assert_allclose(o, reference, atol=2e-6, err_msg=name)
        for got, want in zip(grads, reference_grads, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)


def test_the_attention_kernel_is_a_config_choice_with_the_same_parameters():
    x = inputs(4, (B, 11, D))
    dense = get_mixer("attention")(tiny(), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dense)
    for kernel in ("dot_product", "blockwise"):
        cfg = tiny(attention_kernel=kernel, attention_block_size=4)
        layer = get_mixer("attention")(cfg, rngs=nnx.Rngs(0))
        assert jax.tree.map(jnp.shape, nnx.state(layer)) == jax.tree.map(jnp.shape, state)
        np.testing.assert_allclose(layer(x), dense(x), atol=2e-6, err_msg=kernel)
    with pytest.raises(ValueError, match="unknown model.attention_kernel 'flash'; valid"):
        tiny(attention_kernel="flash")


def scoped_products(jaxpr, scope=""):
    """(name scope, eqn) of every dot_general in a jaxpr and the jaxprs inside it, each scope
    prefixed with the scopes of the equations it is nested in (a sub-jaxpr's are relative)."""
    for eqn in jaxpr.eqns:
        inner = f"{scope}/{eqn.source_info.name_stack}"
        if eqn.primitive.name == "dot_general":
            yield inner, eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = sub.jaxpr if isinstance(sub, jax_core.ClosedJaxpr) else sub
                if isinstance(sub, jax_core.Jaxpr):
                    yield from scoped_products(sub, inner)


@pytest.mark.parametrize("mixer", ["fwp", "mamba2"])
def test_context_parallel_summaries_take_the_layers_matmul_precision(mixer):
    """Under a mesh that splits the sequence over `context` (abstract: traced, not run), the
    chunk matmuls of each shard's span summary (cells/chunked/summary.py) run at
    model.matmul_precision (high here), as the layer's own form does, not at the default
    precision; the products the engine keeps float32 (its triangular inverses, decay cumsums)
    and the fold of the summaries (the delta rule's transitions; mamba2's decays are
    elementwise) at HIGHEST."""
    cfg = tiny(mixers=(mixer,), form="chunkwise", chunk_size=4, matmul_precision="high")
    layer = get_mixer(mixer)(cfg, rngs=nnx.Rngs(1))
    with jax.sharding.use_abstract_mesh(AbstractMesh((1, 2), ("data", "context"))):
        jaxpr = jax.make_jaxpr(lambda x: layer(x))(inputs(shape=(B, 8, D))).jaxpr
    products = list(scoped_products(jaxpr))
    high, highest = (jax.lax.Precision.HIGH,) * 2, (jax.lax.Precision.HIGHEST,) * 2
    summaries = {eqn.params["precision"] for scope, eqn in products if "chunk_summary" in scope}
    assert high in summaries and summaries <= {high, highest}
    fold = {eqn.params["precision"] for scope, eqn in products if "summary_fold" in scope}
    assert fold == ({highest} if mixer == "fwp" else set())
