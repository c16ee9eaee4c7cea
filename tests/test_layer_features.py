"""The layer features released hybrids need, each against a plain reference, and the defaults
that keep every existing config's parameters as they were."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fwpzoo.layers.attention import rope
from fwpzoo.layers.norms import RMSNorm
from fwpzoo.models import build_model
from fwpzoo.models.config import ModelConfig


def test_zero_centred_norm_scales_by_one_plus_its_weight(rng):
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    w = rng.normal(size=8).astype(np.float32)
    centred, plain = RMSNorm(8, zero_centred=True), RMSNorm(8)
    assert np.all(np.asarray(centred.weight[...]) == 0)  # starts as the identity scale
    centred.weight[...] = w
    plain.weight[...] = 1 + w
    np.testing.assert_allclose(centred(x), plain(x), rtol=1e-6)


def test_partial_rotary_rotates_the_first_features_only(rng):
    x = jnp.asarray(rng.normal(size=(1, 5, 2, 12)), jnp.float32)
    positions = jnp.arange(5)
    partial = rope(x, positions, 100.0, 4)
    np.testing.assert_array_equal(partial[..., 4:], x[..., 4:])
    np.testing.assert_allclose(partial[..., :4], rope(x[..., :4], positions, 100.0), rtol=1e-6)
    np.testing.assert_array_equal(rope(x, positions, 100.0, 0), x)  # no position embedding
    np.testing.assert_array_equal(rope(x, positions, 100.0, 12), rope(x, positions, 100.0))


def forward_and_decode(cfg, tokens):
    """(full-forward logits, prefill of the first half then one decode step per token), each
    compiled once."""
    graphdef, state = nnx.split(build_model(cfg, vocab_size=50, rngs=nnx.Rngs(1)))
    full = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, tokens)
    half = tokens.shape[1] // 2

    @jax.jit
    def prefill(s, x):
        model = nnx.merge(graphdef, s)
        return model.prefill(x, model.init_cache(x.shape[0], 16))

    decode = jax.jit(lambda s, x, cache: nnx.merge(graphdef, s).decode_step(x, cache))
    logits, cache = prefill(state, tokens[:, :half])
    steps = [logits]
    for t in range(half, tokens.shape[1]):
        step, cache = decode(state, tokens[:, t], cache)
        steps.append(step[:, None])
    return full, jnp.concatenate(steps, axis=1)


HYBRID = {
    "d_model": 32,
    "num_heads": 2,
    "tie_embeddings": True,
    "vocab_size": 64,
    "mlp_hidden": 24,
    "zero_centred_norm": True,
    "mixers": (
        {"mixer": "fwp", "cell": "gated_delta_rule", "num_value_heads": 4, "key_dim": 8,
         "value_dim": 8, "conv_activation": "silu", "output_gate": True, "output_norm_eps": 1e-5},
        {"mixer": "attention", "num_heads": 4, "num_kv_heads": 2, "key_dim": 8, "value_dim": 8,
         "rotary_dim": 4, "attention_qk_norm": "head", "output_gate": True,
         "gate_activation": "sigmoid"},
        {"mixer": "attention", "num_heads": 2, "key_dim": 8, "value_dim": 8,
         "attention_qk_norm": "all", "block_norm": "post"},
    ),
}  # fmt: skip


def test_every_new_feature_decodes_what_the_full_forward_computes(rng):
    cfg = ModelConfig(**HYBRID)
    tokens = jnp.asarray(rng.integers(0, 50, (2, 12)), jnp.int32)
    full, stepped = forward_and_decode(cfg, tokens)
    assert full.shape == (2, 12, 64)  # model.vocab_size sizes the head beyond the task's 50
    np.testing.assert_allclose(stepped, full, rtol=2e-5, atol=2e-5)


def test_grouped_heads_equal_their_repeated_ungrouped_layer(rng):
    """Attention with 2 key/value heads for 4 query heads equals attention with 4, each pair
    sharing the same key and value weights."""
    base = {"mixers": ("attention",), "d_model": 32, "num_heads": 4, "key_dim": 8, "value_dim": 8}
    grouped = build_model(ModelConfig(**base, num_kv_heads=2), vocab_size=20, rngs=nnx.Rngs(2))
    full = build_model(ModelConfig(**base), vocab_size=20, rngs=nnx.Rngs(2))
    w = np.asarray(grouped.blocks[0].mixer.qkv_proj.kernel[...])  # [D, 4*8 + 2*8 + 2*8]
    q, k, v = np.split(w, [32, 48], axis=1)
    repeat = lambda a: np.repeat(a.reshape(32, 2, 8), 2, axis=1).reshape(32, 32)  # noqa: E731
    full.blocks[0].mixer.qkv_proj.kernel[...] = np.concatenate([q, repeat(k), repeat(v)], 1)
    for name in ("out_proj",):
        getattr(full.blocks[0].mixer, name).kernel[...] = getattr(
            grouped.blocks[0].mixer, name
        ).kernel[...]
    for part in ("embed", "head"):
        nnx.update(getattr(full, part), nnx.state(getattr(grouped, part)))
    nnx.update(full.blocks[0].mlp, nnx.state(grouped.blocks[0].mlp))
    tokens = jnp.asarray(rng.integers(0, 20, (1, 7)), jnp.int32)
    forward = nnx.jit(lambda model, x: model(x))
    np.testing.assert_allclose(
        forward(full, tokens), forward(grouped, tokens), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mixers", [("fwp", "fwp"), ("fwp", "attention")])
def test_defaults_keep_the_parameters_of_existing_configs(mixers):
    """The new fields at their defaults build exactly the parameters there were: the same
    names, shapes and initial values (the RNG draws in the same order)."""
    cfg = ModelConfig(mixers=mixers)
    model = build_model(cfg, vocab_size=30, rngs=nnx.Rngs(0))
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert "head/kernel" in names and not any("q_norm" in n or "gate_proj" in n for n in names)
    explicit = ModelConfig(mixers=mixers, num_value_heads=2, num_kv_heads=2, norm_eps=1e-6,
                           conv_activation="none", block_norm="pre")  # fmt: skip
    same = build_model(explicit, vocab_size=30, rngs=nnx.Rngs(0))
    assert jax.tree.all(jax.tree.map(np.array_equal, nnx.state(model), nnx.state(same)))
