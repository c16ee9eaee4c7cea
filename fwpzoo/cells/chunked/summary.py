"""Chunk summaries: what a span of tokens does to the state it starts from.

Every rule in CELLS is affine in its state over any span of tokens (one chunk or many):

    S_end = A(S_start) + X

with the transition A depending only on the span's keys and gates, and the contribution X the
state the span leaves when it starts from nothing. A Summary holds (A, X); summaries of
consecutive spans compose by the rule's associative combine, so the state entering any span
follows from the summaries before it. Context parallelism (LASP-2, Sun et al. 2025) is this: each
shard summarises its span, the summaries are gathered, each shard folds the ones before it.

The transition's form is the rule's own (its OBJECTIVE.state.transition, _spec.TRANSITIONS):

    LEFT       A(S) = M S, M [B, H, R, R] acting on the rows of the state's parts stacked in
               order (R = K; 2K for momentum_delta's [S; M])
    RIGHT      A(S) = S M, M [B, H, V, V] (Oja's rule: the rows of S evolve apart)
    DECAY      A(S) = f S, f [B, H, K] (per-key decay) or [B, H, 1], on every part of the state
               (linear_attn: f = 1; mesa: H^kk and H^kv alike)
    LOG_SCALE  mLSTM: F [B, H] the span's summed log forget gate; (C, n) scale by e^{F + m - m'}
               and the log scale m' = max(F + m, m_X) (below)

A reset anywhere in the span makes A zero (DECAY f = 0, LOG_SCALE F = -inf) and X the state
after the span's last reset, whatever the span started from. Summaries, their combine and their
fold stay float32 (float64 for float64 inputs); the combine's and the fold's products are at
HIGHEST precision on every platform (an accelerator's default rounds float32 operands to
bfloat16 passes), state-sized and few.

Computed with the rule's own chunkwise form (the chunk engine), at about the cost of one pass:
X is the final state of a run from the zero state, and M the final state of a run from the
identity with no writes. Both come from one run on a widened state: LEFT widens S [R, V] to
[I_R | 0] [R, R + V] with values [0 | v] (the columns of a LEFT rule's state evolve apart, so
the first R columns end as M and the last V as X); RIGHT widens the rows, [I_V; 0] [V + K, V]
with keys [0, k].

The mLSTM is not affine in (C, n, m) as stored: its stabiliser m_t = max(log_f_t + m_{t-1},
log_i_t) is a max. The unstabilised memory e^m (C, n) is affine with the scalar decay e^F, and m
itself composes in the max-plus semiring, so the mLSTM's summary carries X = (C_X, n_X, m_X),
the state the span leaves from the empty memory (m = -inf: nothing written yet), and applies it
as m' = max(F + m, m_X), C' = e^{F + m - m'} C + e^{m_X - m'} C_X (n likewise): exactly the
recurrent m, C, n.

Dimension letters: B batch, T time, H heads, K key dim, V value dim, R rows of a LEFT state,
P pieces (spans) in a fold.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fwpzoo import cells
from fwpzoo.cells import _spec
from fwpzoo.cells._reference import state_dtype, upcast


class Summary(NamedTuple):
    """The affine map a span applies to its entering state: S_end = transition(S) + contribution.
    transition: as the module docstring says per rule; contribution: a state (array or dict)."""

    transition: jax.Array
    contribution: Any


def rule(cell):
    """The family module of `cell`: a name in cells.CELLS, or the module itself."""
    return cells.get(cell) if isinstance(cell, str) else cell


def transition_of(cell) -> str:
    """The rule's kind of transition (one of _spec.TRANSITIONS)."""
    return rule(cell).OBJECTIVE.state.transition


def summarize(cell, k, v, *, reset=None, chunk_size=64, **gates) -> Summary:
    """The summary of a span: k, v and the gates of the cell (a name or a family module) as its
    chunkwise form takes them ([B, T, H, ...], static gates whole), reset [B, T] bool or None.
    Returns a Summary with [B, H, ...] leaves (see the module docstring), float32."""
    module = rule(cell)
    if transition_of(module) == _spec.NOT_AFFINE:
        raise ValueError(f"cell {module.__name__!r} is not affine in its state: no span summary")
    with jax.named_scope("chunk_summary"):  # named for profiles and the precision test
        return _SUMMARIZE[transition_of(module)](module, k, v, reset, chunk_size, gates)


def combine(cell, earlier: Summary, later: Summary) -> Summary:
    """The summary of `earlier`'s span followed by `later`'s: the rule's associative combine."""
    module = rule(cell)
    kind = transition_of(module)
    a1, a2 = earlier.transition, later.transition
    if kind == _spec.LEFT:
        transition = _exact(a2, a1)
    elif kind == _spec.RIGHT:
        transition = _exact(a1, a2)
    elif kind == _spec.DECAY:
        transition = a2 * a1
    else:
        transition = a1 + a2
    return Summary(transition, apply(module, later, earlier.contribution))


