"""The chunk loop of the chunkwise forms whose chunk is not an affine map of the state (the
deep cells, deep/: a fast net trained at test time), written as one chunk's math.

A lax.scan walks the chunks in order, reading each chunk straight out of the [B, T, H, ...]
inputs and writing its outputs in place. A jax.custom_vjp keeps only the state entering every
chunk; the backward walks the chunks in reverse and pulls each one back from its entering state,
writing the input cotangents in place. A chunk's pullback is jax.vjp of its forward (recomputed,
autodiff inside the chunk) unless the cell supplies a hand-derived one. The affine rules run on
the chunk engine instead (engine.py), whose state scan holds no chunk work.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk size.
"""

import functools

import jax
import jax.numpy as jnp

from fwpzoo.cells.chunked.chunking import chunk_of, pad_to_chunks, put_chunk


def scan_chunks(chunk_fn, inputs, state, chunk_size, static=(), pullback=None):
    """(o [B, T, H, V], final state) of chunk_fn(state, *chunk, *static) -> (state, o_chunk
    [B, H, C, V]) over the chunks of inputs: [B, T, ...] arrays (a chunk is [B, ..., C, ...] with
    C at axis 2, float in the state's dtype, bool stays bool) or None; inputs[2] is v. `static`:
    arrays without a time axis (mesa's lam [H, K]) passed whole to every chunk; their gradient
    sums over the chunks. Padded tokens are zeros, which the callers' recurrences treat as
    identity steps.

    pullback((d_state, d_o_chunk), state, *chunk, *static) -> (the entering state's cotangent,
    [the cotangent of every float among *chunk, *static, in order]) is the chunk's backward;
    None means vjp_pullback(chunk_fn)."""
    T = inputs[0].shape[1]
    size = min(chunk_size, T)
    inputs = tuple(pad_to_chunks(x, size) for x in inputs)
    pullback = vjp_pullback(chunk_fn) if pullback is None else pullback
    o, state = _chunk_scan(chunk_fn, pullback, size, inputs, tuple(static), state)
    return o[:, :T], state


def vjp_pullback(chunk_fn):
    """scan_chunks' pullback of chunk_fn by jax.vjp: the chunk's forward recomputed and
    differentiated by autodiff."""

    def pullback(cotangents, state, *args):
        args = list(args)
        floats = [i for i, x in enumerate(args) if _is_float(x)]

        def run(state, *differentiable):
            for i, x in zip(floats, differentiable, strict=True):
                args[i] = x
            return chunk_fn(state, *args)

        _, vjp = jax.vjp(run, state, *(args[i] for i in floats))
        d_state, *d_floats = vjp(cotangents)
        return d_state, d_floats

    return pullback


def _read(inputs, n, size, dtype):
    """Chunk n of every input: float ones in dtype, bool ones as they are, None stays None."""
    return tuple(
        None if x is None else chunk_of(x, n, size, bool if x.dtype == bool else dtype)
        for x in inputs
    )


def _forward(chunk_fn, size, inputs, static, state):
    """o [B, T, H, V] written in place, the final state and the state entering every chunk."""
    q, v = inputs[0], inputs[2]
    dtype = jax.tree.leaves(state)[0].dtype
    o = jnp.zeros(q.shape[:3] + v.shape[-1:], v.dtype)  # [B, T, H, V]

    def chunk_step(carry, n):
        s, o = carry
        leaving, o_chunk = chunk_fn(s, *_read(inputs, n, size, dtype), *static)
        return (leaving, put_chunk(o, o_chunk, n)), s

    chunks = jnp.arange(q.shape[1] // size)
    (final, o), entering = jax.lax.scan(chunk_step, (state, o), chunks)
    return o, final, entering


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunk_scan(chunk_fn, pullback, size, inputs, static, state):
    o, final, _ = _forward(chunk_fn, size, inputs, static, state)
    return o, final


def _chunk_scan_fwd(chunk_fn, pullback, size, inputs, static, state):
    o, final, entering = _forward(chunk_fn, size, inputs, static, state)
    return (o, final), (inputs, static, entering)


def _is_float(x):
    return x is not None and x.dtype != bool


def _chunk_scan_bwd(chunk_fn, pullback, size, res, cotangents):
    """Backward over the chunks in reverse: each chunk pulled back from the state entering it;
    its input cotangents are written in place."""
    inputs, static, entering = res
    do_all, d_final = cotangents
    dtype = jax.tree.leaves(d_final)[0].dtype
    floats = [i for i, x in enumerate(inputs) if _is_float(x)]

    def chunk_step(carry, xs):
        ds, grads, d_static = carry  # ds: cotangent of the state leaving chunk n
        n, s = xs  # s: the state entering chunk n
        chunk = _read(inputs, n, size, dtype)
        do = chunk_of(do_all, n, size, dtype)
        ds_prev, d_floats = pullback((ds, do), s, *chunk, *static)
        d_chunk, d_static_n = d_floats[: len(floats)], tuple(d_floats[len(floats) :])
        grads = [put_chunk(g, d, n) for g, d in zip(grads, d_chunk, strict=True)]
        d_static = jax.tree.map(jnp.add, d_static, d_static_n)
        return (ds_prev, grads, d_static), None

    grads = [jnp.zeros_like(inputs[i]) for i in floats]
    carry = (d_final, grads, jax.tree.map(jnp.zeros_like, static))
    xs = (jnp.arange(inputs[0].shape[1] // size), entering)
    (d_state, grads, d_static), _ = jax.lax.scan(chunk_step, carry, xs, reverse=True)
    d_inputs = [None] * len(inputs)
    for i, g in zip(floats, grads, strict=True):
        d_inputs[i] = g
    return tuple(d_inputs), d_static, d_state


_chunk_scan.defvjp(_chunk_scan_fwd, _chunk_scan_bwd)
