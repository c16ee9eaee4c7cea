"""SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

import jax
import jax.numpy as jnp
from flax import nnx


class SwiGLU(nnx.Module):
    def __init__(self, d_model: int, hidden: int, cfg=None, *, rngs: nnx.Rngs, dtype=jnp.float32):
        """cfg: unused, so a block builds this MLP and SparseMoE alike."""
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.gate = linear(d_model, hidden)
        self.up = linear(d_model, hidden)
        self.down = linear(hidden, d_model)

    def __call__(self, x):  # [..., D] -> [..., D]
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