def apply(cell, summary: Summary, state):
    """The state leaving the span from `state` (the cell's state, an array or a dict)."""
    module = rule(cell)
    return _APPLY[transition_of(module)](module, summary, state)


def fold(cell, summaries: Summary, state):
    """(entering, final) from summaries stacked on a leading pieces axis [P, B, H, ...], in order,
    and the state entering the first: entering [P, B, H, ...] is the state entering each piece
    (context parallelism: shard j starts from entering[j]), final the state leaving the last.
    A scan of P state-sized steps."""

    module = rule(cell)

    def step(s, summary):
        return apply(module, summary, s), s

    with jax.named_scope("summary_fold"):  # named for profiles and the precision test
        final, entering = jax.lax.scan(step, state, summaries)
    return entering, final


def _exact(a, b):
    """a @ b in float32 at HIGHEST precision: a transition applied to a state or another."""
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _queries(k, width):
    """Zero queries [B, T, H, width]: a summary reads nothing (k may carry a sub-step axis)."""
    return jnp.zeros(k.shape[:3] + (width,), jnp.float32)


def _final(module, q, k, v, state, reset, chunk_size, gates):
    """The state the module's chunkwise form leaves (its outputs are not used)."""
    _, final = module.chunkwise(q, k, v, state=state, chunk_size=chunk_size, reset=reset, **gates)
    return final


def _zero_state(module, k, v):
    B, _, H = k.shape[:3]
    return module.OBJECTIVE.state.zeros(B, H, k.shape[-1], v.shape[-1], state_dtype(k, v))


def _summarize_left(module, k, v, reset, chunk_size, gates):
    """One run on the widened state [I_R | 0] [R, R + V] with values [0 | v]."""
    spec = module.OBJECTIVE.state
    zeros = _zero_state(module, k, v)
    names = [name for name, _ in spec.parts]
    parts = [zeros[name] for name in names] if spec.is_dict else [zeros]
    rows = [x.shape[-2] for x in parts]
    R, dtype = sum(rows), parts[0].dtype
    eye = jnp.broadcast_to(jnp.eye(R, dtype=dtype), parts[0].shape[:2] + (R, R))  # [B, H, R, R]
    starts = [sum(rows[:i]) for i in range(len(rows))]
    widened = [
        jnp.concatenate([eye[..., a : a + r, :], x], axis=-1)  # [B, H, r, R + V]
        for a, r, x in zip(starts, rows, parts, strict=True)
    ]
    state = dict(zip(names, widened, strict=True)) if spec.is_dict else widened[0]
    v_wide, gates = _widened(v, R), dict(gates)
    for gate in module.GATE_SPECS:  # a per-value gate of a LEFT rule scales writes only
        if gate.shape == _spec.PER_TOKEN_VALUE:
            gates[gate.name] = _widened(gates[gate.name], R)
    final = _final(module, _queries(k, k.shape[-1]), k, v_wide, state, reset, chunk_size, gates)
    final = [final[name] for name in names] if spec.is_dict else [final]
    transition = jnp.concatenate([x[..., :R] for x in final], axis=-2)  # [B, H, R, R]
    contribution = [x[..., R:] for x in final]
    if spec.is_dict:
        return Summary(transition, dict(zip(names, contribution, strict=True)))
    return Summary(transition, contribution[0])


def _widened(x, width):
    """x [..., V] with `width` zero columns in front: [..., width + V]."""
    return jnp.concatenate([jnp.zeros(x.shape[:-1] + (width,), x.dtype), x], axis=-1)


def _apply_left(module, summary, state):
    spec = module.OBJECTIVE.state
    if not spec.is_dict:
        return _exact(summary.transition, state) + summary.contribution
    names = [name for name, _ in spec.parts]
    rows = [state[name].shape[-2] for name in names]
    stacked = jnp.concatenate([state[name] for name in names], axis=-2)  # [B, H, R, V]
    added = jnp.concatenate([summary.contribution[name] for name in names], axis=-2)
    new = _exact(summary.transition, stacked) + added
    splits = [sum(rows[: i + 1]) for i in range(len(rows) - 1)]
    return dict(zip(names, jnp.split(new, splits, axis=-2), strict=True))


def _summarize_right(module, k, v, reset, chunk_size, gates):
    """One run on the widened state [I_V; 0] [V + K, V] with keys [0, k]."""
    zeros = _zero_state(module, k, v)  # [B, H, K, V]
    V = v.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(V, dtype=zeros.dtype), zeros.shape[:2] + (V, V))
    state = jnp.concatenate([eye, zeros], axis=-2)  # [B, H, V + K, V]
    k_wide = _widened(k, V)
    q = _queries(k, k_wide.shape[-1])
    final = _final(module, q, k_wide, v, state, reset, chunk_size, gates)
    return Summary(final[..., :V, :], final[..., V:, :])


