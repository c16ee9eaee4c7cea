"""The chunk engine: a chunkwise form in three stages, forward and backward.

A rule's chunk (its own module) is a batch of chunks, computed from their inputs alone:

    prepare   everything inside the chunks, batched over every chunk of a block: decays, score
              matrices, triangular inverses, and each chunk's summary, its transition M_n and
              its write X_n (cells/chunked/summary.py: S_leaving = M_n S_entering + X_n), in the
              rule's factored form (the delta rule's M_n = e^{g_C} I - K_C^T W is kept as W and
              K_C, [C, K] each)
    scan      the states entering every chunk, S_{n+1} = M_n S_n + X_n: the loop body holds
              only state-sized work and products of [C, K] rows with the state (no [C, C]
              matrix, no inverse)
    outputs   every chunk's outputs from its entering state, batched again

and the backward runs the same three stages: the chunks prepared again, the state's cotangent
scanned in reverse (dS_n = M_n^T dS_{n+1} + R_n with R_n the outputs' pull on the entering
state), then every chunk's input cotangents, batched, from its entering state and the cotangent
of its leaving state. A jax.custom_vjp keeps only the entering states between the passes.

Chunks are taken `block` at a time: an outer scan walks the blocks, each one prepared and
finished as one batch. block = all chunks (one block, no outer loop) is the layout an
accelerator wants: T / C chunks in parallel, a sequential loop of state-sized steps. On a CPU,
where XLA runs each device's work on one thread, a block of one chunk keeps every intermediate
in cache: computing all chunks at once measured 1.5-5x slower there (linear_attention.md,
section 7), so `block=None` means one chunk per block on the CPU and all chunks elsewhere: on the
platform of the default backend, or the one named by `compiling_for` (ahead-of-time compiles for
a TPU from a CPU host trace on the host, `fwpzoo bench cells --topology`).

Precision (precision.py): the inputs are laid out in float32 and the state is carried in
float32; the stages' products go through precision.chunk_matmul (operands rounded to the
inputs' dtype, bfloat16 under train.compute_dtype=bfloat16, accumulated in float32) and the scan's
through precision.state_matmul (float32), both at the precision of model.matmul_precision, which
run_chunks reads when it is traced and hands to the backward as a static argument.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, C chunk size, G chunks
per block, N chunks.
"""

import contextlib
import contextvars
import functools
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fwpzoo.cells.chunked import precision
from fwpzoo.cells.chunked.chunking import by_flag

