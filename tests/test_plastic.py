"""Plastic networks: the cell against the rules written out, its parallel form, the exact
identities with the FWP cells, resets, clipping, and the mixer (decode, forms, bad input)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from fwpzoo.cells import gated_linear_attn, linear_attn, oja
from fwpzoo.cells.programmed import plastic
from fwpzoo.models import ModelConfig, build_model, generate

B, T, H, K, V = 2, 9, 2, 4, 3
KINDS = [
    plastic.Plasticity(site, rule, activation)
    for site, activation in (("input", "sigmoid"), ("recurrent", "tanh"))
    for rule in plastic.RULES
]


def kind_id(kind):
    return f"{kind.site}-{kind.rule}-{kind.activation}"


def draw(kind, *, seed=0, alpha=True, eta=(-0.7, 0.4), lam=(0.9, 0.97), T=T, dtype=np.float64):
    """Random params, slow drive u, input x (input site) and an initial state, as numpy."""
    r = np.random.default_rng(seed)
    Kp = K if kind.site == "input" else V
    params = {"eta": np.array(eta), "log_lambda": np.log(np.array(lam))}
    if alpha:
        params["alpha"] = r.uniform(0.5, 1.5, (H, Kp, V))
    if kind.site == "recurrent":
        params["R"] = r.normal(size=(H, V, V)) / np.sqrt(V)
    if kind.rule == "neuromodulated":
        params["w_mod"] = r.normal(size=(H, V))
    u = r.normal(size=(B, T, H, V))
    x = r.normal(size=(B, T, H, K)) if kind.site == "input" else None
    state = {"S": 0.3 * r.normal(size=(B, H, Kp, V))}
    if kind.site == "recurrent":
        state["h"] = np.tanh(r.normal(size=(B, H, V)))
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)  # noqa: E731
    return cast(params), cast(u), None if x is None else x.astype(dtype), cast(state)


def rules_written_out(kind, params, u, x, state):
    """The recurrences of the module docstring, one neuron pair at a time (numpy, float64)."""
    act = {"sigmoid": lambda a: 1 / (1 + np.exp(-a)), "tanh": np.tanh}[kind.activation]
    S, h_prev = state["S"].copy(), state.get("h")
    lam, eta = np.exp(params["log_lambda"]), params["eta"]
    alpha = params.get("alpha", np.ones_like(S[0]))
    out = np.zeros_like(u)
    for b in range(B):
        S_b, h_b = S[b].copy(), None if h_prev is None else h_prev[b].copy()
        for t in range(u.shape[1]):
            for n in range(H):
                pre = x[b, t, n] if kind.site == "input" else h_b[n]
                drive = u[b, t, n] + (alpha[n] * S_b[n]).T @ pre
                if kind.site == "recurrent":
                    drive = drive + params["R"][n].T @ pre
                post = act(drive)
                decayed = lam[n] * S_b[n]
                rate = eta[n]
                if kind.rule == "neuromodulated":
                    rate = rate * np.tanh(params["w_mod"][n] @ post)
                if kind.rule == "oja":
                    new = decayed + rate * np.outer(pre - decayed @ post, post)
                else:
                    new = decayed + rate * np.outer(pre, post)
                if kind.rule == "neuromodulated":
                    new = np.clip(new, -2.0, 2.0)
                S_b[n] = new
                out[b, t, n] = post
            if kind.site == "recurrent":
                h_b = out[b, t].copy()
        S[b] = S_b
    return out, S


@pytest.fixture(autouse=True, scope="module")
def float64():
    with jax.enable_x64(True):
        yield


@functools.cache
def jitted_recurrent(kind):
    return jax.jit(functools.partial(plastic.recurrent, kind))


@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_recurrent_equals_the_rules_written_out(kind):
    params, u, x, state = draw(kind)
    h, final = jitted_recurrent(kind)(params, u, x, state=state)
    expected_h, expected_S = rules_written_out(kind, params, u, x, state)
    np.testing.assert_allclose(h, expected_h, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(final["S"], expected_S, rtol=1e-10, atol=1e-12)
    if kind.site == "recurrent":
        np.testing.assert_array_equal(final["h"], h[:, -1])


def test_neuromodulated_rule_clips_at_two():
    kind = plastic.Plasticity("input", "neuromodulated", "sigmoid")
    params, u, x, state = draw(kind, eta=(-40.0, 40.0))
    _, final = jitted_recurrent(kind)(params, 5 * u, 5 * x, state=state)
    assert float(jnp.max(jnp.abs(final["S"]))) == pytest.approx(2.0)


def test_reset_replaces_the_state_by_zeros():
    kind = KINDS[4]  # recurrent oja: the state has S and h
    params, u, x, state = draw(kind)
    reset = np.zeros((B, T), bool)
    reset[0, 4] = True  # row 0 starts again at token 4; row 1 runs through
    h, final = jitted_recurrent(kind)(params, u, x, state=state, reset=reset)
    whole, whole_final = jitted_recurrent(kind)(params, u, x, state=state)
    row1 = lambda tree: jax.tree.map(lambda a: a[1], tree)  # noqa: E731
    np.testing.assert_array_equal(h[1], whole[1])
    jax.tree.map(np.testing.assert_array_equal, row1(final), row1(whole_final))
    fresh, fresh_final = jitted_recurrent(kind)(params, u[:, 4:], None)
    np.testing.assert_allclose(h[0, 4:], fresh[0], rtol=1e-12)
    np.testing.assert_allclose(final["S"][0], fresh_final["S"][0], rtol=1e-12)


def relative_rms(actual, expected):
    return float(np.sqrt(np.mean((actual - expected) ** 2) / np.mean(expected**2)))


@pytest.mark.parametrize("Tp", [1, 17])
def test_parallel_form_equals_recurrent_on_outputs_state_and_gradients(Tp):
    """In float32, as the chunk scan computes, to the cell suite's chunkwise tolerance."""
    kind = plastic.Plasticity("input", "hebb", "identity")
    params, u, x, state = draw(kind, alpha=False, T=Tp, eta=(-0.3, 0.2), dtype=np.float32)
    x = 0.5 * x
    cotangent = np.random.default_rng(1).normal(size=u.shape).astype(np.float32)

    def loss(form, params, u, x, S):
        h, final = form(kind, params, u, x, state={"S": S})
        return jnp.sum(h * cotangent) + jnp.sum(final["S"] ** 2), (h, final["S"])

    parallel = functools.partial(plastic.parallel, chunk_size=8)
    grad = lambda form: jax.jit(jax.grad(functools.partial(loss, form), (0, 1, 2, 3), has_aux=True))  # noqa: E731
    with jax.enable_x64(False):
        params = jax.tree.map(jnp.float32, params)
        grads_r, (h_r, S_r) = grad(plastic.recurrent)(params, u, x, state["S"])
        grads_p, (h_p, S_p) = grad(parallel)(params, u, x, state["S"])
    assert relative_rms(h_p, h_r) < 1e-5
    assert relative_rms(S_p, S_r) < 1e-5
    for g_p, g_r in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_r), strict=True):
        assert relative_rms(g_p, g_r) < 1e-4


