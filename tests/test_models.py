"""The causal LM: prefill-then-decode equals the full forward, forms agree, causality, sampling."""

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwpzoo import cells
from fwpzoo.config import load
from fwpzoo.layers import MIXERS
from fwpzoo.models import ModelConfig, build_model, generate
from fwpzoo.models.sampling import sample_token

B, T, VOCAB = 2, 7, 11
MIXER_KINDS = list(MIXERS)  # every registered mixer: a new one is under these tests at once
MIXER_FIELDS = {  # beyond the defaults
    "plastic": {"form": "recurrent", "plastic_on": "recurrent"},
    "srwm": {"feature_map": "softmax", "qk_norm": "none"},
}


def tiny(**overrides):
    """A tiny config in the configured default form (ModelConfig.form)."""
    base = dict(
        mixers=("fwp",),
        d_model=8,
        num_heads=2,
        mlp_ratio=2.0,
        ssm_state_dim=4,
        chunk_size=4,
        conv_size=3,
        output_gate=True,
    )
    return ModelConfig(**{**base, **overrides})


def tokens(seed=0, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB)


def model_of(cfg, seed=0, dtype=jnp.float32):
    return build_model(cfg, vocab_size=VOCAB, rngs=nnx.Rngs(seed), dtype=dtype)


def jitted(fn, model, *args):
    """fn(model, *args) under jax.jit of the split model state, as the trainer runs it."""
    graphdef, state = nnx.split(model)
    return _run_jitted(fn, graphdef, state, *args)


