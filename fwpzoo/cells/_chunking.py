"""Shared plumbing of the parallel forms: reading and writing chunks in place, and the diagonal
linear recurrence by associative scan.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N steps, C chunk size.
"""

import jax
import jax.numpy as jnp


def pad_to_chunks(x, size):
    """x [B, T, H, ...] zero-padded along T to a multiple of size; None stays None.

    A zero token is an identity step for every family (no write, no decay: k = 0, beta = 0,
    log_alpha = 0), so a padded tail leaves the outputs before it and the final state unchanged.
    """
    if x is None or x.shape[1] % size == 0:
        return x
    padding = size - x.shape[1] % size
    return jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))


def lower_mask(size, *, strict=False):
    """[C, C] True on and below the diagonal (strictly below when strict)."""
    return jnp.tril(jnp.ones((size, size), bool), -1 if strict else 0)


def causal_decay(g):
    """Gamma [..., C, C] = e^{g_t - g_s} for s <= t and 0 above, from log decays g [..., C].

    The exponent is masked to -inf before exp, so neither the value nor its gradient ever sees
    exp of a positive number."""
    return jnp.exp(jnp.where(lower_mask(g.shape[-1]), g[..., :, None] - g[..., None, :], -jnp.inf))


def chunk_of(x, n, size, dtype):
    """Chunk n of x [B, T, H, ...] as [B, H, C, ...] in dtype; None stays None.

    Slicing one chunk at a time out of the input inside a scan keeps the chunk in cache; no
    [B, H, N, C, ...] copy of the whole sequence is made."""
    if x is None:
        return None
    x = jax.lax.dynamic_slice_in_dim(x, n * size, size, axis=1)  # [B, C, H, ...]
    return jnp.swapaxes(x, 1, 2).astype(dtype)


def put_chunk(buffer, x, n):
    """buffer [B, T, H, ...] with chunk n replaced by x [B, H, C, ...] (in place in a scan)."""
    x = jnp.swapaxes(x, 1, 2).astype(buffer.dtype)  # [B, C, H, ...]
    return jax.lax.dynamic_update_slice_in_dim(buffer, x, n * x.shape[1], axis=1)


def associative_states(log_decay, x, state, axis):
    """Every state of S_n = exp(log_decay_n) * S_{n-1} + x_n along `axis`, by associative scan.

    x [..., N, ..., K, V]; log_decay broadcasts against x (e.g. [..., N, ..., K, 1] for per-row
    decay, [..., N, ..., 1, 1] for a scalar) or is None (no decay); state S_0 is x without the
    `axis` dimension. Returns [..., N + 1, ..., K, V]: S_0, S_1, ..., S_N.

    Decays stay in log space: the combine adds log decays and exponentiates only the later
    element's total, which is <= 0, so nothing overflows however long the sequence.
    """
    x = jnp.concatenate([jnp.expand_dims(state, axis), x], axis=axis)
    if log_decay is None:
        return jax.lax.associative_scan(jnp.add, x, axis=axis)
    # S_0 enters as a write with no decay before it.
    no_decay = jnp.zeros_like(jax.lax.slice_in_dim(log_decay, 0, 1, axis=axis))
    log_decay = jnp.concatenate([no_decay, log_decay], axis=axis)

    def combine(earlier, later):
        (a1, x1), (a2, x2) = earlier, later
        return a1 + a2, jnp.exp(a2) * x1 + x2

    _, states = jax.lax.associative_scan(combine, (log_decay, x), axis=axis)
    return states