_PLATFORM = contextvars.ContextVar("fwpzoo_chunk_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Within it, chunkwise forms traced take the layout of `platform` ("cpu", "tpu", "gpu")
    instead of the default backend's."""
    token = _PLATFORM.set(platform)
    try:
        yield
    finally:
        _PLATFORM.reset(token)


def default_block(chunks: int) -> int:
    """Chunks per block: 1 on the CPU (cache-resident chunks), all of them on an accelerator."""
    platform = _PLATFORM.get() or jax.default_backend()
    return 1 if platform == "cpu" else chunks


@dataclass(frozen=True)
class Rule:
    """What the engine needs from a rule (all functions of one block of chunks, [G B, ...]):

    prepare(inputs, reset, factored, fused) -> a chunk batch with
        .step         a pytree [G B, ...]: each chunk's transition and write (factored)
        .outputs(entering, aux) -> [G B, H, C, V] from the entering states [G B, H, K, V]
        .pull(do) -> a pytree [G B, ...]: what the outputs' cotangent adds to the entering
            state's (R_n), in a form retreat takes
        .pullback(entering, d_leaving, do) -> [the input cotangents, laid out as the inputs'
            blocks [G B, H, C, ...]], without the entering state's (the scan supplies it)
    advance(step, S) -> (M S + X, aux) for one chunk's step [B, ...]; aux (None, or what the
        outputs reuse, e.g. the delta rule's pseudo-values) is stacked over the block's chunks;
    retreat(step, dS, pulled) -> M^T dS + R_n.
    pull_reads_state: pull(do, entering) is called instead, with the block's entering states
        [G B, ...], for a rule whose cotangent step reads the state it left from (the mLSTM's
        max-stabilised scale is not linear in the state; the rules differentiated by autodiff,
        chunked/autodiff.py, linearise there).
    fused (a block of one chunk) tells prepare that its steps run in the block's own loop body,
    beside its [C, C] work: the step may then use the chunk's matrices as they are instead of
    the state-sized factors (the delta rule's U = T diag(beta) (V - K S_0) costs one [C, C]
    product where U' - W S_0 needs W = T diag(beta) K first, a [C, C] x [C, K] product more).

    inputs: [B, T, H, ...] arrays or None, each block laid out by lay_out (the pullback's
    cotangents laid back by lay_back); flags(inputs, size) -> [N] bool per chunk or None (the
    `factored` branch, by_flag: a block takes the factored branch when all its chunks may)."""

    prepare: Callable
    advance: Callable
    retreat: Callable
    flags: Callable
    pull_reads_state: bool = False


def lay_out(x, b, size, block, dtype):
    """Chunks b G .. b G + G - 1 of x [B, T, H, ...] as [G B, H, C, ...] in dtype (chunk-major);
    None stays None. With G = 1 this is a slice and a transpose, as a per-chunk loop reads."""
    if x is None:
        return None
    width = size * block
    x = jax.lax.dynamic_slice_in_dim(x, b * width, width, axis=1)  # [B, G C, H, ...]
    x = x.reshape(x.shape[0], block, size, *x.shape[2:])  # [B, G, C, H, ...]
    x = jnp.swapaxes(jnp.moveaxis(x, 1, 0), 2, 3)  # [G, B, H, C, ...]
    return x.reshape(-1, *x.shape[2:]).astype(dtype)  # [G B, H, C, ...]


def lay_back(buffer, x, b):
    """buffer [B, T, H, ...] with the block b of chunks replaced by x [G B, H, C, ...]."""
    B = buffer.shape[0]
    x = x.reshape(-1, B, *x.shape[1:])  # [G, B, H, C, ...]
    x = jnp.moveaxis(jnp.swapaxes(x, 2, 3), 0, 1)  # [B, G, C, H, ...]
    x = x.reshape(B, -1, *x.shape[3:]).astype(buffer.dtype)  # [B, G C, H, ...]
    return jax.lax.dynamic_update_slice_in_dim(buffer, x, b * x.shape[1], axis=1)


def reset_rows(reset):
    """reset [B, T] as [B, T, 1], so that a block of it is [G B, 1, C] (one row for all heads)."""
    return None if reset is None else reset[:, :, None]


def _by_chunk(tree, block):
    """[G B, ...] leaves as [G, B, ...], to scan over the chunks of a block."""
    return jax.tree.map(lambda x: x.reshape(block, -1, *x.shape[1:]), tree)


def _flat(tree):
    """[G, B, ...] -> [G B, ...] on every leaf (a rule's state may be a dict of arrays)."""
    return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), tree)


def _state_scan(rule, steps, state, block):
    """(entering [G, B, H, K, V], aux [G, ...], leaving) of S_{n+1} = M_n S_n + X_n over one
    block, from the chunks' steps [G B, ...]."""

    def step(s, m):
        leaving, aux = rule.advance(m, s)
        return leaving, (s, aux)

    xs = _by_chunk(steps, block)
    if block == 1:  # one chunk: no loop inside the blocks' loop
        leaving, ys = step(state, jax.tree.map(lambda x: x[0], xs))
        entering, aux = jax.tree.map(lambda y: y[None], ys)
        return entering, aux, leaving
    leaving, (entering, aux) = jax.lax.scan(step, state, xs)
    return entering, aux, leaving


def _cotangent_scan(rule, chunks, d_state, pulls, block):
    """(d_leaving [G, B, H, K, V], d_entering the block) of dS_n = M_n^T dS_{n+1} + R_n, the
    chunks of one block in reverse; d_state is the cotangent of the state leaving the block,
    pulls each chunk's R_n in the rule's form."""

    def step(ds, xs):
        m, pulled = xs
        return rule.retreat(m, ds, pulled), ds

    xs = _by_chunk((chunks.step, pulls), block)
    if block == 1:
        d_entering, d_leaving = step(d_state, jax.tree.map(lambda x: x[0], xs))
        return jax.tree.map(lambda x: x[None], d_leaving), d_entering
    d_entering, d_leaving = jax.lax.scan(step, d_state, xs, reverse=True)
    return d_leaving, d_entering


def _block_flags(rule, inputs, size, block):
    flags = rule.flags(inputs, size)
    return None if flags is None else jnp.all(flags.reshape(-1, block), axis=1)


def _reads(inputs, reset, b, size, block, dtype):
    chunk = tuple(lay_out(x, b, size, block, dtype) for x in inputs)
    return chunk, lay_out(reset_rows(reset), b, size, block, bool)


