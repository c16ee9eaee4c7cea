"""Causal softmax attention with rotary position embeddings and a fixed-size KV cache: the baseline.

The cache holds max_len keys and values and the next position; a prefill of T tokens writes T
slots and every query attends over the whole buffer with a mask, so the full forward, a prefill
in pieces and token-by-token decoding compute the same thing. Writing past max_len would make
dynamic_update_slice clamp its index and silently overwrite the newest keys, so the outputs of a
write that does not fit are NaN instead: visible under jit, where the position is traced and
cannot raise (the sampler sizes the cache to prompt + generated tokens).

Segment resets (packed rows): a token attends only to the keys of its own segment, and rotary
positions restart at each segment start, so a packed row computes exactly what its segments
compute alone (rotary scores depend on position differences only, but restarting keeps the
angles, and so their float32 rounding, the same as well). The cache keeps each row's current
segment start, so decoding goes on in the right segment.
"""

from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from fwpzoo.layers.base import Description, KVCache, Mixer, MixerConfig
from fwpzoo.layers.conv import segment_starts
from fwpzoo.layers.gates import GATE_ACTIVATIONS
from fwpzoo.layers.norms import RMSNorm


def rope(x, positions, base: float, dim: int | None = None):
    """Rotates pairs (x_i, x_{i + R/2}), i < R/2, of the first R = dim features of x [B, T, H, K]
    (None: R = K) by angle position * base^(-2i/R) and leaves the other K - R as they are
    (partial rotary: Qwen3.5 rotates a quarter); positions [T] (shared by the rows) or [B, T]."""
    R = x.shape[-1] if dim is None else dim
    if R == 0:
        return x
    half = R // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, R/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [(B,) T, 1, R/2]
    x1, x2, rest = jnp.split(x.astype(jnp.float32), [half, R], axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return rotated.astype(x.dtype)


def repeat_heads(x, num_heads: int):
    """x [B, S, G, .] -> [B, S, num_heads, .]: each of the G heads serves num_heads / G
    consecutive heads (grouped-query attention)."""
    groups = num_heads // x.shape[2]
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(K), masked) v.

    q [B, T, H, K], k [B, S, H, K], v [B, S, H, V], mask [T, S] or [B, T, S] (True where a
    query may look).
    """
    scores = jnp.einsum("bthk,bshk->bhts", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    mask = mask if mask.ndim == 2 else mask[:, None]  # [(B, 1,) T, S]
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)  # [B, H, T, S]
    return jnp.einsum("bhts,bshv->bthv", weights.astype(v.dtype), v)  # [B, T, H, V]


def dot_product_attention(q, k, v):
    """Causal softmax attention by jax.nn.dot_product_attention (XLA's fused implementation on
    CPU, cuDNN's where it applies); needs K == V. q, k [B, T, H, K], v [B, T, H, V]."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def blockwise_attention(q, k, v, block_size: int):
    """Causal softmax attention by blocks of `block_size` tokens that never computes a block of
    keys wholly after its queries: the online softmax of flash attention (Dao et al. 2022), one
    block diagonal at a time. Diagonal d pairs query block i with key block i - d, for every i at
    once (one batched matmul); only d = 0 needs the causal mask inside the block. About half the
    FLOPs of the dense [T, T] square. q, k [B, T, H, K], v [B, T, H, V] -> o [B, T, H, V].
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = min(block_size, T)
    N = -(-T // C)  # blocks; the padded keys lie after every real query, so causality masks them
    pad = lambda x: jnp.pad(x, ((0, 0), (0, N * C - T), (0, 0), (0, 0)))  # noqa: E731
    blocks = lambda x: pad(x).reshape(B, N, C, H, x.shape[-1])  # noqa: E731  [B, N, C, H, .]
    qb, kb, vb = blocks(q * K**-0.5), blocks(k), blocks(v)
    inside = jnp.tril(jnp.ones((C, C), bool))  # [C, C] the diagonal blocks' causal mask
    m = jnp.full((B, N, H, C), -jnp.inf, jnp.float32)  # running max of each query's scores
    l = jnp.zeros((B, N, H, C), jnp.float32)  # running sum of exp(score - m)
    acc = jnp.zeros((B, N, H, C, V), jnp.float32)  # running sum of exp(score - m) v
    for d in range(N):  # d = 0 first: every query then has a finite max (itself)
        scores = jnp.einsum("bnchk,bnshk->bnhcs", qb[:, d:], kb[:, : N - d]).astype(jnp.float32)
        if d == 0:
            scores = jnp.where(inside, scores, -jnp.inf)  # [B, N - d, H, C, C]
        m_new = jnp.maximum(m[:, d:], scores.max(axis=-1))  # [B, N - d, H, C]
        p = jnp.exp(scores - m_new[..., None])
        rescale = jnp.exp(m[:, d:] - m_new)
        l = l.at[:, d:].set(l[:, d:] * rescale + p.sum(axis=-1))
        values = jnp.einsum("bnhcs,bnshv->bnhcv", p.astype(v.dtype), vb[:, : N - d])
        acc = acc.at[:, d:].set(acc[:, d:] * rescale[..., None] + values)
        m = m.at[:, d:].set(m_new)
    o = (acc / l[..., None]).astype(v.dtype)  # [B, N, H, C, V]
    return jnp.moveaxis(o, 3, 2).reshape(B, N * C, H, V)[:, :T]


# model.attention_kernel -> the causal full-sequence computation of the layer without resets
KERNELS: tuple[str, ...] = ("dense", "dot_product", "blockwise")


ATTENTION_QK_NORMS: tuple[str, ...] = ("none", "head", "all")  # model.attention_qk_norm


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(MixerConfig):
    """The fields attention reads; key_dim, value_dim and num_kv_heads (G) resolved. It has no
    forms: attention_kernel chooses how the full sequence is computed. The fields with a default
    are attention's own (see MixerConfig); the others are shared."""

    MIXER: ClassVar[str] = "attention"
    CHOICES: ClassVar[dict] = {
        "attention_kernel": KERNELS,
        "attention_qk_norm": ATTENTION_QK_NORMS,
    }
    MINIMUM: ClassVar[dict] = {"num_kv_heads": 1, "attention_block_size": 1}
    ABOVE: ClassVar[dict] = {"rope_base": 1}  # the rotary frequencies are rope_base ** (-2i / d)

    num_heads: int
    # key and value heads for grouped-query attention (None: num_heads, resolved in the view)
    num_kv_heads: int | None = None
    key_dim: int
    value_dim: int
    rope_base: float = 10000.0  # the rotary position embedding's base
    # rotate the first rotary_dim features of each q/k head (None: all, 0: none, i.e. no
    # position embedding)
    rotary_dim: int | None = None
    # how the full causal sequence is computed (dense: the masked [T, T] square; dot_product:
    # jax.nn.dot_product_attention; blockwise: blocks of attention_block_size tokens, those
    # wholly after their queries skipped)
    attention_kernel: str = "dense"
    attention_block_size: int = 256
    # RMSNorm on q and k after projection: none, head (each head's features, Qwen3) or all (all
    # heads' features at once, OLMo 2)
    attention_qk_norm: str = "none"
    norm_eps: float
    zero_centred_norm: bool
    output_gate: bool
    gate_activation: str

    @classmethod
    def resolve(cls, values):
        values = super().resolve(values)
        values["num_kv_heads"] = values["num_kv_heads"] or values["num_heads"]
        return values

    def check(self):
        H, G, K, V = self.num_heads, self.num_kv_heads, self.key_dim, self.value_dim
        if H % G:
            raise ValueError(
                f"model.num_kv_heads={G} and model.num_heads={H}: the query heads must be a "
                "multiple of the key/value heads"
            )
        if self.rotary_dim is None and K % 2:
            raise ValueError(f"attention needs an even key_dim for rotary embeddings, got {K}")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or self.rotary_dim > K):
            raise ValueError(
                f"model.rotary_dim must be even and at most the key head dim {K}, got "
                f"{self.rotary_dim}"
            )
        if self.attention_kernel == "dot_product" and K != V:
            raise ValueError(
                f"model.attention_kernel 'dot_product' needs key_dim == value_dim, got {K}, {V}"
            )

    def describe(self) -> Description:
        K, V, G = self.key_dim, self.value_dim, self.num_kv_heads
        return Description("attention", "kv_cache", K, self.num_heads, 0, per_token=G * (K + V))


