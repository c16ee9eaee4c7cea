"""Short causal depthwise convolution over time, with a buffer so a sequence can go in pieces."""

import jax.numpy as jnp
from flax import nnx


class ShortConv(nnx.Module):
    """y_t = sum_w kernel[w] * x_{t - W + 1 + w} per channel; W = width.

    The buffer holds the last W - 1 inputs seen before x (zeros at the start of a sequence), so
    the full forward, a prefill in pieces and token-by-token decoding give the same outputs.
    """

    def __init__(self, channels: int, width: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=0, out_axis=1)
        self.kernel = nnx.Param(init(rngs.params(), (width, channels), jnp.float32))  # [W, C]
        self.width = width
        self.channels = channels
        self.dtype = dtype

    def init_buffer(self, batch_size: int):
        return jnp.zeros((batch_size, self.width - 1, self.channels), self.dtype)  # [B, W-1, C]

    def __call__(self, x, buffer=None):
        """x [B, T, C], buffer [B, W-1, C] or None (zeros) -> (y [B, T, C], next buffer)."""
        if buffer is None:
            buffer = self.init_buffer(x.shape[0])
        T = x.shape[1]
        padded = jnp.concatenate([buffer.astype(self.dtype), x.astype(self.dtype)], axis=1)
        kernel = self.kernel[...].astype(self.dtype)  # [W, C]
        y = sum(padded[:, w : w + T] * kernel[w] for w in range(self.width))  # [B, T, C]
        return y, padded[:, T:]
