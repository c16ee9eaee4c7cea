"""The chunk loop of the chunkwise forms whose backward is left to autodiff (oja, momentum_delta,
dplr, mesa, mlstm).

A lax.scan walks the chunks in order, reading each chunk straight out of the [B, T, H, ...]
inputs and writing its outputs in place. A jax.custom_vjp keeps only the state entering every
chunk; the backward walks the chunks in reverse, recomputes each one's forward from its entering
state and pulls it back with jax.vjp, writing the input cotangents in place: the memory pattern
of the hand-derived backwards of _linear_chunk and _delta_chunk, with autodiff inside a chunk.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, N chunks, C chunk size.
"""

import functools

import jax
import jax.numpy as jnp

from fwpzoo.cells._chunking import chunk_of, pad_to_chunks, put_chunk


def scan_chunks(chunk_fn, inputs, state, chunk_size, static=()):
    """(o [B, T, H, V], final state) of chunk_fn(state, *chunk, *static) -> (state, o_chunk
    [B, H, C, V]) over the chunks of inputs: [B, T, ...] arrays (a chunk is [B, ..., C, ...] with
    C at axis 2, float in the state's dtype, bool stays bool) or None; inputs[2] is v. `static`:
    arrays without a time axis (mesa's lam [H, K]) passed whole to every chunk; their gradient
    sums over the chunks. Padded tokens are zeros, which the callers' recurrences treat as
    identity steps."""
    T = inputs[0].shape[1]
    size = min(chunk_size, T)
    inputs = tuple(pad_to_chunks(x, size) for x in inputs)
    o, state = _chunk_scan(chunk_fn, size, inputs, tuple(static), state)
    return o[:, :T], state


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunk_scan(chunk_fn, size, inputs, static, state):
    o, final, _ = _forward(chunk_fn, size, inputs, static, state)
    return o, final


def _chunk_scan_fwd(chunk_fn, size, inputs, static, state):
    o, final, entering = _forward(chunk_fn, size, inputs, static, state)
    return (o, final), (inputs, static, entering)


def _is_float(x):
    return x is not None and x.dtype != bool


def _chunk_scan_bwd(chunk_fn, size, res, cotangents):
    """Backward over the chunks in reverse: each chunk's forward is recomputed from the state
    entering it and pulled back by jax.vjp; its input cotangents are written in place."""
    inputs, static, entering = res
    do_all, d_final = cotangents
    dtype = jax.tree.leaves(d_final)[0].dtype
    floats = [i for i, x in enumerate(inputs) if _is_float(x)]

    def chunk_step(carry, xs):
        ds, grads, d_static = carry  # ds: cotangent of the state leaving chunk n
        n, s = xs  # s: the state entering chunk n
        chunk = list(_read(inputs, n, size, dtype))

        def run(s, static, *differentiable):
            for i, x in zip(floats, differentiable, strict=True):
                chunk[i] = x
            return chunk_fn(s, *chunk, *static)

        _, pullback = jax.vjp(run, s, static, *(chunk[i] for i in floats))
        ds_prev, d_static_n, *d_chunk = pullback((ds, chunk_of(do_all, n, size, dtype)))
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