class Attention(Mixer):
    """Multi-head causal attention of a model config `cfg` (its fields: AttentionConfig).

    q, k, v come from one projection [D, H K + G K + G V] (G key/value heads, G = H unless
    grouped); the optional q/k RMSNorms act before the rotary embedding; the optional output
    gate multiplies o by act(W_g x) before the output projection. The cache holds G heads.
    """

    Config = AttentionConfig

    def __init__(self, cfg, *, rngs: nnx.Rngs, dtype=jnp.float32):
        super().__init__(cfg)
        cfg = self.cfg
        H, G, K, V = cfg.num_heads, cfg.num_kv_heads, cfg.key_dim, cfg.value_dim
        self.H, self.G, self.K, self.V, self.dtype = H, G, K, V, dtype
        self.rope_base, self.rotary_dim = cfg.rope_base, cfg.rotary_dim
        self.kernel, self.block_size = cfg.attention_kernel, cfg.attention_block_size
        linear = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.qkv_proj = linear(cfg.d_model, H * K + G * (K + V))
        self.out_proj = linear(H * V, cfg.d_model)
        norm = lambda dim: RMSNorm(dim, eps=cfg.norm_eps, zero_centred=cfg.zero_centred_norm)  # noqa: E731
        self.qk_norm = cfg.attention_qk_norm
        per_head = self.qk_norm == "head"
        self.q_norm = None if self.qk_norm == "none" else norm(K if per_head else H * K)
        self.k_norm = None if self.qk_norm == "none" else norm(K if per_head else G * K)
        self.gate_proj = linear(cfg.d_model, H * V) if cfg.output_gate else None
        self.gate_activation = GATE_ACTIVATIONS[cfg.gate_activation]

    # the entry points: see fwpzoo.layers.base; decode_step from Mixer, no fast weights

    def __call__(self, x, *, reset=None, return_intermediates: bool = False):
        """x [B, T, D], reset [B, T] bool or None -> y [B, T, D] (and {} when asked)."""
        T = x.shape[1]
        positions = jnp.arange(T)  # [T]
        if reset is None:
            q, k, v = self._qkv(x, positions)
            y = self._output(self._causal(q, *self._grouped(k, v)), x)
            return (y, {}) if return_intermediates else y
        starts = segment_starts(reset, 0)  # [B, T]
        mask = (positions[:, None] >= positions) & (positions >= starts[:, :, None])  # [B, T, T]
        q, k, v = self._qkv(x, positions - starts)  # rotary positions restart per segment
        y = self._output(attend(q, *self._grouped(k, v), mask), x)
        return (y, {}) if return_intermediates else y

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        """max_len keys and values, the next slot, and each row's current segment start."""
        return KVCache(
            k=jnp.zeros((batch_size, max_len, self.G, self.K), self.dtype),
            v=jnp.zeros((batch_size, max_len, self.G, self.V), self.dtype),
            pos=jnp.zeros((), jnp.int32),
            start=jnp.zeros((batch_size,), jnp.int32),  # [B]
        )

    def prefill(self, x, cache, reset=None):
        """x [B, T, D] at slots pos .. pos + T - 1 (reset [B, T] bool or None)
        -> (y [B, T, D], cache with pos + T)."""
        pos, T, max_len = cache.pos, x.shape[1], cache.k.shape[1]
        if max_len < T:
            raise ValueError(f"{T} tokens do not fit a KV cache of max_len {max_len}")
        slots = pos + jnp.arange(T)  # [T]
        starts = jnp.broadcast_to(cache.start[:, None], (x.shape[0], T))  # [B, T]
        if reset is not None:  # a reset in this piece starts a segment at its slot
            in_piece = segment_starts(reset, -1)  # [B, T]
            starts = jnp.where(in_piece >= 0, pos + in_piece, starts)
        q, k, v = self._qkv(x, slots - starts)
        keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k, pos, axis=1)  # [B, L, G, K]
        values = jax.lax.dynamic_update_slice_in_dim(cache.v, v, pos, axis=1)  # [B, L, G, V]
        cached = jnp.arange(max_len)  # [L]
        mask = (slots[None, :, None] >= cached) & (cached >= starts[:, :, None])  # [B, T, L]
        y = self._output(attend(q, *self._grouped(keys, values), mask), x)
        y = jnp.where(pos + T <= max_len, y, jnp.nan)
        return y, KVCache(keys, values, pos + T, starts[:, -1])

    def inspect_step(self, x, cache, reset=None):
        """One token x [B, D] (reset [B] bool or None) -> (y [B, D], cache, gates): no gates."""
        y, cache = self.prefill(x[:, None], cache, None if reset is None else reset[:, None])
        return y[:, 0], cache, {}

    def _causal(self, q, k, v):
        """Causal attention over the whole sequence by the configured kernel."""
        if self.kernel == "dot_product":
            return dot_product_attention(q, k, v)
        if self.kernel == "blockwise":
            return blockwise_attention(q, k, v, self.block_size)
        positions = jnp.arange(q.shape[1])
        return attend(q, k, v, positions[:, None] >= positions[None, :])

    def _qkv(self, x, positions):
        """x [B, T, D] -> q [B, T, H, K], k [B, T, G, K], v [B, T, G, V]."""
        B, T, _ = x.shape
        H, G, K = self.H, self.G, self.K
        q, k, v = jnp.split(self.qkv_proj(x), [H * K, (H + G) * K], axis=-1)
        q, k = q.reshape(B, T, H, K), k.reshape(B, T, G, K)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif self.qk_norm == "all":  # over every head's features at once
            q = self.q_norm(q.reshape(B, T, H * K)).reshape(B, T, H, K)
            k = self.k_norm(k.reshape(B, T, G * K)).reshape(B, T, G, K)
        q = rope(q, positions, self.rope_base, self.rotary_dim)  # [B, T, H, K]
        k = rope(k, positions, self.rope_base, self.rotary_dim)  # [B, T, G, K]
        return q, k, v.reshape(B, T, G, self.V)  # [B, T, G, V]

    def _grouped(self, k, v):
        """k, v of G heads -> of H heads (each shared by H / G query heads)."""
        return repeat_heads(k, self.H), repeat_heads(v, self.H)

    def _output(self, o, x):
        """o [B, T, H, V] (and the layer input x [B, T, D], read by the gate) -> y [B, T, D]."""
        B, T = o.shape[:2]
        o = o.reshape(B, T, self.H * self.V)
        if self.gate_proj is not None:
            o = o * self.gate_activation(self.gate_proj(x))
        return self.out_proj(o)
