"""Rules of the chunk engine whose chunk backward is autodiff (oja, momentum_delta, mesa, mlstm,
and dplr's chunks of strong decay): the rule writes its forward stages, the engine's backward
stages come from jax.vjp of them, still in the engine's three stages.

A rule's `math` supplies

    prepare(inputs, reset, factored, fused) -> a chunk batch [G B, ...] with
        .step              each chunk's transition and write, in whatever factored form
        .outputs(s, aux)   the outputs [G B, H, C, V] from the entering states s
    advance(step, s) -> (leaving, aux)   one chunk's state step (state-sized work only)
    flags(inputs, size) -> [N] bool or None   (engine.Rule.flags)

and gets an engine.Rule whose backward is, per block:

    pull       R_n = (d outputs / d s)^T dO at the entering state (vjp of outputs o advance)
    retreat    dS_n = (d advance / d s)^T dS_{n+1} + R_n, at the entering state: the vjp of
               the state step alone, state-sized like the step itself
    pullback   the input cotangents: the vjp of (prepare, advance, outputs) with respect to
               the block's inputs, from the entering state, (dS_leaving, dO) pulled back

The linearisation point is the entering state (engine.Rule.pull_reads_state): for an affine
rule it does not matter, for the mLSTM, whose scale is a max, it does. XLA drops the primal
values these vjps recompute but do not use, and merges the prepare stage the pullback retraces
with the one the block already computed (common subexpressions of the same block).

Dimension letters: G chunks per block, B batch, H heads, C chunk size, V value dim.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from fwpzoo.cells.chunked import engine
from fwpzoo.cells.chunked.chunking import pad_to_chunks


@dataclass(frozen=True)
class Math:
    """A rule's forward stages, as the module docstring says."""

    prepare: Any
    advance: Any
    flags: Any = lambda inputs, size: None


class _Chunks:
    """The engine's chunk batch for a Math: its forward as the rule's, its backward by vjp."""

    def __init__(self, math, inputs, reset, factored, fused):
        self.math, self.inputs, self.reset = math, inputs, reset
        self.factored, self.fused = factored, fused
        self.chunks = math.prepare(inputs, reset, factored, fused)
        self.step = self.chunks.step

    def outputs(self, s, aux=None):
        return self.chunks.outputs(s, aux)

    def pull(self, do, s):
        """(R_n, s): the outputs' cotangent on the entering state s, and s for retreat."""

        def read(s):
            _, aux = self.math.advance(self.step, s)
            return self.chunks.outputs(s, aux)

        _, vjp = jax.vjp(read, s)
        (r,) = vjp(do)
        return r, s

    def pullback(self, s, ds, do):
        """The cotangents of the present inputs [G B, H, C, ...] from the entering states s,
        the leaving states' cotangents ds and the outputs' do."""
        present = [i for i, x in enumerate(self.inputs) if x is not None]

        def run(*xs):
            inputs = list(self.inputs)
            for i, x in zip(present, xs, strict=True):
                inputs[i] = x
            chunks = self.math.prepare(tuple(inputs), self.reset, self.factored, self.fused)
            leaving, aux = self.math.advance(chunks.step, s)
            return leaving, chunks.outputs(s, aux)

        _, vjp = jax.vjp(run, *(self.inputs[i] for i in present))
        return list(vjp((ds, do)))


def retreat_by_vjp(advance):
    """retreat(step, dS, (R, s)): the state step's transpose at the entering state s, plus R."""

    def retreat(step, ds, pulled):
        r, s = pulled
        _, vjp = jax.vjp(lambda s: advance(step, s)[0], s)
        (d_entering,) = vjp(ds)
        return jax.tree.map(lambda a, b: a + b, d_entering, r)

    return retreat


def rule(math: Math) -> engine.Rule:
    """The engine.Rule of a Math (build it once per module: the engine's compiled functions are
    keyed on it)."""
    return engine.Rule(
        prepare=lambda inputs, reset, factored, fused: _Chunks(
            math, inputs, reset, factored, fused
        ),
        advance=math.advance,
        retreat=retreat_by_vjp(math.advance),
        flags=math.flags,
        pull_reads_state=True,
    )


def run(rule, inputs, reset, state, chunk_size, block=None, fill=None):
    """(o [B, T, H, V], final state) of an engine rule over inputs [B, T, H, ...] (or None)
    and reset [B, T] bool (or None), padded to whole blocks and cut back to T. A padded token
    must be an identity step: zeros are for every rule here, except for the inputs `fill` names
    (a tuple beside inputs, None for zero; mesa's lam pads with 1, the mLSTM's log_i with -inf)."""
    T = inputs[0].shape[1]
    size = min(chunk_size, T)
    block = block or engine.default_block(-(-T // size))
    fill = fill or (None,) * len(inputs)
    inputs = tuple(_padded(x, size * block, value) for x, value in zip(inputs, fill, strict=True))
    reset = pad_to_chunks(reset, size * block)
    o, state = engine.run_chunks(rule, inputs, reset, state, size, block)
    return o[:, :T], state


def _padded(x, size, value):
    """x [B, T, ...] padded along T to a multiple of size with value (None: zeros)."""
    if x is None or value is None or x.shape[1] % size == 0:
        return pad_to_chunks(x, size)
    widths = [(0, 0), (0, size - x.shape[1] % size)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)
