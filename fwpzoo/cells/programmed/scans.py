"""Scans for the cells whose programmer reads its own past (recurrent_delta, srwm).

Their update depends on the previous output, so the only forward is a scan over tokens. A cell
here is a pure one-token function

    core(params, state, x) -> (state, out, write)

params: the slow weights used inside the scan (a pytree); state: the fast state (a pytree of
[B, ...] arrays); x: one token's inputs (a pytree of [B, ...]); write: the rank-one factors of
the update, which `undo(state, write)` subtracts to recover the previous state.

Three scans of a core over xs [T, B, ...] (time major), each -> (outs [T, B, ...], final state):
  plain         lax.scan; autodiff keeps every state for the backward (T states per head)
  checkpointed  keeps only the state entering each chunk of C tokens; the backward reruns one
                chunk at a time (T / C + C states live)
  reversible    keeps per token only the write's factors; the backward walks the tokens in
                reverse, recovering S_{t-1} = S_t - a_t b_t^T (a subtraction: nothing is
                inverted) and taking one step's vjp at a time (one state live)
"""

import functools

import jax
import jax.numpy as jnp


def plain(core, params, state, xs):
    def body(s, x):
        s, out, _ = core(params, s, x)
        return s, out

    state, outs = jax.lax.scan(body, state, xs)
    return outs, state


def checkpointed(core, params, state, xs, chunk_size):
    """`plain` with the backward recomputing each chunk of chunk_size tokens from its entering
    state; any T (the tail after the last whole chunk is one more, shorter, chunk)."""
    T = jax.tree.leaves(xs)[0].shape[0]
    whole = T // chunk_size * chunk_size

    @jax.checkpoint  # the backward keeps only the chunk's entering state and reruns the chunk
    def chunk(state, xs_chunk):
        outs, state = plain(core, params, state, xs_chunk)
        return state, outs

    def to_chunks(x):  # [T, ...] -> [N, C, ...]
        return x[:whole].reshape(whole // chunk_size, chunk_size, *x.shape[1:])

    state, outs = jax.lax.scan(chunk, state, jax.tree.map(to_chunks, xs))
    outs = jax.tree.map(lambda o: o.reshape(whole, *o.shape[2:]), outs)  # [N C, ...]
    if whole < T:
        state, tail = chunk(state, jax.tree.map(lambda x: x[whole:], xs))
        outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), outs, tail)
    return outs, state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def reversible(core, undo, params, state, xs):
    """`plain` with a backward that recovers each state from the next one by `undo`."""
    del undo
    return plain(core, params, state, xs)


def _reversible_fwd(core, undo, params, state, xs):
    del undo

    def body(s, x):
        s, out, write = core(params, s, x)
        return s, (out, write)

    final, (outs, writes) = jax.lax.scan(body, state, xs)
    return (outs, final), (params, final, xs, writes)


def _reversible_bwd(core, undo, residuals, cotangents):
    params, final, xs, writes = residuals
    d_outs, d_final = cotangents

    def body(carry, token):
        state, d_state, d_params = carry
        x, write, d_out = token
        previous = undo(state, write)
        one_step = lambda p, s, x: core(p, s, x)[:2]  # noqa: E731
        _, vjp = jax.vjp(one_step, params, previous, x)
        dp, ds, dx = vjp((d_state, d_out))
        return (previous, ds, jax.tree.map(jnp.add, d_params, dp)), dx

    zeros = jax.tree.map(jnp.zeros_like, params)
    carry = (final, d_final, zeros)
    (_, d_state, d_params), d_xs = jax.lax.scan(body, carry, (xs, writes, d_outs), reverse=True)
    return d_params, d_state, d_xs


reversible.defvjp(_reversible_fwd, _reversible_bwd)


def time_major(x):
    """[B, T, ...] -> [T, B, ...]; None stays None."""
    return None if x is None else jnp.moveaxis(x, 1, 0)


def batch_major(x):
    """[T, B, ...] -> [B, T, ...]."""
    return jnp.moveaxis(x, 0, 1)
