"""The causal LM: embed -> blocks (norm -> mixer -> residual -> norm -> SwiGLU -> residual) -> head.

Parameters are float32; `dtype` is the compute dtype; fast-weight and SSM states stay float32;
logits come out float32.

Packed rows: every entry point takes an optional `reset` ([B, T] bool; [B] for decode_step), True
where a new segment (document) starts; every block passes it to its mixer, so no token sees
anything of an earlier segment in its row.
"""

import jax.numpy as jnp
from flax import nnx

from fwpzoo.layers import RMSNorm, SwiGLU, get_mixer
from fwpzoo.layers.moe import SparseMoE


class Block(nnx.Module):
    """One layer of a layer config `cfg` (ModelConfig.layers(): its mixer is cfg.mixers[0]);
    `mixer_cfg`: that layer's mixer view (ModelConfig.mixer_configs(); None: built from cfg)."""

    def __init__(self, cfg, mixer_cfg=None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        norm = lambda: RMSNorm(cfg.d_model, eps=cfg.norm_eps, zero_centred=cfg.zero_centred_norm)  # noqa: E731
        self.mixer_norm = norm()
        mixer_cfg = cfg if mixer_cfg is None else mixer_cfg
        self.mixer = get_mixer(cfg.mixers[0])(mixer_cfg, rngs=rngs, dtype=dtype)
        hidden = cfg.mlp_hidden if cfg.mlp_hidden is not None else int(cfg.mlp_ratio * cfg.d_model)
        self.mlp_norm = norm() if hidden > 0 else None
        self.post_norm = cfg.block_norm == "post"
        mlp = SparseMoE if cfg.moe_experts else SwiGLU  # a mixture of experts of that width
        self.mlp = mlp(cfg.d_model, hidden, cfg, rngs=rngs, dtype=dtype) if hidden > 0 else None
        self.remat = cfg.remat

    def __call__(self, x, *, reset=None, return_intermediates: bool = False):
        """x [B, T, D] -> x [B, T, D] (and the mixer's intermediates when asked).

        model.remat "block" keeps only x for the backward pass and recomputes the block from
        it; "mixer" does so for the mixer alone (its per-chunk states, gates, conv)."""
        forward = nnx.remat(Block._forward) if self.remat == "block" else Block._forward
        x, stats = forward(self, x, reset)
        return (x, stats) if return_intermediates else x

    # Every entry point is the block's two residual lines around its own call of the mixer:
    #     x = x + mixer(norm(x))
    #     x = x + mlp(norm(x))
    # (model.block_norm "post": x = x + norm(mixer(x)), x = x + norm(mlp(x)); see _in, _out).

    def _forward(self, x, reset):
        mix = lambda mixer, h, reset: mixer(h, reset=reset, return_intermediates=True)  # noqa: E731
        mix = nnx.remat(mix) if self.remat == "mixer" else mix
        y, stats = mix(self.mixer, self._in(self.mixer_norm, x), reset)
        x = x + self._out(self.mixer_norm, y)
        x = x + self._mlp(x)
        return x, stats

    def prefill(self, x, cache, reset=None):
        y, cache = self.mixer.prefill(self._in(self.mixer_norm, x), cache, reset=reset)
        x = x + self._out(self.mixer_norm, y)
        x = x + self._mlp(x)
        return x, cache

    def decode_step(self, x, cache, reset=None):
        """x [B, D] -> (x [B, D], cache)."""
        y, cache = self.mixer.decode_step(self._in(self.mixer_norm, x), cache, reset=reset)
        x = x + self._out(self.mixer_norm, y)
        x = x + self._mlp(x)
        return x, cache

    def inspect_step(self, x, cache):
        """decode_step through a mixer with fast weights, plus the token's gates {name: [B, H]}."""
        y, cache, gates = self.mixer.inspect_step(self._in(self.mixer_norm, x), cache)
        x = x + self._out(self.mixer_norm, y)
        x = x + self._mlp(x)
        return x, cache, gates

    def _mlp(self, x):
        """The MLP's branch for the residual stream x; 0 in a block without an MLP (adding 0
        leaves x as it is, and XLA drops the addition)."""
        if self.mlp is None:
            return 0.0
        return self._out(self.mlp_norm, self.mlp(self._in(self.mlp_norm, x)))

    # model.block_norm: a pre-norm normalises what enters a sublayer, a post-norm what leaves it
    def _in(self, norm, x):
        return x if self.post_norm else norm(x)

    def _out(self, norm, y):
        return norm(y) if self.post_norm else y


class CausalLM(nnx.Module):
    """tokens [B, T] -> logits [B, T, vocab_size] float32; one block per entry of cfg.mixers."""

    def __init__(self, cfg, *, vocab_size: int, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embed = nnx.Embed(vocab_size, cfg.d_model, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [
                Block(layer, mixer_cfg, rngs=rngs, dtype=dtype)
                for layer, mixer_cfg in zip(cfg.layers(), cfg.mixer_configs(), strict=True)
            ]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, zero_centred=cfg.zero_centred_norm)
        self.head = (
            None
            if cfg.tie_embeddings
            else nnx.Linear(cfg.d_model, vocab_size, use_bias=False, dtype=dtype, rngs=rngs)
        )
        self.vocab_size = vocab_size

    def __call__(self, tokens, *, reset=None, return_intermediates: bool = False):
        """tokens [B, T], reset [B, T] bool or None -> logits [B, T, vocab]."""
        x = self.embed(tokens)
        return self.from_embeddings(x, reset=reset, return_intermediates=return_intermediates)

    def from_embeddings(self, x, *, reset=None, return_intermediates: bool = False):
        """The model after the embedding: x [B, T, D] -> logits [B, T, vocab] (and intermediates,
        {"block_{i}/{name}": scalar}, when asked)."""
        intermediates = {}
        for i, block in enumerate(self.blocks):
            x, stats = block(x, reset=reset, return_intermediates=True)
            intermediates.update({f"block_{i}/{name}": value for name, value in stats.items()})
        logits = self._logits(x)
        return (logits, intermediates) if return_intermediates else logits

    def init_cache(self, batch_size: int, max_len: int):
        """One cache per block; max_len bounds prompt + generated tokens for attention blocks."""
        return tuple(block.mixer.init_cache(batch_size, max_len) for block in self.blocks)

    def prefill(self, tokens, cache, reset=None):
        """tokens [B, T] (reset [B, T] or None) through every block's full-sequence form from
        `cache` -> (logits [B, T, vocab], cache ready for decode_step)."""
        x = self.embed(tokens)
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.prefill(x, block_cache, reset)
            new_cache.append(block_cache)
        return self._logits(x), tuple(new_cache)

    def decode_step(self, tokens, cache, reset=None):
        """tokens [B] (reset [B] or None) -> (logits [B, vocab], cache), constant memory per
        token."""
        x = self.embed(tokens)  # [B, D]
        new_cache = []
        for block, block_cache in zip(self.blocks, cache, strict=True):
            x, block_cache = block.decode_step(x, block_cache, reset)
            new_cache.append(block_cache)
        return self._logits(x), tuple(new_cache)

    def _logits(self, x):
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # [..., vocab]
        return logits.astype(jnp.float32)


def build_model(cfg, *, vocab_size: int, rngs: nnx.Rngs, dtype=jnp.float32) -> CausalLM:
    """The CausalLM of a ModelConfig over the task's `vocab_size` tokens (model.vocab_size, where
    set, sizes the embedding and head instead); ValueError naming the problem for a bad config."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if cfg.vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ValueError(
            f"model.vocab_size {cfg.vocab_size} is smaller than the task's vocabulary of "
            f"{vocab_size} tokens"
        )
    return CausalLM(cfg, vocab_size=cfg.vocab_size or vocab_size, rngs=rngs, dtype=dtype)
