"""The cells whose programmer reads its own past (recurrent_delta, srwm): the lean backwards against
autodiff through the plain scan, step against the scan, resets, and the backward's memory.

Gradients are compared in float64 (the lean backwards must be exact up to rounding); shapes are
tiny and XLA skips its backend optimisations, as in test_cells.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fwpzoo.cells import delta_rule
from fwpzoo.cells.programmed import recurrent_delta, srwm

COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
B, H, K, V = 2, 2, 4, 3
CHUNK = 4


def quick_jit(fn):
    return lambda *args: jax.jit(fn).lower(*args).compile(COMPILER_OPTIONS)(*args)


def rdn_inputs(rng, T, dtype=np.float64):
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    return {
        "q": draw(B, T, H, K),
        "k": draw(B, T, H, K),
        "v": draw(B, T, H, V),
        "beta": draw(B, T, H),
        "R": 0.5 * draw(H, V, 2 * K + V + 1),
        "state": {"S": 0.3 * draw(B, H, K, V), "y": draw(B, H, V)},
    }


def srwm_inputs(rng, T, dtype=np.float64, D=3, D_out=2):
    draw = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)  # noqa: E731
    W0 = draw(H, D_out + 2 * D + srwm.BETA_ROWS, D) / np.sqrt(D)
    return {"x": draw(B, T, H, D), "W0": W0, "state": W0[None] + 0.1 * draw(B, *W0.shape)}


CELLS = {"recurrent_delta": (recurrent_delta, rdn_inputs), "srwm": (srwm, srwm_inputs)}
FORMS = {
    "checkpointed": lambda module: functools.partial(module.checkpointed, chunk_size=CHUNK),
    "reversible": lambda module: module.reversible,
}


def loss_and_grads(fn, inputs, seed=0, **fixed):
    """A random linear function of every output and the final state, and its gradients w.r.t.
    every input (the slow weights and the initial state included)."""
    shapes = jax.eval_shape(lambda x: fn(**x, **fixed), inputs)
    rng = np.random.default_rng(seed)
    weights = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)

    def loss(x):
        outs = fn(**x, **fixed)
        pairs = zip(jax.tree.leaves(outs), jax.tree.leaves(weights), strict=True)
        return sum(jnp.sum(a * w) for a, w in pairs)

    return quick_jit(jax.value_and_grad(loss))(inputs)


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


@pytest.mark.parametrize("T", [1, 2 * CHUNK + 3])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cell", CELLS)
def test_lean_backward_equals_autodiff_through_the_scan(rng, cell, form, T):
    """srwm starts from W0 (state None), so the gradient w.r.t. W0 is checked; rdn from a given
    nonzero state."""
    module, make = CELLS[cell]
    inputs = make(rng, T)
    if cell == "srwm":
        del inputs["state"]
    value, grads = loss_and_grads(module.recurrent, inputs)
    lean_value, lean_grads = loss_and_grads(FORMS[form](module), inputs)
    np.testing.assert_allclose(lean_value, value, rtol=1e-12)
    for name, g in grads.items():  # R / W0 and the initial state included
        for a, b in zip(jax.tree.leaves(lean_grads[name]), jax.tree.leaves(g), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)
            assert np.abs(b).max() > 0, name  # every input reaches the loss


@pytest.mark.parametrize("cell", CELLS)
def test_checkpointed_backward_with_resets_equals_autodiff(rng, cell):
    """Resets inside and at the edges of chunks; srwm's W0 is reached through the resets."""
    module, make = CELLS[cell]
    T = 2 * CHUNK + 3
    inputs = make(rng, T)
    reset = np.zeros((B, T), bool)
    reset[0, [2, CHUNK, 2 * CHUNK + 2]] = True
    reset[1, [0, CHUNK - 1]] = True
    fixed = {"reset": jnp.asarray(reset)}
    value, grads = loss_and_grads(module.recurrent, inputs, **fixed)
    lean_value, lean_grads = loss_and_grads(FORMS["checkpointed"](module), inputs, **fixed)
    np.testing.assert_allclose(lean_value, value, rtol=1e-12)
    slow = "W0" if cell == "srwm" else "R"
    assert np.abs(grads[slow]).max() > 0
    for name in grads:
        if name != "reset":
            for a, b in zip(
                jax.tree.leaves(lean_grads[name]), jax.tree.leaves(grads[name]), strict=True
            ):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12, err_msg=name)