def test_parallel_form_takes_resets_as_recurrent_does():
    kind = plastic.Plasticity("input", "hebb", "identity")
    params, u, x, state = draw(kind, alpha=False, T=13, eta=(-0.3, 0.2), dtype=np.float32)
    reset = np.zeros((B, 13), bool)
    reset[0, 5] = reset[1, 12] = True
    with jax.enable_x64(False):
        params = jax.tree.map(jnp.float32, params)
        h_r, S_r = plastic.recurrent(kind, params, u, 0.5 * x, state=state, reset=reset)
        h_p, S_p = plastic.parallel(
            kind, params, u, 0.5 * x, state=state, chunk_size=4, reset=reset
        )
    assert relative_rms(h_p, h_r) < 1e-5 and relative_rms(S_p["S"], S_r["S"]) < 1e-5


def test_mixer_reset_starts_a_row_again_in_every_entry_point():
    with jax.enable_x64(False):
        mixer = plastic_model(plastic_on="recurrent", plasticity="oja").blocks[0].mixer
        x = jax.random.normal(jax.random.key(4), (2, 6, D))
        reset = jnp.zeros((2, 6), bool).at[0, 3].set(True)
        y = mixer(x, reset=reset)
        np.testing.assert_allclose(y[0, 3:], mixer(x[:1, 3:])[0], atol=1e-5)
        np.testing.assert_allclose(y[1], mixer(x[1:])[0], atol=1e-5)
        _, cache = mixer.prefill(x[:, :3], mixer.init_cache(2, 6))
        decoded, _ = mixer.decode_step(x[:, 3], cache, reset=reset[:, 3])
        np.testing.assert_allclose(decoded, y[:, 3], atol=1e-5)