@partial(jax.jit, static_argnums=(0, 1))
def _run_jitted(fn, graphdef, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def forward(model, toks):
    return model(toks)


def prefill_then_decode(model, toks, prefill_lengths):
    """Logits [B, T, vocab]: prefill pieces of the given lengths, then decode token by token."""
    cache = model.init_cache(toks.shape[0], toks.shape[1])
    pieces, start = [], 0
    for length in prefill_lengths:
        logits, cache = model.prefill(toks[:, start : start + length], cache)
        pieces.append(logits)
        start += length

    def one_token(cache, token):
        logits, cache = model.decode_step(token, cache)
        return cache, logits

    _, step_logits = jax.lax.scan(one_token, cache, toks[:, start:].T)
    return jnp.concatenate([*pieces, jnp.swapaxes(step_logits, 0, 1)], axis=1)


def full_and_decoded(model, toks, prefill_lengths):
    return model(toks), prefill_then_decode(model, toks, prefill_lengths)


MIXER_CASES = [
    pytest.param({"mixers": ("fwp",)}, id="fwp"),
    pytest.param({"mixers": ("attention",)}, id="attention"),
    pytest.param({"mixers": ("mamba2",)}, id="mamba2"),
    pytest.param({"mixers": ("mamba2",), "decay_range": "-1,1"}, id="mamba2-negative"),
    pytest.param({"mixers": ("ssm",)}, id="ssm-complex"),
    pytest.param({"mixers": ("ssm",), "ssm_complex": False}, id="ssm-real"),
    pytest.param({"mixers": ("fwp",), "conv_size": 0, "output_norm": False}, id="fwp-plain"),
    pytest.param({"mixers": ("rdn",), "feature_map": "softmax", "qk_norm": "none"}, id="rdn"),
    pytest.param({"mixers": ("rdn",), "feature_map": "dpfp", "qk_norm": "sum"}, id="rdn-dpfp"),
    pytest.param({"mixers": ("srwm",), "feature_map": "softmax", "qk_norm": "none"}, id="srwm"),
    pytest.param({"mixers": ("plastic",), **MIXER_FIELDS["plastic"]}, id="plastic"),
]


def test_the_mixer_cases_cover_every_registered_mixer():
    """A mixer added to the registry fails here until it has its decoding case."""
    assert {case.values[0]["mixers"][0] for case in MIXER_CASES} == set(MIXERS)


@pytest.mark.parametrize("overrides", MIXER_CASES)
def test_full_forward_equals_prefill_then_decode(overrides):
    model = model_of(tiny(**overrides))
    full, decoded = jitted(partial(full_and_decoded, prefill_lengths=[2, 1]), model, tokens())
    assert full.shape == (B, T, VOCAB) and full.dtype == jnp.float32
    np.testing.assert_allclose(decoded, full, atol=2e-5)


# every cell in CELLS, with the options that exercise it most
CELL_OPTIONS = {
    "delta_rule": {"beta_range": "0,2"},
    "delta_product": {"product_decay": True},
    # an MLP fast net, momentum and a window; one token per inner step, so decoding is exact
    "deep": {"fast_net": "mlp", "inner_optimizer": "momentum", "inner_window": 2},
}
CELL_CASES = [pytest.param(name, CELL_OPTIONS.get(name, {}), id=name) for name in cells.CELLS] + [
    pytest.param("gated_linear_attn", {"decay": "per_key"}, id="gated_linear_attn-per_key")
]


@pytest.mark.parametrize(("cell", "overrides"), CELL_CASES)
def test_every_cell_through_the_fwp_mixer_forms_agree_and_decode(cell, overrides):
    """model.cell swaps the update rule; every form the family has gives the reference's logits
    (same parameters: the form is not a parameter), and decoding with the cell's step matches.
    The forms' gradients and final states are the cells' own property suite."""
    toks = tokens(1)
    cfg = lambda form: tiny(cell=cell, form=form, **overrides)  # noqa: E731
    decode = partial(full_and_decoded, prefill_lengths=[3])
    reference, decoded = jitted(decode, model_of(cfg("recurrent")), toks)
    np.testing.assert_allclose(decoded, reference, atol=2e-5)
    for form in [f for f in cells.FORMS if f != "recurrent" and hasattr(cells.get(cell), f)]:
        logits = jitted(forward, model_of(cfg(form)), toks)
        np.testing.assert_allclose(logits, reference, atol=2e-5, err_msg=form)


@pytest.mark.parametrize("mixer", MIXER_KINDS)
def test_gradient_causality(mixer):
    """d loss_t / d x_s == 0 exactly for every s > t (x: input embeddings), and not for s = t."""
    model = model_of(tiny(mixers=(mixer,), **MIXER_FIELDS.get(mixer, {})))
    x = model.embed(tokens(2))  # [B, T, D]
    cotangent = jax.random.normal(jax.random.key(3), (B, T, VOCAB))
    graphdef, state = nnx.split(model)

    @jax.jit
    def grad_at(t):
        def loss(x):
            logits = nnx.merge(graphdef, state).from_embeddings(x)
            return jnp.sum(logits[:, t] * cotangent[:, t])

        return jax.grad(loss)(x)

    for t in range(T):
        grad = np.asarray(grad_at(t))
        np.testing.assert_array_equal(grad[:, t + 1 :], 0.0, err_msg=f"t={t}")
        assert np.abs(grad[:, t]).max() > 0, f"t={t}"


HYBRID = ("fwp", "attention", "mamba2", "ssm")


def test_generate_logits_equal_the_full_forward():
    model = model_of(tiny(mixers=HYBRID))
    prompt = tokens(4, (B, 3))
    new, step_logits = generate(model, prompt, 5, rng=jax.random.key(0), temperature=1.0)
    assert new.shape == (B, 5) and new.dtype == jnp.int32
    assert step_logits.shape == (B, 5, VOCAB)
    full = jitted(forward, model, jnp.concatenate([prompt, new], axis=1))
    np.testing.assert_allclose(step_logits, full[:, 2:7], atol=2e-5)


# (row, start, end) of each segment of a packed batch of 9 tokens
PACKED = [(0, 0, 4), (0, 4, 5), (0, 5, 9), (1, 0, 6), (1, 6, 8), (1, 8, 9)]


def packed_runs(model, toks, reset):
    """The packed forward, each segment alone, and prefill(3 tokens) then decode_step with the
    same resets."""
    full = model(toks, reset=reset)
    # each segment alone at the start of its own row, token 0 after it (causal: never seen)
    alone = jnp.stack(
        [
            jnp.pad(toks[row, start:end], (0, toks.shape[1] - end + start))
            for row, start, end in PACKED
        ]
    )  # [segments, T]
    alone = model(alone)
    cache = model.init_cache(toks.shape[0], toks.shape[1])
    logits, cache = model.prefill(toks[:, :3], cache, reset[:, :3])

    def one_token(cache, token_and_reset):
        token, reset_t = token_and_reset  # [B], [B]
        logits, cache = model.decode_step(token, cache, reset_t)
        return cache, logits

    _, steps = jax.lax.scan(one_token, cache, (toks[:, 3:].T, reset[:, 3:].T))
    return full, alone, jnp.concatenate([logits, jnp.swapaxes(steps, 0, 1)], axis=1)


def test_a_packed_row_equals_its_segments_and_decodes_across_resets():
    """With resets at segment starts (at t = 0, at adjacent tokens, at the last token, inside
    the prefill and during decoding), every block of the hybrid forgets the earlier segments:
    each segment's logits equal the segment run alone, and prefill-then-decode equals the packed
    forward."""
    model = model_of(tiny(mixers=HYBRID))  # chunkwise, chunks of 4
    toks = tokens(8, (B, 9))
    reset = jnp.zeros((B, 9), bool)
    for row, start, _ in PACKED:
        reset = reset.at[row, start].set(start > 0 or row == 0)
    full, alone, decoded = jitted(packed_runs, model, toks, reset)
    for (row, start, end), logits in zip(PACKED, alone, strict=True):
        np.testing.assert_allclose(full[row, start:end], logits[: end - start], atol=2e-5)
    np.testing.assert_allclose(decoded, full, atol=2e-5)


def test_sample_token_greedy_and_tempered():
    logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, -1.0]])
    np.testing.assert_array_equal(sample_token(logits, jax.random.key(0), 0.0), [1, 0])
    draws = jax.vmap(lambda key: sample_token(logits, key, 1.0))(
        jax.random.split(jax.random.key(1), 4000)
    )  # [4000, 2]
    frequency = jnp.mean(draws[:, 0] == 1)
    np.testing.assert_allclose(frequency, jax.nn.softmax(logits[0])[1], atol=0.03)


