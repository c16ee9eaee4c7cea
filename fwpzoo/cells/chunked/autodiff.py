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

    pull       R_n = (d outputs / d s)^T dO at the entering state: one jax.vjp of the whole
               chunk (prepare, advance, outputs) with respect to the entering state and the
               block's inputs, pulled back with (0, dO); the step's factors come out of the
               same linearisation
    retreat    dS_n = (d advance / d s)^T dS_{n+1} + R_n, at the entering state: the vjp of
               the state step alone, state-sized like the step itself
    pullback   the input cotangents: that vjp again, pulled back with (dS_leaving, dO)

The linearisation point is the entering state (engine.Rule.pull_reads_state): for an affine
rule it does not matter, for the mLSTM, whose scale is a max, it does. XLA drops what the
first pullback computes for the inputs. The price of the split against one pullback per chunk
(the per-chunk scan these rules ran on before, chunked/remat.py): the outputs' cotangent goes
back through the chunk twice, once to the entering state before the scan, once with the leaving
state's to the inputs after it (docs/benchmarks/engine_cpu2.md).

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
    """The engine's chunk batch for a Math: its forward as the rule's, its backward by vjp.

    The backward prepares the chunks once, inside jax.vjp of the whole chunk (the state step's
    factors come out of it as an auxiliary result), and pulls back through that one
    linearisation twice: the outputs' cotangent alone onto the entering state before the state
    scan (pull), both cotangents onto the inputs after it (pullback). (Splitting the vjp at the
    prepared fields, so that prepare's pullback runs once on the summed cotangents, measured
    1.4x slower for oja on the CPU: XLA did not drop the zero cotangents it then carries.)"""

    def __init__(self, math, inputs, reset, factored, fused):
        self.math, self.inputs, self.reset = math, inputs, reset
        self.factored, self.fused = factored, fused
        self._prepared = self._step = self._vjp = None

    @property
    def chunks(self):
        if self._prepared is None:
            self._prepared = self.math.prepare(self.inputs, self.reset, self.factored, self.fused)
        return self._prepared

    @property
    def step(self):
        return self.chunks.step if self._step is None else self._step

    def outputs(self, s, aux=None):
        return self.chunks.outputs(s, aux)

    def pull(self, do, s):
        """(R_n, s): the outputs' cotangent on the entering state s, and s for retreat."""
        present = [x for x in self.inputs if x is not None]

        def run(s, *present):
            given, inputs = iter(present), []
            for x in self.inputs:
                inputs.append(None if x is None else next(given))
            chunks = self.math.prepare(tuple(inputs), self.reset, self.factored, self.fused)
            leaving, aux = self.math.advance(chunks.step, s)
            return (leaving, chunks.outputs(s, aux)), chunks.step

        (leaving, _), self._vjp, self._step = jax.vjp(run, s, *present, has_aux=True)
        r, *_ = self._vjp((jax.tree.map(jnp.zeros_like, leaving), do))  # the inputs' part: unused
        return r, s

    def pullback(self, s, ds, do):
        """The cotangents of the present inputs [G B, H, C, ...] from the entering states s (the
        ones pull linearised at), the leaving states' cotangents ds and the outputs' do."""
        _, *grads = self._vjp((ds, do))
        return grads


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
