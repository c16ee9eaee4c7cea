"""Autoregressive sampling: prefill the prompt, then one decode_step per token inside lax.scan."""

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


def generate(model, prompt, num_tokens: int, *, rng, temperature: float = 1.0):
    """Samples num_tokens tokens after prompt [B, T0].

    Returns (tokens [B, num_tokens] int32, logits [B, num_tokens, vocab] float32): logits[:, i] is
    the distribution token i was drawn from. temperature 0 means greedy (argmax). Memory per token
    is constant: the cache is sized once (T0 + num_tokens, which only attention blocks use).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, prompt, rng, num_tokens, float(temperature))


def sample_token(logits, key, temperature: float):
    """logits [B, vocab] -> tokens [B]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 4, 5))
def _generate(graphdef, state, prompt, rng, num_tokens, temperature):
    model = nnx.merge(graphdef, state)
    batch_size, prompt_len = prompt.shape
    logits, cache = model.prefill(prompt, model.init_cache(batch_size, prompt_len + num_tokens))

    def one_token(carry, key):
        logits, cache = carry  # [B, vocab]: the distribution of the token drawn now
        token = sample_token(logits, key, temperature)
        next_logits, cache = model.decode_step(token, cache)
        return (next_logits, cache), (token, logits)

    keys = jax.random.split(rng, num_tokens)
    _, (tokens, step_logits) = jax.lax.scan(one_token, (logits[:, -1], cache), keys)
    return tokens.T, jnp.swapaxes(step_logits, 0, 1)  # [B, N], [B, N, vocab]
