"""Shared plumbing of the parallel forms: reading and writing chunks in place, segment resets
inside a chunk, and the diagonal linear recurrence by associative scan.

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


# A chunk's per-key decayed products come from factored rows, e^{g'_t - g_s} = e^{g'_t - m}
# e^{m - g_s} with m = g_C / 2, when every key decays by at most e^{-this} across the chunk: every
# factor then lies within e^{+-30}, far inside float32's range (e^{+-87}). A chunk of stronger
# decays takes the per-key halving, which never multiplies factors of opposite sign.
FACTORED_SPREAD = 60.0


def factored_chunks(log_decay, size):
    """[N] bool: per chunk of `size` tokens of log_decay [B, T, H, K] (zero-padded to whole
    chunks), whether every key's log decay summed over the chunk is at least -FACTORED_SPREAD.

    Computed for all chunks before the chunk loop: a batch split over devices exchanges the
    flags once per call rather than once per chunk."""
    B, _, H, K = log_decay.shape
    per_chunk = pad_to_chunks(log_decay, size).reshape(B, -1, size, H, K)  # [B, N, C, H, K]
    return jnp.all(jnp.sum(per_chunk, axis=2) >= -FACTORED_SPREAD, axis=(0, 2, 3))


def per_key_flags(q, log_decay, size):
    """factored_chunks(log_decay, size) for a per-key decay (log_decay with as many axes as
    q [B, T, H, K]); None for a scalar decay or none, where no chunk branches (by_flag)."""
    per_key = log_decay is not None and log_decay.ndim == q.ndim
    return factored_chunks(log_decay, size) if per_key else None


def by_flag(flags, n, run):
    """run(factored) for chunk n: run(False) when flags is None (no per-key decay), else one
    lax.cond on flags[n] between run(True) and run(False)."""
    if flags is None:
        return run(False)
    return jax.lax.cond(flags[n], lambda: run(True), lambda: run(False))


def chunk_of(x, n, size, dtype):
    """Chunk n of x [B, T, H, ...] as [B, H, C, ...] in dtype; None stays None.

    Slicing one chunk at a time out of the input inside a scan keeps the chunk in cache; no
    [B, H, N, C, ...] copy of the whole sequence is made."""
    if x is None:
        return None
    x = jax.lax.dynamic_slice_in_dim(x, n * size, size, axis=1)  # [B, C, H, ...]
    return jnp.swapaxes(x, 1, 2).astype(dtype)


def reset_chunk(reset, n, size):
    """Chunk n of reset [B, T] as [B, 1, C] (broadcasting over heads); None stays None."""
    return None if reset is None else chunk_of(reset[:, :, None], n, size, bool)


class Segments:
    """Where the resets of one chunk cut it, from reset [B, 1, C] bool (True: the state before
    that row is replaced by zeros).

    The in-chunk segment index is the running count of resets, so row s reaches row t >= s only
    when both have the same index (no reset in (s, t]); the state entering the chunk reaches the
    rows before the first reset (index 0), and the state leaving it is built from the rows of the
    last segment alone. Every mask is applied with a select, never by exponentiating -inf: the
    masked values and their gradients are exact zeros."""

    def __init__(self, reset):
        index = jnp.cumsum(reset, axis=-1)  # [B, 1, C]
        self.same = index[..., :, None] == index[..., None, :]  # [B, 1, C, C]
        self.first = index == 0  # [B, 1, C]: rows the entering state reaches
        self.last = index == index[..., -1:]  # [B, 1, C]: rows the leaving state keeps
        self.through = index[..., -1] == 0  # [B, 1]: the entering state reaches the chunk end


def keep(mask, factor, dtype):
    """factor where mask is True, 0 elsewhere; a factor of None means 1 (no decay), mask None
    keeps everything. mask broadcasts over factor's trailing axes ([B, 1, C] against a scalar
    decay [B, H, C] or a per-key one [B, H, C, K])."""
    if mask is None:
        return factor
    if factor is None:
        return mask.astype(dtype)
    return jnp.where(mask.reshape(mask.shape + (1,) * (factor.ndim - mask.ndim)), factor, 0.0)


def put_chunk(buffer, x, n):
    """buffer [B, T, H, ...] with chunk n replaced by x [B, H, C, ...] (in place in a scan)."""
    x = jnp.swapaxes(x, 1, 2).astype(buffer.dtype)  # [B, C, H, ...]
    return jax.lax.dynamic_update_slice_in_dim(buffer, x, n * x.shape[1], axis=1)


def resets_as_rows(reset):
    """reset [B, T] as [B, T, 1, 1, 1], to broadcast against writes [B, T, H, K, V]; None stays."""
    return None if reset is None else reset[:, :, None, None, None]


def associative_states(log_decay, x, state, axis, reset=None):
    """Every state of S_n = exp(log_decay_n) * S_{n-1} + x_n along `axis`, by associative scan.

    x [..., N, ..., K, V]; log_decay broadcasts against x (e.g. [..., N, ..., K, 1] for per-row
    decay, [..., N, ..., 1, 1] for a scalar) or is None (no decay); state S_0 is x without the
    `axis` dimension; reset broadcasts against x like a scalar decay, or is None: where True,
    S_{n-1} is replaced by zeros first (S_n = x_n). Returns [..., N + 1, ..., K, V]: S_0, ..., S_N.

    Decays stay in log space: the combine adds log decays and exponentiates only the later
    element's total, which is <= 0, so nothing overflows however long the sequence. A reset is a
    flag carried beside the decay: a pair whose later element resets keeps only that element's
    write (a select, so neither value nor gradient sees the discarded part).
    """
    x = jnp.concatenate([jnp.expand_dims(state, axis), x], axis=axis)

    if log_decay is None and reset is None:
        return jax.lax.associative_scan(jnp.add, x, axis=axis)

    def with_first(y):  # S_0 enters as a write with no decay and no reset before it
        first = jnp.zeros_like(jax.lax.slice_in_dim(y, 0, 1, axis=axis))
        return jnp.concatenate([first, y], axis=axis)

    a = jnp.zeros((), x.dtype) if log_decay is None else with_first(log_decay)
    r = jnp.zeros((), bool) if reset is None else with_first(reset)
    a, r = (jnp.broadcast_to(y, jnp.broadcast_shapes(a.shape, r.shape)) for y in (a, r))

    def combine(earlier, later):
        (a1, r1, x1), (a2, r2, x2) = earlier, later
        carried = x1 if log_decay is None else jnp.exp(a2) * x1
        return a1 + a2, r1 | r2, x2 + (carried if reset is None else jnp.where(r2, 0.0, carried))

    _, _, states = jax.lax.associative_scan(combine, (a, r, x), axis=axis)
    return states
