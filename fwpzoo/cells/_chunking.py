"""Shared plumbing of the parallel forms: chunk layout and the diagonal linear recurrence.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk size.
The chunk layout is head-major, [B, H, N, C, ...], so that every per-chunk product is a matmul
over the trailing two axes with (B, H, N) as batch axes.
"""

import jax
import jax.numpy as jnp


def to_chunks(x, chunk_size):
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to a multiple of C.

    A zero token is an identity step for every family (no write, no decay: k = 0, beta = 0,
    log_alpha = 0), so the padded tail leaves outputs and the final state unchanged.
    """
    B, T, H = x.shape[:3]
    N = -(-T // chunk_size)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, N * chunk_size - T)
    x = jnp.pad(x, pad)  # [B, N * C, H, ...]
    x = x.reshape(B, N, chunk_size, H, *x.shape[3:])  # [B, N, C, H, ...]
    return jnp.moveaxis(x, 3, 1)  # [B, H, N, C, ...]


def from_chunks(x, length):
    """[B, H, N, C, ...] -> [B, T, H, ...], dropping the padded tail."""
    B, H, N, C = x.shape[:4]
    x = jnp.moveaxis(x, 1, 3)  # [B, N, C, H, ...]
    x = x.reshape(B, N * C, H, *x.shape[4:])  # [B, N * C, H, ...]
    return x[:, :length]


def chunk_states(log_decay, writes, state):
    """The state entering each chunk, and the final one: S_n = exp(a_n) * S_{n-1} + X_n.

    writes X [B, H, N, K, V]; log_decay a [B, H, N, K, 1] (per row), [B, H, N, 1, 1] (scalar) or
    None (no decay); state S_0 [B, H, K, V]. Returns (S_0..S_{N-1} [B, H, N, K, V], S_N).
    A sequential scan: N = T / C steps of elementwise work, cheaper than an associative scan's
    strided passes over all N states (measured about 4x on CPU at N = 32, K = V = 64).
    """
    time_major = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731  [B, H, N, ...] -> [N, B, H, ...]
    decay = None if log_decay is None else time_major(jnp.exp(log_decay))

    def advance(S, inputs):
        d, x = inputs
        return (S + x if d is None else d * S + x), S

    final, entering = jax.lax.scan(advance, state, (decay, time_major(writes)))
    return jnp.moveaxis(entering, 0, 2), final


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
