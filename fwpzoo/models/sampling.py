"""Autoregressive sampling: prefill the prompt, then decode_step per token, a lax.scan per chunk."""

import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

CHUNK = 256  # tokens per compiled decode scan; progress is reported between chunks


def generate(
    model,
    prompt,
    num_tokens: int,
    *,
    rng,
    temperature: float = 1.0,
    keep_logits: bool = True,
    progress: bool = False,
):
    """Samples num_tokens tokens after prompt [B, T0].

    Returns (tokens [B, num_tokens] int32, logits [B, num_tokens, vocab] float32, or None without
    keep_logits): logits[:, i] is the distribution token i was drawn from. temperature 0 means
    greedy (argmax). Tokens are drawn CHUNK at a time, each chunk one compiled lax.scan, so a
    long generation shows progress (a tqdm bar on stderr after two seconds, with `progress`) and
    holds the tokens, not every step's logits, unless asked. Memory per token is constant: the
    cache is sized once (T0 + the tokens of all chunks, which only attention blocks use).
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    graphdef, state = nnx.split(model)
    chunk = min(CHUNK, num_tokens)
    num_chunks = math.ceil(num_tokens / chunk)
    logits, cache = _prefill(graphdef, state, prompt, cache_length(prompt.shape[1], num_tokens))
    tokens, step_logits = [], []
    with tqdm(total=num_tokens, unit="token", delay=2, disable=not progress) as bar:
        for c in range(num_chunks):
            keys = jax.random.split(jax.random.fold_in(rng, c), chunk)
            logits, cache, new, new_logits = _decode(
                graphdef, state, logits, cache, keys, float(temperature), keep_logits
            )
            tokens.append(new)
            step_logits.append(new_logits)
            bar.update(min(chunk, num_tokens - bar.n))
    tokens = jnp.concatenate(tokens, axis=1)[:, :num_tokens]  # [B, N]
    if not keep_logits:
        return tokens, None
    return tokens, jnp.concatenate(step_logits, axis=1)[:, :num_tokens]  # [B, N, vocab]


def cache_length(prompt_len: int, num_tokens: int) -> int:
    """The positions generate's cache holds: the prompt and every token of every chunk."""
    chunk = min(CHUNK, num_tokens)
    return prompt_len + math.ceil(num_tokens / chunk) * chunk


def cache_bytes(model, batch_size: int, max_len: int) -> int:
    """The bytes of model.init_cache(batch_size, max_len), computed without allocating it."""
    shapes = jax.eval_shape(lambda: model.init_cache(batch_size, max_len))
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def sample_token(logits, key, temperature: float):
    """logits [B, vocab] -> tokens [B]."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@partial(jax.jit, static_argnums=(0, 3))
def _prefill(graphdef, state, prompt, max_len):
    """prompt [B, T0] -> (logits of the token after it [B, vocab], cache for max_len tokens)."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompt, model.init_cache(prompt.shape[0], max_len))
    return logits[:, -1], cache


@partial(jax.jit, static_argnums=(0, 5, 6))
def _decode(graphdef, state, logits, cache, keys, temperature, keep_logits):
    """One chunk of len(keys) tokens: (logits, cache) after it, tokens [B, C], logits [B, C, V]."""
    model = nnx.merge(graphdef, state)

    def one_token(carry, key):
        logits, cache = carry  # [B, vocab]: the distribution of the token drawn now
        token = sample_token(logits, key, temperature)
        next_logits, cache = model.decode_step(token, cache)
        return (next_logits, cache), (token, logits if keep_logits else None)

    (logits, cache), (tokens, step_logits) = jax.lax.scan(one_token, (logits, cache), keys)
    step_logits = jnp.swapaxes(step_logits, 0, 1) if keep_logits else None
    return logits, cache, tokens.T, step_logits