def _apply_right(module, summary, state):
    return _exact(state, summary.transition) + summary.contribution


def _summarize_decay(module, k, v, reset, chunk_size, gates):
    """X from a run from zeros; f = exp of the span's summed log decay (the gate of range
    LOG_DECAY; none: f = 1), 0 if the span resets."""
    q = _queries(k, k.shape[-1])
    contribution = _final(module, q, k, v, None, reset, chunk_size, gates)
    B, _, H = k.shape[:3]
    decays = [gate.name for gate in module.GATE_SPECS if gate.range == _spec.LOG_DECAY]
    if not decays:
        factor = jnp.ones((B, H, 1), jax.tree.leaves(contribution)[0].dtype)
    else:
        (decay,) = decays  # a DECAY rule has at most one log-decay gate
        (log_decay,) = upcast(gates[decay])  # [B, T, H] or [B, T, H, K]
        log_decay = log_decay if log_decay.ndim == 4 else log_decay[..., None]
        factor = jnp.exp(jnp.sum(log_decay, axis=1))  # [B, H, K or 1]
    if reset is not None:
        factor = jnp.where(jnp.any(reset, axis=1)[:, None, None], 0.0, factor)
    return Summary(factor, contribution)


def _apply_decay(module, summary, state):
    rows = summary.transition[..., None]  # [B, H, K or 1, 1]
    return jax.tree.map(lambda s, x: rows * s + x, state, summary.contribution)


def _summarize_log_scale(module, k, v, reset, chunk_size, gates):
    """F, and X from the empty memory: a run from C = n = 0 with m = m_X - F, so that the
    entering memory's weight e^{F + m - m_T} never exceeds the writes' and m_T = m_X exactly.
    After a reset the run starts from the zero state (m = 0), as `recurrent` does."""
    objective = module.OBJECTIVE
    log_f, log_i = upcast(gates[objective.decay], gates[objective.lr])  # [B, T, H]
    total = jnp.sum(log_f, axis=1)  # [B, H]
    m_x = _max_plus(log_f, log_i)  # [B, H]
    written = jnp.isfinite(m_x)
    start = _zero_state(module, k, v)
    start[objective.log_scale] = jnp.where(written, m_x - total, 0.0)
    q = _queries(k, k.shape[-1])
    final = _final(module, q, k, v, start, reset, chunk_size, gates)
    through = jnp.ones(total.shape, bool)
    if reset is not None:
        through = ~jnp.any(reset, axis=1)[:, None]  # [B, 1]
    m = final[objective.log_scale]
    final[objective.log_scale] = jnp.where(through & ~written, -jnp.inf, m)  # nothing written
    return Summary(jnp.where(through, total, -jnp.inf), final)


def _max_plus(log_f, log_i):
    """m_X [B, H]: max over s of log_i_s + sum_{j > s} log_f_j, the log scale a span leaves
    from the empty memory (-inf when nothing is written), by the max-plus associative scan of
    the maps m -> max(m + log_f_t, log_i_t)."""

    def compose(earlier, later):
        (a1, b1), (a2, b2) = earlier, later
        return a1 + a2, jnp.maximum(b1 + a2, b2)

    _, b = jax.lax.associative_scan(compose, (log_f, log_i), axis=1)
    return b[:, -1]


def _weight(log_weight, m):
    """e^{log_weight - m}, 0 where log_weight is -inf (then m may be -inf too); the inner select
    keeps -inf - -inf out of both the value and the gradient."""
    empty = log_weight == -jnp.inf
    return jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, log_weight - m)))


def _apply_log_scale(module, summary, state):
    objective = module.OBJECTIVE
    scale = objective.log_scale
    x, m0 = summary.contribution, state[scale]
    carried = summary.transition + m0  # [B, H]
    m = jnp.maximum(carried, x[scale])
    w0, wx = _weight(carried, m), _weight(x[scale], m)  # [B, H]

    def mix(s, c):
        rows = (...,) + (None,) * (s.ndim - w0.ndim)
        return w0[rows] * s + wx[rows] * c

    new = {name: mix(state[name], x[name]) for name, _ in objective.state.parts if name != scale}
    return new | {scale: m}


_SUMMARIZE = {
    _spec.LEFT: _summarize_left,
    _spec.RIGHT: _summarize_right,
    _spec.DECAY: _summarize_decay,
    _spec.LOG_SCALE: _summarize_log_scale,
}
_APPLY = {
    _spec.LEFT: _apply_left,
    _spec.RIGHT: _apply_right,
    _spec.DECAY: _apply_decay,
    _spec.LOG_SCALE: _apply_log_scale,
}