def test_rdn_without_recurrence_is_the_delta_rule(rng):
    inputs = rdn_inputs(rng, 9)
    inputs["R"] = jnp.zeros_like(inputs["R"])
    state = {"S": inputs["state"]["S"], "y": inputs["state"]["y"]}
    o, final = recurrent_delta.recurrent(**inputs)
    phi = lambda x: jax.nn.softmax(x, axis=-1)  # noqa: E731
    o_delta, S_delta = delta_rule.recurrent(
        phi(inputs["q"]),
        phi(inputs["k"]),
        inputs["v"],
        state=state["S"],
        beta=jax.nn.sigmoid(inputs["beta"]),
    )
    np.testing.assert_allclose(o, o_delta, rtol=1e-12)
    np.testing.assert_allclose(final["S"], S_delta, rtol=1e-12)


@pytest.mark.parametrize("cell", CELLS)
def test_steps_and_pieces_equal_one_scan(rng, cell):
    """Token by token through `step`, and two pieces with the state carried, equal one scan."""
    module, make = CELLS[cell]
    inputs = make(rng, 7)
    o, final = module.recurrent(**inputs)
    seq = {n: x for n, x in inputs.items() if n in ("q", "k", "v", "beta", "x")}
    slow = {n: x for n, x in inputs.items() if n in ("R", "W0")}
    state, outs = inputs["state"], []
    for t in range(7):
        state, out = module.step(state, **{n: x[:, t] for n, x in seq.items()}, **slow)
        outs.append(out)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), o, rtol=1e-12)
    first = {**{n: x[:, :3] for n, x in seq.items()}, **slow}
    rest = {**{n: x[:, 3:] for n, x in seq.items()}, **slow}
    o1, mid = module.recurrent(**first, state=inputs["state"])
    o2, end = module.recurrent(**rest, state=mid)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], axis=1), o, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("form", ["recurrent", "checkpointed"])
@pytest.mark.parametrize("cell", CELLS)
def test_reset_starts_a_fresh_sequence(rng, cell, form):
    """Where reset is True the row continues as a new sequence from the zero state (rdn: zeros;
    srwm: the learned W0): equal to running that segment alone with state None."""
    module, make = CELLS[cell]
    T, start = 2 * CHUNK + 1, 5
    inputs = make(rng, T)
    fn = module.recurrent if form == "recurrent" else FORMS[form](module)
    reset = jnp.zeros((B, T), bool).at[0, start].set(True).at[1, 0].set(True)
    o, final = fn(**inputs, reset=reset)
    seq = {n: x for n, x in inputs.items() if n in ("q", "k", "v", "beta", "x")}
    slow = {n: x for n, x in inputs.items() if n in ("R", "W0")}
    alone, alone_final = module.recurrent(**{n: x[:1, start:] for n, x in seq.items()}, **slow)
    np.testing.assert_allclose(o[0, start:], alone[0], rtol=1e-12)
    for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(alone_final), strict=True):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    fresh, _ = module.recurrent(**{n: x[1:] for n, x in seq.items()}, **slow)
    np.testing.assert_allclose(o[1], fresh[0], rtol=1e-12)
    before, _ = module.recurrent(
        **{n: x[:1, :start] for n, x in seq.items()},
        **slow,
        state=jax.tree.map(lambda s: s[:1], inputs["state"]),
    )
    np.testing.assert_allclose(o[0, :start], before[0], rtol=1e-12)


def backward_temp_bytes(fn, inputs):
    def run(x):
        out, pullback = jax.vjp(lambda x: fn(**x), x)
        return pullback(out)[0]

    with jax.enable_x64(False):
        x = jax.tree.map(lambda a: a.astype(jnp.float32), inputs)
        stats = jax.jit(run).lower(x).compile(COMPILER_OPTIONS).memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes


@pytest.mark.parametrize("form", ["recurrent", *FORMS])
def test_backward_memory_grows_no_faster_than_chunk_states(rng, form):
    """Going from T to 4T tokens, the lean backwards add at most one state per chunk of the
    added tokens (plus per-token vectors); autodiff through the plain scan adds one per token."""
    module = srwm
    fn = module.recurrent if form == "recurrent" else FORMS[form](module)
    D = 16
    small, large = (srwm_inputs(rng, T, D=D, D_out=D) for T in (64, 256))
    growth = backward_temp_bytes(fn, large) - backward_temp_bytes(fn, small)
    rows = small["W0"].shape[-2]
    state_bytes = B * H * rows * D * 4
    vectors_bytes = 8 * B * H * rows * 4  # a few per-token vectors of the state's larger side
    budget = (256 - 64) * (state_bytes / CHUNK + vectors_bytes)
    if form == "recurrent":
        assert growth > budget  # the check can fail: the plain scan keeps every state
    else:
        assert growth <= budget
