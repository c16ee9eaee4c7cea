"""Fast weights traced token by token (fwpzoo inspect's model side) for every mixer with a
matrix state: the last traced matrix is the one the full-sequence form ends with."""

import jax
import numpy as np
import pytest
from flax import nnx

from fwpzoo.models import ModelConfig, build_model
from fwpzoo.models.inspection import fast_weight_layers, trace

VOCAB, T = 11, 6
CASES = {
    "fwp": ({"cell": "gated_delta_rule"}, {"beta", "alpha"}),
    "mamba2": ({}, {"alpha"}),
    "plastic": (
        {"plastic_on": "recurrent", "plasticity": "neuromodulated"},
        {"learning_rate", "decay"},
    ),
    "rdn": ({}, set()),
    "srwm": ({"feature_map": "softmax", "qk_norm": "none"}, set()),
}


@pytest.mark.parametrize("mixer", list(CASES))
def test_the_last_traced_fast_weights_are_the_full_forms_final_state(mixer):
    fields, gates = CASES[mixer]
    cfg = ModelConfig(
        mixers=("attention", mixer), d_model=8, num_heads=2, form="recurrent", **fields
    )
    model = build_model(cfg, vocab_size=VOCAB, rngs=nnx.Rngs(0))
    if mixer == "plastic":  # eta away from its start, so the modulator matters
        model.blocks[1].mixer.eta_raw[...] = np.array([-0.8, 0.6], np.float32)
    assert fast_weight_layers(model) == [1]
    toks = jax.random.randint(jax.random.key(1), (T,), 0, VOCAB)
    records = trace(model, toks, 1)
    _, cache = model.prefill(toks[None], model.init_cache(1, T))
    final = model.blocks[1].mixer.fast_weights(cache[1])[0]
    assert records["S"].shape == (T, *final.shape)
    np.testing.assert_allclose(records["S"][-1], final, rtol=2e-5, atol=2e-6)
    assert set(records["gates"]) == gates
    assert all(g.shape == (T, 2) for g in records["gates"].values())
    with pytest.raises(ValueError, match="block 0 has no fast weights"):
        trace(model, toks, 0)
