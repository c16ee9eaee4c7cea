"""Fast weights as they change: one layer's matrix state and gates at every token of a prompt.

The model runs one decode_step per token (the cell's `step`, as sampling does); the chosen block
runs its mixer's inspect_step instead, which also returns the token's gates, and its fast weights
are read from the cache after every token.
"""

from functools import partial

import jax
from flax import nnx


def fast_weight_layers(model) -> list[int]:
    """The blocks whose mixer has a matrix state (fast weights) to inspect."""
    return [i for i, block in enumerate(model.blocks) if block.mixer.HAS_FAST_WEIGHTS]


def trace(model, tokens, layer: int) -> dict:
    """tokens [T] int -> {"S": [T, H, K, V] float32, "gates": {name: [T, H]}}: block `layer`'s
    fast weights after each token and the gates each token set (batch of one)."""
    if layer not in fast_weight_layers(model):
        raise ValueError(f"block {layer} has no fast weights")
    graphdef, state = nnx.split(model)
    return _trace(graphdef, state, tokens, layer)


@partial(jax.jit, static_argnums=(0, 3))
def _trace(graphdef, state, tokens, layer):
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(1, tokens.shape[0])

    def one_token(cache, token):
        x = model.embed(token[None])  # [1, D]
        new_cache, record = [], None
        for i, (block, block_cache) in enumerate(zip(model.blocks, cache, strict=True)):
            if i == layer:
                x, block_cache, gates = block.inspect_step(x, block_cache)
                S = block.mixer.fast_weights(block_cache)[0]  # [H, K, V]
                record = {"S": S, "gates": {name: g[0] for name, g in gates.items()}}
            else:
                x, block_cache = block.decode_step(x, block_cache)
            new_cache.append(block_cache)
        return tuple(new_cache), record

    _, records = jax.lax.scan(one_token, cache, tokens)
    return records
