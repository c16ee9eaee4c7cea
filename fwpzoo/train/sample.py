"""Sampling from a checkpoint: prompt in, tokens out, one decode_step per token."""

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from fwpzoo.config import ConfigError
from fwpzoo.data.tokenizer import decode, encode
from fwpzoo.layers.fwp import check_decodable
from fwpzoo.models import generate
from fwpzoo.models.sampling import cache_bytes, cache_length
from fwpzoo.train.restore import restore_run


def text_task(task) -> bool:
    return task.name == "text"


def parse_prompt(prompt: str, task) -> np.ndarray:
    """[T0] token ids: for a text task the tokens of `prompt` (its tokenizer's, or its bytes),
    else its integers ('3 17 5')."""
    if text_task(task) and task.tokenizer is not None:
        tokens = encode(task.tokenizer, prompt).tolist()
    elif text_task(task):
        tokens = list(prompt.encode("utf-8"))
    else:
        try:
            tokens = [int(token) for token in prompt.replace(",", " ").split()]
        except ValueError:
            raise ConfigError(
                f"--prompt {prompt!r} is not a list of token ids like '3 17 5'"
            ) from None
    if not tokens:
        raise ConfigError("--prompt is empty")
    out_of_range = [t for t in tokens if not 0 <= t < task.vocab_size]
    if out_of_range:
        raise ConfigError(
            f"--prompt tokens {out_of_range} are outside the vocabulary 0..{task.vocab_size - 1}"
        )
    return np.asarray(tokens, np.int32)


def default_prompt(task) -> np.ndarray:
    """The first valid sequence up to and including its first scored position, so the first
    sampled token answers it."""
    batch = next(task.eval_batches("valid", 1, 1))
    first_scored = int(np.argmax(batch["weights"][0] > 0))
    return batch["inputs"][0, : first_scored + 1]


def memory_bytes() -> int:
    """What the first device can hold: its own limit where it reports one, else the host's RAM."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_cache_fits(model, max_len: int, num_tokens: int) -> None:
    """ConfigError, before any allocation, if the decode cache (attention's grows with the
    tokens) needs more than the memory there is."""
    needed, available = cache_bytes(model, 1, max_len), memory_bytes()
    if needed > available:
        raise ConfigError(
            f"--num-tokens {num_tokens} needs a {needed / 2**30:,.1f} GiB decode cache, more "
            f"than the {available / 2**30:,.1f} GiB of memory; ask for fewer tokens"
        )


def sample(
    workdir: Path, step, prompt, num_tokens: int, *, temperature: float, seed: int, logprobs=False
) -> dict:
    """{"step", "prompt", "tokens" (and "text" for a text task, "logprobs" when asked: the
    log-probability of each generated token under the distribution it was drawn from, before
    the temperature)} from checkpoint `step`."""
    run, step, model_state = restore_run(workdir, step)
    try:
        check_decodable(run.cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    model = nnx.merge(run.graphdef, model_state["params"], model_state["rest"])
    prompt_tokens = default_prompt(run.task) if prompt is None else parse_prompt(prompt, run.task)
    check_cache_fits(model, cache_length(len(prompt_tokens), num_tokens), num_tokens)
    tokens, logits = generate(
        model,
        prompt_tokens[None],
        num_tokens,
        rng=jax.random.key(seed),
        temperature=temperature,
        keep_logits=logprobs,
        progress=True,
    )
    tokens = np.asarray(jax.device_get(tokens))[0]
    out = {"step": step, "prompt": prompt_tokens.tolist(), "tokens": tokens.tolist()}
    if logprobs:
        out["logprobs"] = token_logprobs(logits[0], tokens).tolist()
    if text_task(run.task) and run.task.tokenizer is not None:
        out["text"] = decode(run.task.tokenizer, tokens)
    elif text_task(run.task):
        out["text"] = bytes(tokens.astype(np.uint8)).decode("utf-8", errors="replace")
    return out


def token_logprobs(logits, tokens) -> np.ndarray:
    """float64 [N]: log softmax(logits[i])[tokens[i]], logits [N, vocab] float32."""
    logits = np.asarray(jax.device_get(logits), np.float64)  # [N, vocab]
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return logits[np.arange(len(tokens)), tokens] - log_z