def test_bad_generate_arguments():
    model = model_of(tiny(mixers=("ssm",)))
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        generate(model, tokens(), 0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        generate(model, tokens(), 2, rng=jax.random.key(0), temperature=-1.0)


def test_bf16_compute_keeps_float32_params_and_logits():
    cfg = tiny(mixers=HYBRID)
    model = model_of(cfg, dtype=jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    assert all(
        s.dtype in (jnp.float32, jnp.complex64)
        for s in jax.tree.leaves([c.state for c in model.init_cache(B, T) if hasattr(c, "state")])
    )
    toks = tokens(5)
    logits, decoded = jitted(partial(full_and_decoded, prefill_lengths=[4]), model, toks)
    assert logits.dtype == jnp.float32 and decoded.dtype == jnp.float32
    reference = jitted(forward, model_of(cfg), toks)  # the same parameters in float32
    # bf16 keeps 8 significant bits: a few percent of the logits' spread, not more
    spread = float(jnp.std(reference))
    assert float(jnp.max(jnp.abs(logits - reference))) < 0.1 * spread
    assert float(jnp.max(jnp.abs(decoded - logits))) < 0.1 * spread


def test_split_merge_jit_and_eval_shape():
    cfg = tiny(feature_map="favor", qk_norm="sum", form="recurrent")  # eager: keep it small
    model = model_of(cfg)
    toks = tokens(6)
    graphdef, state = nnx.split(model)
    eager = model(toks)
    np.testing.assert_allclose(jitted(forward, model, toks), eager, atol=1e-5)
    abstract = nnx.eval_shape(lambda: build_model(cfg, vocab_size=VOCAB, rngs=nnx.Rngs(0)))
    abstract_graphdef, abstract_state = nnx.split(abstract)
    assert abstract_graphdef == graphdef
    shapes = lambda s: jax.tree.map(lambda a: (a.shape, a.dtype), s)  # noqa: E731
    assert shapes(abstract_state) == shapes(state)
    restored = nnx.merge(abstract_graphdef, state)  # what a checkpoint restore does
    np.testing.assert_array_equal(restored(toks), eager)


def with_intermediates(model, toks):
    return model(toks, return_intermediates=True)


def test_intermediates_name_every_block():
    model = model_of(tiny(mixers=("fwp", "mamba2", "ssm"), cell="gated_delta_rule"))
    logits, stats = jitted(with_intermediates, model, tokens())
    assert logits.shape == (B, T, VOCAB)
    assert {"block_0/state_norm", "block_0/beta_mean", "block_0/alpha_mean"} <= set(stats)
    assert {"block_1/state_norm", "block_1/alpha_mean", "block_2/state_norm"} <= set(stats)
    assert 0 < float(stats["block_0/beta_mean"]) < 1
    assert 0 < float(stats["block_0/alpha_mean"]) <= 1


def test_decoding_state_is_constant_in_length_except_attention():
    model = model_of(tiny(mixers=HYBRID))
    shapes = lambda max_len: jax.tree.map(jnp.shape, model.init_cache(B, max_len))  # noqa: E731
    short, long = shapes(8), shapes(1000)
    for kind, a, b in zip(HYBRID, short, long, strict=True):
        if kind == "attention":
            assert a.k == (B, 8, 2, 4) and b.k == (B, 1000, 2, 4)
        else:
            assert a == b, kind


def test_per_layer_mixer_fields_reach_only_their_layer():
    per_layer = {"mixer": "fwp", "cell": "gated_delta_rule", "num_heads": 1}
    cfg = tiny(mixers=(per_layer, "fwp", {"mixer": "attention", "rope_base": 100.0}))
    first, second, third = (block.mixer for block in model_of(cfg).blocks)
    assert (first.cell, first.H, sorted(first.gates)) == (
        "gated_delta_rule",
        1,
        ["beta", "log_alpha"],
    )
    assert (second.cell, second.H, sorted(second.gates)) == ("delta_rule", 2, ["beta"])
    assert (third.rope_base, third.H) == (100.0, 2)


def test_build_model_rejects_bad_vocab():
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        build_model(tiny(), vocab_size=0, rngs=nnx.Rngs(0))


SHIPPED = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
SHIPPED_MQAR = Path(__file__).parent.parent / "configs" / "mqar.yaml"


def test_every_mixer_takes_every_shipped_config():
    """model.mixers=[X] on every top-level shipped config makes a valid model for every mixer X
    (the config's fields for other mixers inert; a form X has not runs X's recurrent form and
    the config says so in one note), and describe() tells the same from the config alone."""
    for path in SHIPPED:
        for mixer in MIXER_KINDS:
            model = load(path, [f"model.mixers=[{mixer}]"]).model
            (view,) = model.mixer_configs()
            description = view.describe()
            assert description.mixer == mixer and description.form == getattr(view, "form", None)
            assert all(note.startswith("model.mixers[0]: model.form=") for note in model.notes())
            assert len(model.notes()) == (view.note is not None)


@pytest.mark.parametrize("mixer", MIXER_KINDS)
def test_every_mixer_builds_and_runs_on_a_shipped_config(mixer):
    """configs/mqar.yaml (two chunkwise layers) with model.mixers=[X] at tiny sizes: the model
    builds and runs, every layer is a Mixer, and describe() of the built layer is its config's."""
    from fwpzoo.layers import Mixer, StateCache, describe

    sizes = ["model.d_model=8", "model.num_heads=2", "model.chunk_size=4"]
    cfg = load(SHIPPED_MQAR, [f"model.mixers=[{mixer}, {mixer}]", *sizes]).model
    model = model_of(cfg)
    logits = jitted(forward, model, tokens())
    assert logits.shape == (B, T, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    for block, layer in zip(model.blocks, cfg.layers(), strict=True):
        assert isinstance(block.mixer, Mixer)
        assert block.mixer.describe() == describe(layer)
        cache = block.mixer.init_cache(B, T)
        assert isinstance(cache, StateCache) == (mixer != "attention")
        has_matrix = block.mixer.fast_weights(cache) is not None
        assert has_matrix == block.mixer.HAS_FAST_WEIGHTS


@pytest.mark.parametrize("where", ["per_layer", "model_wide"])
def test_a_per_layer_mapping_is_built_with_the_fields_its_layer_sees(where):
    """model.mixers=[{mixer: srwm, feature_map: softmax, qk_norm: none}] works as the same
    values set model-wide do, and builds the layer with them."""
    overrides = {
        "per_layer": ["model.mixers=[{mixer: srwm, feature_map: softmax, qk_norm: none}, fwp]"],
        "model_wide": [
            "model.mixers=[srwm, fwp]",
            "model.feature_map=softmax",
            "model.qk_norm=none",
        ],
    }[where]
    cfg = load(SHIPPED_MQAR, [*overrides, "model.d_model=8", "model.chunk_size=4"]).model
    srwm, fwp = cfg.mixer_configs()
    assert (srwm.feature_map, srwm.qk_norm) == ("softmax", "none")
    expected = ("softmax", "none") if where == "model_wide" else ("identity", "l2")
    assert (fwp.feature_map, fwp.qk_norm) == expected
    built = model_of(cfg).blocks
    assert built[0].mixer.cfg == srwm and built[1].mixer.cfg == fwp
