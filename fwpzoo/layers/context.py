"""Context parallelism: a layer's sequence split over the mesh's `context` axis, computed exactly.

Active while a mesh with context > 1 is set (jax.set_mesh; the trainer sets the run's mesh around
its steps) and a layer runs its full-sequence form from the start (no cache). Each device holds
T / C tokens of every row; no device holds the whole sequence's activations:

- the cell of an FWP or mamba2 layer (every rule in CELLS): each shard summarises its tokens
  from the zero state (fwpzoo.cells.chunked.summary: the span's transition and contribution),
  the summaries are all-gathered once over `context` ([C, B, H, ...], state-sized), each shard
  folds those before it into the state entering its span and runs its form from that state;
- the diagonal SSM's recurrence: the same, its span's summary (the product of its decays, the
  state it leaves from zero) in the form of gated_linear_attn's per-key decay;
- the short convolution (FWP and mamba2 layers): each shard receives the (conv_size - 1)-token
  tail of the previous shard (one collective permute) and convolves its tokens after it.

The derivation (why all three are exact, resets included) is in context.md beside this file.
Every other layer under the same mesh (attention, the MLP, norms, projections) is left to jit's
partitioner, which is exact for any sharding; attention gathers keys and values over `context`.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from fwpzoo import cells
from fwpzoo.cells import _spec
from fwpzoo.cells.chunked import summary
from fwpzoo.cells.chunked.precision import matmul_precision

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


def run_cell(
    cell: str,
    chunk_size: int,
    local_form,
    q,
    k,
    v,
    gates: dict,
    reset=None,
    local_summary=None,
    precision="default",
):
    """The cell's outputs over a sequence split over `context`, from the zero state.

    local_form(q, k, v, state, gates, reset) -> (o, final state) runs the layer's configured form
    on one shard's tokens; chunk_size is the summaries' chunk (any chunk is exact; the layer's
    keeps the rounding of an unsplit run's). q [B, T, H, K], k [B, T, H, (N,) K],
    v [B, T, H, (N,) V], gates per-token [B, T, H, ...] or static [H, ...], reset [B, T] or None
    -> (o [B, T, H, V], the state after the last token [B, H, ...]). local_summary(k, v, gates,
    reset) -> Summary of one shard's span, where the layer maps its inputs before the form
    (mamba2's signed decay); by default the cell's own (summary.summarize). precision: the
    layer's model.matmul_precision, which local_form applies to its own chunk matmuls
    (cells/forms.run_form) and the summaries take too.
    """
    mesh = context_mesh()
    module = cells.get(cell)
    static = {gate.name for gate in module.GATE_SPECS if gate.shape == _spec.STATIC}
    batch, heads = _batch(mesh), _tensor(mesh)
    token_spec = P(batch, AXIS, heads)  # [B, T, H, ...]: heads over tensor
    gate_specs = {name: P(heads) if name in static else token_spec for name in gates}
    reset_spec = None if reset is None else P(batch, AXIS)

    def summarize(q, k, v, gates, reset):
        # a summary is a run of the cell's chunk engine: its products at the layer's precision,
        # as local_form's (the scope is read when the engine is traced)
        with matmul_precision(precision):
            if local_summary is not None:
                return local_summary(k, v, gates, reset), None
            mine = summary.summarize(module, k, v, reset=reset, chunk_size=chunk_size, **gates)
            return mine, None

    def run(start, _, q, k, v, gates, reset):
        return local_form(q, k, v, start, gates, reset)[0]

    inputs = (q, k, v, gates, reset)
    specs = (token_spec, token_spec, token_spec, gate_specs, reset_spec)
    return split(module, summarize, run, inputs, specs, token_spec, P(batch, heads))


def run_diagonal(scan, a, b):
    """h_t = a_t h_{t-1} + b_t (elementwise, real or complex) over a sequence split over
    `context`, from h_0 = 0: a, b [B, T, N] -> (h [B, T, N], h_T [B, N]).

    scan(a, b) -> (A, h) [B, T, N] runs one shard's span from zero: A_t = a_1 ... a_t, h its
    states. The span's summary is the per-key decay summary of gated_linear_attn with one head,
    K = N and V = 1: transition f = A_L [B, 1, N], contribution X = h_L [B, 1, N, 1]; its states
    from the true entering state h_0 are h_t + A_t h_0 (context.md).
    """
    mesh = context_mesh()
    batch = _batch(mesh)
    spec = P(batch, AXIS)  # [B, T, N]: N whole on every device

    def summarize(a, b):
        A, h = scan(a, b)  # [B, T, N] each
        return summary.Summary(A[:, -1, None], h[:, -1, None, :, None]), (A, h)

    def run(start, carried, a, b):
        A, h = carried
        return h + A * start[:, None, 0, :, 0]  # [B, T, N]

    rule = cells.get("gated_linear_attn")
    h, final = split(rule, summarize, run, (a, b), (spec, spec), spec, P(batch))
    return h, final[:, 0, :, 0]


def split(rule, summarize, run, inputs, in_specs, out_spec, state_spec):
    """The shared machinery of the sequence split over `context`: on each shard (shard_map),
    summarize(*inputs) -> (its span's Summary of `rule` [B, H, ...] from the zero state, what
    run reuses); the summaries all-gathered ([C, B, H, ...], the one collective) and folded from
    the zero state; run(the state entering the span, reused, *inputs) -> the span's outputs.
    -> (outputs, the state after the last token)."""
    mesh = context_mesh()

    def local(*inputs):
        mine, carried = summarize(*inputs)
        every = jax.lax.all_gather(mine, AXIS)  # [C, B, H, ...]
        zero = jax.tree.map(jnp.zeros_like, mine.contribution)  # every rule's zero state
        entering, final = summary.fold(rule, every, zero)
        start = jax.tree.map(lambda s: s[jax.lax.axis_index(AXIS)], entering)
        return run(start, carried, *inputs), final

    run_split = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(out_spec, state_spec),
        check_vma=False,
    )
    return run_split(*inputs)


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