def test_parallel_form_refuses_a_rule_that_is_not_affine():
    kind = plastic.Plasticity("input", "hebb", "tanh")
    params, u, x, _ = draw(kind, alpha=False)
    with pytest.raises(ValueError, match="not affine"):
        plastic.parallel(kind, params, u, x)


@pytest.mark.parametrize("activation", ["identity", "tanh"])
@pytest.mark.parametrize("decay", [False, True])
def test_hebbian_input_layer_is_linear_attention_on_pre_and_post(activation, decay):
    """The plastic matrix of a Hebbian input layer is the linear attention memory written with
    key = presynaptic activity and value = eta * postsynaptic activity (gated_linear_attn with
    log_alpha = log lambda when it forgets), and the layer's fast drive is that memory read
    with the next input as query. Exact, for any activation; no alpha."""
    kind = plastic.Plasticity("input", "hebb", activation)
    lam = (0.9, 0.8) if decay else (1.0, 1.0)
    params, u, x, _ = draw(kind, alpha=False, lam=lam)
    h, final = jitted_recurrent(kind)(params, u, x)
    value = params["eta"][:, None] * h  # [B, T, H, V]
    if decay:
        log_alpha = np.broadcast_to(params["log_lambda"], (B, T, H))
        cell = functools.partial(gated_linear_attn.recurrent, log_alpha=log_alpha[:, 1:])
        _, S = gated_linear_attn.recurrent(x, x, value, log_alpha=log_alpha)
    else:
        cell = linear_attn.recurrent
        _, S = linear_attn.recurrent(x, x, value)
    np.testing.assert_allclose(final["S"], S, rtol=1e-12)
    # the cell reads after writing, so its read at t - 1 with query x_t is S_{t-1}^T x_t
    read, _ = cell(x[:, 1:], x[:, :-1], value[:, :-1])
    act_inverse = {"identity": lambda a: a, "tanh": np.arctanh}[activation]
    np.testing.assert_allclose(act_inverse(h[:, 1:]) - u[:, 1:], read, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(act_inverse(h[:, 0]), u[:, 0], rtol=1e-8)  # nothing stored yet


@pytest.mark.parametrize("activation", ["identity", "sigmoid"])
def test_oja_input_layer_is_the_oja_cell_on_pre_and_post(activation):
    """The plastic oja rule is the `oja` cell written with key = presynaptic activity, value =
    postsynaptic activity, beta = eta and log_alpha = log lambda; the layer's fast drive is that
    cell's read with the next input as query. Exact, for any activation; no alpha."""
    kind = plastic.Plasticity("input", "oja", activation)
    params, u, x, _ = draw(kind, alpha=False, eta=(-0.3, 0.2), lam=(0.9, 0.8))
    h, final = jitted_recurrent(kind)(params, u, x)
    gates = lambda n: {  # noqa: E731  per-token beta and log_alpha for n tokens
        "beta": np.broadcast_to(params["eta"], (B, n, H)),
        "log_alpha": np.broadcast_to(params["log_lambda"], (B, n, H)),
    }
    _, S = oja.recurrent(x, x, h, **gates(T))
    np.testing.assert_allclose(final["S"], S, rtol=1e-12, atol=1e-14)
    read, _ = oja.recurrent(x[:, 1:], x[:, :-1], h[:, :-1], **gates(T - 1))
    act_inverse = {"identity": lambda a: a, "sigmoid": lambda a: np.log(a / (1 - a))}[activation]
    np.testing.assert_allclose(act_inverse(h[:, 1:]) - u[:, 1:], read, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("T_", [3, 11])
def test_checkpointed_scan_equals_recurrent_with_its_gradients(T_):
    kind = plastic.Plasticity("recurrent", "neuromodulated", "tanh")
    params, u, x, state = draw(kind, T=T_)
    reset = np.zeros((B, T_), bool)
    reset[1, T_ // 2] = True

    def loss(form, params, u, S):
        h, final = form(kind, params, u, state={**state, "S": S}, reset=reset)
        return jnp.sum(h * u) + jnp.sum(final["S"] ** 2)

    forms = (plastic.recurrent, functools.partial(plastic.checkpointed, chunk_size=4))
    values = [
        jax.jit(jax.value_and_grad(functools.partial(loss, f), (0, 1, 2)))(params, u, state["S"])
        for f in forms
    ]
    for a, b in zip(jax.tree.leaves(values[0]), jax.tree.leaves(values[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-13)


def test_gradients_of_the_scan_match_finite_differences():
    kind = plastic.Plasticity("recurrent", "oja", "tanh")
    params, u, x, state = draw(kind, T=4)
    f = lambda params, u, S: plastic.recurrent(kind, params, u, state={**state, "S": S})  # noqa: E731
    check_grads(f, (params, u, state["S"]), order=1, modes=("rev",), eps=1e-6)


# the mixer ----------------------------------------------------------------------------------

D, VOCAB = 8, 11


def plastic_model(seed=0, **fields):
    cfg = ModelConfig(
        mixers=("plastic",), d_model=D, num_heads=2, mlp_ratio=2.0, form="recurrent", **fields
    )
    model = build_model(cfg, vocab_size=VOCAB, rngs=nnx.Rngs(seed))
    mixer = model.blocks[0].mixer
    # move eta away from its initial 0 (or exp(raw) > 0), so the fast weights take part
    mixer.eta_raw[...] = jnp.array([-0.8, 0.6]) if mixer.eta_sign == "learned" else jnp.zeros(2)
    return model


MIXER_CASES = [
    {},
    {"plastic_on": "recurrent", "plasticity": "neuromodulated", "plastic_alpha": True},
    {"plasticity": "oja", "plastic_activation": "sigmoid", "plastic_eta": "negative"},
]


@pytest.mark.parametrize("fields", MIXER_CASES, ids=lambda f: "-".join(map(str, f.values())))
def test_full_forward_equals_prefill_then_decode(fields):
    with jax.enable_x64(False):
        model = plastic_model(**fields)
        toks = jax.random.randint(jax.random.key(0), (2, 7), 0, VOCAB)
        full, stats = model(toks, return_intermediates=True)
        assert float(stats["block_0/state_norm"]) > 0
        logits, cache = model.prefill(toks[:, :3], model.init_cache(2, 7))
        pieces = [logits]
        for t in range(3, 7):
            logits, cache = model.decode_step(toks[:, t], cache)
            pieces.append(logits[:, None])
        np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5)


def test_sampling_reads_the_logits_of_the_full_forward():
    """generate: the prompt through the parallel form, then one `step` per token."""
    with jax.enable_x64(False):
        fields = {"plastic_activation": "identity", "chunk_size": 4}
        model = plastic_model(**fields)
        model.blocks[0].mixer.form = "chunkwise"
        prompt = jax.random.randint(jax.random.key(5), (2, 3), 0, VOCAB)
        new, logits = generate(model, prompt, 5, rng=jax.random.key(0), temperature=1.0)
        full = model(jnp.concatenate([prompt, new], axis=1))
        np.testing.assert_allclose(logits, full[:, 2:7], atol=2e-5)


def test_mixer_chunkwise_form_equals_recurrent():
    with jax.enable_x64(False):
        toks = jax.random.randint(jax.random.key(1), (2, 13), 0, VOCAB)
        fields = {"plastic_activation": "identity", "chunk_size": 4}
        reference = plastic_model(**fields)(toks)
        model = plastic_model(**fields)
        model.blocks[0].mixer.form = "chunkwise"
        np.testing.assert_allclose(model(toks), reference, atol=2e-5)


def test_eta_sign_parametrisations():
    with jax.enable_x64(False):
        for sign, check in (("positive", np.greater), ("negative", np.less)):
            mixer = plastic_model(plastic_eta=sign).blocks[0].mixer
            mixer.eta_raw[...] = jnp.array([-3.0, 2.0])
            assert np.all(check(np.asarray(mixer.eta()), 0))
        mixer = plastic_model().blocks[0].mixer
        np.testing.assert_allclose(mixer.eta(), [-0.8, 0.6], rtol=1e-7)  # either sign, as given
        assert np.all((np.asarray(mixer.lam()) > 0) & (np.asarray(mixer.lam()) < 1))


def test_inspect_step_returns_the_fast_weights_and_the_gates():
    with jax.enable_x64(False):
        mixer = plastic_model(plasticity="neuromodulated").blocks[0].mixer
        cache = mixer.init_cache(2, 4)
        y, cache, gates = mixer.inspect_step(jnp.ones((2, D)), cache)
        assert y.shape == (2, D) and mixer.fast_weights(cache).shape == (2, 2, D // 2, D // 2)
        assert set(gates) == {"learning_rate", "decay"}
        assert all(g.shape == (2, 2) for g in gates.values())


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"plasticity": "bcm"}, "unknown model.plasticity 'bcm'; valid choices: hebb, oja, neuro"),
        ({"plastic_on": "output"}, "unknown model.plastic_on 'output'; valid choices: input, rec"),
        ({"plastic_eta": "zero"}, "unknown model.plastic_eta 'zero'; valid choices: learned, pos"),
        ({"plastic_activation": "gelu"}, "valid choices: tanh, sigmoid, relu, identity"),
        # a form set for the layer that its rule has not (model-wide: the recurrent form runs)
        (
            {"mixers": ({"mixer": "plastic", "form": "chunkwise"},)},
            "form 'chunkwise': the plastic mixer .*has no such form; its forms: recurrent$",
        ),
        (
            {"mixers": ({"mixer": "plastic", "form": "associative"},)},
            "form 'associative': .*its forms: recurrent$",
        ),
    ],
)
def test_bad_plastic_config_is_one_line_naming_the_choices(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_a_model_wide_form_the_rule_has_not_runs_recurrent_and_says_so():
    cfg = ModelConfig(mixers=("plastic",), form="chunkwise")
    assert cfg.mixer_configs()[0].form == "recurrent"
    assert cfg.notes() == (
        "model.mixers[0]: model.form=chunkwise: the plastic mixer (plastic_on=input, "
        "plasticity=hebb, plastic_activation=tanh, plastic_alpha=false) has no chunkwise form "
        "(its forms: recurrent), so it runs recurrent",
    )
    affine = ModelConfig(mixers=("plastic",), form="chunkwise", plastic_activation="identity")
    assert affine.mixer_configs()[0].form == "chunkwise" and affine.notes() == ()
