"""Context parallelism: a layer's sequence split over the mesh's `context` axis, computed exactly.

Active while a mesh with context > 1 is set (jax.set_mesh; the trainer sets the run's mesh around
its steps) and a layer runs its full-sequence form from the start (no cache). Each device holds
T / C tokens of every row; no device holds the whole sequence's activations:

- the cell of an FWP layer (every rule in CELLS): each shard summarises its tokens from the zero
  state (fwpzoo.cells.chunked.summary: the span's transition and contribution), the summaries
  are all-gathered once over `context` ([C, B, H, ...], state-sized), each shard folds those
  before it into the state entering its span and runs its form from that state;
- the short convolution: each shard receives the (conv_size - 1)-token tail of the previous
  shard (one collective permute) and convolves its tokens after it.

The derivation (why both are exact, resets included) is in context.md beside this file. Every
other layer under the same mesh (attention, the MLP, norms, mamba2, ssm) is left to jit's
partitioner, which is exact for any sharding; attention gathers keys and values over `context`.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from fwpzoo import cells
from fwpzoo.cells import _spec
from fwpzoo.cells._reference import state_dtype
from fwpzoo.cells.chunked import summary

AXIS = "context"
BATCH_AXES = ("data", "fsdp")  # as fwpzoo.train.sharding: the batch over both


def context_mesh():
    """The mesh in context when its `context` axis splits the sequence (size > 1), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or dict(mesh.shape).get(AXIS, 1) == 1:
        return None
    return mesh


def _batch(mesh):
    return tuple(name for name in BATCH_AXES if name in mesh.axis_names)


def _tensor(mesh):
    return "tensor" if "tensor" in mesh.axis_names else None


def run_cell(cell: str, chunk_size: int, local_form, q, k, v, gates: dict, reset=None):
    """The cell's outputs over a sequence split over `context`, from the zero state.

    local_form(q, k, v, state, gates, reset) -> (o, final state) runs the layer's configured form
    on one shard's tokens; chunk_size is the summaries' chunk (any chunk is exact; the layer's
    keeps the rounding of an unsplit run's). q [B, T, H, K], k [B, T, H, (N,) K],
    v [B, T, H, (N,) V], gates per-token [B, T, H, ...] or static [H, ...], reset [B, T] or None
    -> (o [B, T, H, V], the state after the last token [B, H, ...]).
    """
    mesh = context_mesh()
    module = cells.get(cell)
    static = {gate.name for gate in module.GATE_SPECS if gate.shape == _spec.STATIC}
    batch, heads = _batch(mesh), _tensor(mesh)
    token_spec = P(batch, AXIS, heads)  # [B, T, H, ...]: heads over tensor
    gate_specs = {name: P(heads) if name in static else token_spec for name in gates}
    state_spec = P(batch, heads)  # [B, H, ...] on every context shard alike

    def local(q, k, v, gates, reset):
        # this shard's span from the zero state: its summary (transition, contribution)
        mine = summary.summarize(module, k, v, reset=reset, chunk_size=chunk_size, **gates)
        every = jax.lax.all_gather(mine, AXIS)  # [C, B, H, ...]: the one collective
        B, _, H = q.shape[:3]
        zero = module.OBJECTIVE.state.zeros(B, H, q.shape[-1], v.shape[-1], state_dtype(k, v))
        entering, final = summary.fold(module, every, zero)
        start = jax.tree.map(lambda s: s[jax.lax.axis_index(AXIS)], entering)
        o, _ = local_form(q, k, v, start, gates, reset)
        return o, final

    reset_spec = None if reset is None else P(batch, AXIS)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, gate_specs, reset_spec),
        out_specs=(token_spec, state_spec),
        check_vma=False,
    )
    return run(q, k, v, gates, reset)


def short_conv(conv, x, buffer=None, reset=None):
    """conv(x, buffer, reset) (a ShortConv) with the sequence of x [B, T, C] split over
    `context` when a context mesh is set and the layer starts from the beginning (buffer None):
    each shard's buffer is the tail the previous shard leaves -> (y [B, T, C], next buffer)."""
    mesh = context_mesh()
    if mesh is None or buffer is not None:
        return conv(x, buffer, reset)
    graphdef, params = nnx.split(conv)
    shards = dict(mesh.shape)[AXIS]
    previous = [(j, j + 1) for j in range(shards - 1)]  # shard 0 receives zeros: no tokens before

    def local(params, x, reset):
        piece = nnx.merge(graphdef, params)
        # the tail a piece leaves depends only on its own tokens (T / C >= conv_size - 1) and
        # is already zero before its last reset
        _, tail = piece(x, None, reset)  # [B, W - 1, C]
        halo = jax.lax.ppermute(tail, AXIS, previous)
        y, _ = piece(x, halo, reset)
        last = jax.lax.axis_index(AXIS) == shards - 1
        return y, jax.lax.psum(jnp.where(last, tail, jnp.zeros_like(tail)), AXIS)

    batch = _batch(mesh)
    reset_spec = None if reset is None else P(batch, AXIS)
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(batch, AXIS), reset_spec),
        out_specs=(P(batch, AXIS), P(batch)),
        check_vma=False,
    )
    return run(params, x, reset)