def _forward(rule, inputs, reset, state, out, size, block):
    """out: the zero outputs [B, T, H, V]. Returns (o, final state, entering [N/G, G, B, ...])."""
    flags = _block_flags(rule, inputs, size, block)
    dtype = jax.tree.leaves(state)[0].dtype

    def block_step(carry, b):
        s, o = carry
        chunk, r = _reads(inputs, reset, b, size, block, dtype)

        def run(factored):
            chunks = rule.prepare(chunk, r, factored, block == 1)
            # read outside the scan's scope: a rule may prepare its chunks when the step is asked
            # for (chunked/autodiff.py), and that work belongs to the prepare stage
            steps = chunks.step
            with jax.named_scope("state_scan"):  # named for profiles and the dtype test
                entering, aux, leaving = _state_scan(rule, steps, s, block)
            o_block = chunks.outputs(_flat(entering), jax.tree.map(_flat, aux))
            return leaving, o_block, entering

        leaving, o_block, entering = by_flag(flags, b, run)
        return (leaving, lay_back(o, o_block, b)), entering

    blocks = jnp.arange(out.shape[1] // (size * block))
    (final, o), entering = jax.lax.scan(block_step, (state, out), blocks)
    return o, final, entering


def _backward(rule, inputs, reset, entering, cotangents, size, block):
    """(input cotangents [B, T, ...] for every input that is not None, d initial state)."""
    do_all, d_final = cotangents
    flags = _block_flags(rule, inputs, size, block)
    dtype = jax.tree.leaves(d_final)[0].dtype
    present = [i for i, x in enumerate(inputs) if x is not None]

    def block_step(carry, xs):
        ds, grads = carry  # ds: cotangent of the state leaving block b
        b, s = xs  # s: the states entering the block's chunks [G, B, H, K, V]
        chunk, r = _reads(inputs, reset, b, size, block, dtype)
        do = lay_out(do_all, b, size, block, dtype)  # [G B, H, C, V]

        def run(factored):
            chunks = rule.prepare(chunk, r, factored, block == 1)
            pulls = chunks.pull(do, _flat(s)) if rule.pull_reads_state else chunks.pull(do)
            with jax.named_scope("state_scan"):
                d_leaving, d_entering = _cotangent_scan(rule, chunks, ds, pulls, block)
            return d_entering, chunks.pullback(_flat(s), _flat(d_leaving), do)

        ds_prev, chunk_grads = by_flag(flags, b, run)
        grads = [lay_back(g, x, b) for g, x in zip(grads, chunk_grads, strict=True)]
        return (ds_prev, grads), None

    grads = [jnp.zeros(inputs[i].shape, inputs[i].dtype) for i in present]
    xs = (jnp.arange(do_all.shape[1] // (size * block)), entering)
    (d_state, grads), _ = jax.lax.scan(block_step, (d_final, grads), xs, reverse=True)
    d_inputs = [None] * len(inputs)
    for i, g in zip(present, grads, strict=True):
        d_inputs[i] = g
    return d_inputs, d_state


def run_chunks(rule, inputs, reset, state, size, block):
    """(o [B, T, H, V] in v's dtype, final state) of the rule over inputs (a tuple of [B, T, H,
    ...] arrays or None; inputs[0] is q, inputs[1] k, inputs[2] v), T a multiple of size * block;
    the chunk matmuls in q, k and v's dtype at the precision of the enclosing
    precision.matmul_precision scope (precision.py)."""
    policy = precision.policy_for(*inputs[:3])
    return _run_chunks(rule, inputs, reset, state, size, block, policy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 4, 5, 6))
def _run_chunks(rule, inputs, reset, state, size, block, policy):
    with precision.active(policy):
        o, final, _ = _forward(rule, inputs, reset, state, _zero_outputs(inputs), size, block)
    return o, final


def _zero_outputs(inputs):
    q, v = inputs[0], inputs[2]
    return jnp.zeros(q.shape[:3] + v.shape[-1:], v.dtype)  # [B, T, H, V]


def _run_chunks_fwd(rule, inputs, reset, state, size, block, policy):
    with precision.active(policy):
        zeros = _zero_outputs(inputs)
        o, final, entering = _forward(rule, inputs, reset, state, zeros, size, block)
    return (o, final), (inputs, reset, entering)


def _run_chunks_bwd(rule, size, block, policy, res, cotangents):
    inputs, reset, entering = res
    with precision.active(policy):  # the backward is traced after the forward's scope closed
        d_inputs, d_state = _backward(rule, inputs, reset, entering, cotangents, size, block)
    return tuple(d_inputs), None, d_state  # reset: no cotangent


_run_chunks.defvjp(_run_chunks_fwd, _run_chunks_bwd)
