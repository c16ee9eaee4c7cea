"""Short causal depthwise convolution over time, with a buffer so a sequence can go in pieces."""

import jax
import jax.numpy as jnp
from flax import nnx


def segment_starts(reset, before: int):
    """reset [B, T] bool -> [B, T] the position where each token's segment begins: the last
    t' <= t with reset True, or `before` where there is none (the segment began earlier)."""
    positions = jnp.arange(reset.shape[1])  # [T]
    return jax.lax.cummax(jnp.where(reset, positions, before), axis=1)


class ShortConv(nnx.Module):
    """y_t = sum_w kernel[w] * x_{t - W + 1 + w} per channel; W = width.

    The buffer holds the last W - 1 inputs seen before x (zeros at the start of a sequence), so
    the full forward, a prefill in pieces and token-by-token decoding give the same outputs. With
    segment resets, the inputs before a token's segment start read as zeros, as before a
    sequence's first token.
    """

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=1)
        self.kernel = nnx.Param(init(rngs.params(), (width, channels), jnp.float32))  # [W, C]
        self.width = width
        self.channels = channels
        self.dtype = dtype

    def init_buffer(self, batch_size: int):
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)  # [B, W-1, C]

    def __call__(self, x, buffer=None, reset=None):
        """x [B, T, C], buffer [B, W-1, C] or None (zeros), reset [B, T] bool or None
        -> (y [B, T, C], next buffer)."""
        if buffer is None:
            buffer = self.init_buffer(x.shape[0])
        T, W = x.shape[1], self.width
        # padded[:, i] is the input at position i - (W - 1) of this piece
        padded = jnp.concatenate([buffer.astype(self.dtype), x.astype(self.dtype)], axis=1)
        kernel = self.kernel[...].astype(self.dtype)  # [W, C]
        if reset is None:
            y = sum(padded[:, w : w + T] * kernel[w] for w in range(W))  # [B, T, C]
            return y, padded[:, T:]
        starts = segment_starts(reset, -(W - 1))  # [B, T]; no reset: the buffer counts
        t = jnp.arange(T)
        # tap w of token t reads position t - (W - 1 - w); before t's segment it reads zero
        y = sum(
            jnp.where((t - (W - 1 - w) >= starts)[..., None], padded[:, w : w + T], 0) * kernel[w]
            for w in range(W)
        )  # [B, T, C]
        # the next piece continues the last token's segment: nothing before its start carries
        kept = jnp.arange(T - (W - 1), T) >= starts[:, -1:]  # [B, W-1]
        return y, jnp.where(kept[..., None], padded[:, T:], 0)
