"""A sparse mixture of SwiGLU experts with an optional gated shared expert (Qwen3-Next's MLP).

    p = softmax(W_r x)                      router probabilities over E experts
    the top k of p (renormalised to sum 1 with norm_top_k), every other expert's weight 0
    y = sum_e w_e down_e(silu(gate_e x) * up_e x) + sigmoid(w_s . x) shared(x)

Every expert is computed on every token and weighted (0 for the unselected), which is exact and
simple at the sizes fwpzoo trains; a serving kernel would gather each expert's tokens instead.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.layers.mlp import SwiGLU


class SparseMoE(nnx.Module):
    def __init__(self, d_model: int, hidden: int, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        """hidden: each expert's width; cfg: a ModelConfig's moe_* fields."""
        E, F = cfg.moe_experts, hidden
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        # each expert's kernel initialised as one Linear's: fan-in over its input axis
        init = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
        )
        self.router = linear(d_model, E)
        self.gate = nnx.Param(init(rngs.params(), (E, d_model, F), jnp.float32))  # [E, D, F]
        self.up = nnx.Param(init(rngs.params(), (E, d_model, F), jnp.float32))  # [E, D, F]
        self.down = nnx.Param(init(rngs.params(), (E, F, d_model), jnp.float32))  # [E, F, D]
        shared = cfg.moe_shared_hidden
        self.shared = SwiGLU(d_model, shared, rngs=rngs, dtype=dtype) if shared else None
        self.shared_gate = linear(d_model, 1) if shared else None
        self.top_k, self.norm_top_k, self.experts, self.dtype = (
            cfg.moe_top_k,
            cfg.moe_norm_top_k,
            E,
            dtype,
        )

    def weights(self, x):
        """x [..., D] -> each expert's weight [..., E] float32 (zero outside the top k)."""
        probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)  # [..., E]
        top, index = jax.lax.top_k(probs, self.top_k)  # [..., k]
        if self.norm_top_k:
            top = top / jnp.sum(top, axis=-1, keepdims=True)
        return jnp.sum(jax.nn.one_hot(index, self.experts) * top[..., None], axis=-2)

    def __call__(self, x):  # [..., D] -> [..., D]
        cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
        h = jnp.einsum("...d,edf->...ef", x, cast(self.gate))  # [..., E, F]
        u = jnp.einsum("...d,edf->...ef", x, cast(self.up))
        y = jnp.einsum("...ef,efd->...ed", jax.nn.silu(h) * u, cast(self.down))  # [..., E, D]
        out = jnp.einsum("...e,...ed->...d", self.weights(x).astype(self.dtype), y)
        if self.shared is not None:
            out = out + jax.nn.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out
