"""One property suite over every cell family: each parallel form against the sequential reference.

Compilation dominates the run time, so shapes are tiny (B = H = 2, K = V = 8), every compiled
function is cached by (variant, form, chunk size) and reused across tests (one compiled function
gives outputs, final state and gradients), the reference runs once per (variant, T), and XLA skips
its backend optimisations (these programs run in microseconds; compiling them is the cost).
"""

import functools
import re
import zlib
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.test_util import check_grads

from fwpzoo import cells
from fwpzoo.cells import _spec
from fwpzoo.cells.chunked import engine, precision, summary

# What jax_disable_most_optimizations sets, for these functions only.
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TOLERANCE = {"recurrent": 1e-6, "chunkwise": 1e-4, "associative": 1e-5}  # float32 relative RMS
BF16_TOLERANCE = 2.0**-8  # one bfloat16 rounding of the output, relative


def chunk_bf16_tolerance(chunk_size):
    """Relative RMS error of a chunkwise form whose chunk matmuls round their operands to
    bfloat16 (cells/chunked/precision.py), against float32 arithmetic on the same inputs:
    2^-8 (a product of two rounded operands, 8 mantissa bits) times sqrt(C), the growth of C
    independent rounding errors summed in a chunk and passed through (I + A)^{-1}. Measured at
    C = 16 (T = 47): at most 1.4 x 2^-8 over every cell, both engine layouts (the delta rule
    without decay, all chunks in one block); at C = 64 (T = 191): 2.5 x 2^-8."""
    return 2.0**-8 * np.sqrt(chunk_size)


# T in {1, 7, C - 1, C, C + 1, 3C - 1} at C = 16; the other chunk sizes at T = 3C - 1.
FORM_CASES = (
    [("chunkwise", 16, T) for T in (1, 7, 15, 16, 17, 47)]
    + [("chunkwise", C, 3 * C - 1) for C in (32, 64)]
    + [("associative", None, T) for T in (1, 15, 16, 47)]
)
LONGEST = max(T for _, _, T in FORM_CASES)


@dataclass(frozen=True)
class Sizes:
    T: int
    B: int = 2
    H: int = 2
    K: int = 8
    V: int = 8
    N: int = 2  # delta_product sub-steps
    log_alpha_min: float = -1.0
    beta_range: tuple[float, float] = (0.1, 1.9)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def hebbian_kv(r, s):
    return {"k": r.normal(size=(s.B, s.T, s.H, s.K)), "v": r.normal(size=(s.B, s.T, s.H, s.V))}


def delta_kv(r, s, sub=()):
    """L2-normalised keys, as delta-rule layers feed them."""
    k = unit(r.normal(size=(s.B, s.T, s.H, *sub, s.K)))
    return {"k": k, "v": r.normal(size=(s.B, s.T, s.H, *sub, s.V))}


def oja_kv(r, s):
    """L2-normalised values: Oja's rule is the delta rule on S^T with k and v exchanged."""
    return {
        "k": r.normal(size=(s.B, s.T, s.H, s.K)),
        "v": unit(r.normal(size=(s.B, s.T, s.H, s.V))),
    }


def log_alpha(r, s, key=()):
    return {"log_alpha": r.uniform(s.log_alpha_min, 0.0, size=(s.B, s.T, s.H, *key))}


def beta(r, s, sub=()):
    return {"beta": r.uniform(*s.beta_range, size=(s.B, s.T, s.H, *sub))}


def rwkv7_transition(r, s):
    """RWKV-7's a = -kappa, b = kappa * rate with kappa a unit key and per-key decays; rates in
    (0, 1), as RWKV-7's sigmoid gives them, keep every eigenvalue of the transition in [-1, 1]."""
    kappa = unit(r.normal(size=(s.B, s.T, s.H, s.K)))
    rate = r.uniform(0.05, 1.0, size=(s.B, s.T, s.H, 1))
    log_w = r.uniform(s.log_alpha_min, 0.0, size=(s.B, s.T, s.H, s.K))
    return {"log_w": log_w, "a": -kappa, "b": kappa * rate}


def mesa_inputs(r, s):
    """Unit keys, beta >= 0, lam > 0 [H, K] and a symmetric positive semi-definite kk state."""
    x = r.normal(size=(s.B, s.H, s.K, s.K))
    kv = 0.5 * r.normal(size=(s.B, s.H, s.K, s.V))
    state = {"kk": x @ np.swapaxes(x, -1, -2) / s.K, "kv": kv}
    lam = {"lam": r.uniform(0.5, 1.5, size=(s.H, s.K))}
    return delta_kv(r, s) | beta(r, s) | log_alpha(r, s) | lam | {"state": state}


def mlstm_inputs(r, s):
    """Unit keys, log forget gates <= 0 and log input gates around 0."""
    gates = {"log_f": log_alpha(r, s)["log_alpha"], "log_i": r.normal(size=(s.B, s.T, s.H))}
    return delta_kv(r, s) | gates


def gdn2_inputs(r, s):
    """Unit keys, per-key decays, erase gates in beta's range (the transition's eigenvalue along
    k, 1 - k^T (erase * k), stays in (-1, 1)) and write gates in (0, 1)."""
    erase = r.uniform(*s.beta_range, size=(s.B, s.T, s.H, s.K))
    write = r.uniform(0.0, 1.0, size=(s.B, s.T, s.H, s.V))
    return delta_kv(r, s) | log_alpha(r, s, (s.K,)) | {"erase": erase, "write": write}


def comba_inputs(r, s):
    """Unit keys and Comba's feedback key p = c * k with c in (0, 1) per key (the layer's tie)."""
    kv = delta_kv(r, s)
    p = kv["k"] * r.uniform(0.05, 1.0, size=(s.B, s.T, s.H, s.K))
    return kv | beta(r, s) | log_alpha(r, s) | {"p": p}


def ttt_inputs(r, s):
    """Unit keys (V = K), learning rates in (0.05, 0.5) and LayerNorm weights around 1 [H, K]."""
    ln = {"ln_w": r.uniform(0.5, 1.5, size=(s.H, s.K)), "ln_b": 0.1 * r.normal(size=(s.H, s.K))}
    return delta_kv(r, s) | {"eta": r.uniform(0.05, 0.5, size=(s.B, s.T, s.H))} | ln


# Per family, its variants and how to draw k, v and the gates: [B, T, H, ...] numpy arrays.
MAKERS = {
    "linear_attn": {"": hebbian_kv},
    "gated_linear_attn": {
        "/scalar": lambda r, s: hebbian_kv(r, s) | log_alpha(r, s),
        "/per_key": lambda r, s: hebbian_kv(r, s) | log_alpha(r, s, (s.K,)),
    },
    "delta_rule": {"": lambda r, s: delta_kv(r, s) | beta(r, s)},
    "gated_delta_rule": {
        "/scalar": lambda r, s: delta_kv(r, s) | beta(r, s) | log_alpha(r, s),
        "/per_key": lambda r, s: delta_kv(r, s) | beta(r, s) | log_alpha(r, s, (s.K,)),
    },
    "delta_product": {
        "/decay": lambda r, s: delta_kv(r, s, (s.N,)) | beta(r, s, (s.N,)) | log_alpha(r, s),
        "/per_key": lambda r, s: (
            delta_kv(r, s, (s.N,)) | beta(r, s, (s.N,)) | log_alpha(r, s, (s.K,))
        ),
        "/no_decay": lambda r, s: delta_kv(r, s, (s.N,)) | beta(r, s, (s.N,)),
    },
    # eta * beta < 1 keeps gradient descent with momentum stable on unit keys
    "momentum_delta": {
        "": lambda r, s: (
            delta_kv(r, s)
            | beta(r, s)
            | {"eta": r.uniform(0.05, 0.45, size=(s.B, s.T, s.H))}
            | log_alpha(r, s)
            | {"log_mu": r.uniform(s.log_alpha_min, 0.0, size=(s.B, s.T, s.H))}
        )
    },
    "oja": {"": lambda r, s: oja_kv(r, s) | beta(r, s) | log_alpha(r, s)},
    # eps up to e^3 on unnormalised keys: the implicit step stays stable where beta = eps would not
    "longhorn": {
        "": lambda r, s: (
            hebbian_kv(r, s) | {"eps": np.exp(r.uniform(-3.0, 3.0, size=(s.B, s.T, s.H)))}
        )
    },
    "dplr": {"/rwkv7": lambda r, s: delta_kv(r, s) | rwkv7_transition(r, s)},
    "mesa": {"": mesa_inputs},
    "mlstm": {"": mlstm_inputs},
    "gdn2": {"": gdn2_inputs},
    "comba": {"": comba_inputs},
    "ttt_linear": {"": ttt_inputs},  # mini_batch 1 here; tests/test_deep_cells.py: larger ones
    # the default options (linear net, sgd, one token per step); the others: test_deep_cells.py
    "deep": {"": lambda r, s: delta_kv(r, s) | beta(r, s) | log_alpha(r, s)},
}
# A padded token must be an identity step; zero is one for every input but these.
IDENTITY_PAD = {"log_i": -np.inf}  # mlstm: an input gate of -inf writes nothing, leaves m alone
VARIANTS = [name + suffix for name in cells.CELLS for suffix in MAKERS[name]]
ONE_VARIANT_PER_FAMILY = [name + next(iter(MAKERS[name])) for name in cells.CELLS]


def family(variant):
    return variant.split("/")[0]


def random_state(r, variant, s, scale=1.0):
    """A state of the family's shape (an array or a dict, from its OBJECTIVE.state), normal."""
    zeros = cells.get(family(variant)).OBJECTIVE.state.zeros(s.B, s.H, s.K, s.V)
    return jax.tree.map(lambda z: scale * r.normal(size=z.shape), zeros)


def has_form(variant, form):
    return hasattr(cells.get(family(variant)), form)


def with_forms(cases, variants=VARIANTS):
    """pytest params (variant, *case) for the cases whose form (case[0]) the variant has."""
    return [(v, *case) for v in variants for case in cases if has_form(v, case[0])]


def timed(key, x):
    """Whether input `key` has a time axis: not the state, not a static [H, K] gate."""
    return key != "state" and x.ndim >= 3


def draw(variant, sizes, dtype=jnp.float32):
    """q, k, v, a nonzero initial state and the gates, seeded by (variant, sizes)."""
    r = np.random.default_rng(zlib.crc32(f"{variant}{sizes}".encode()))
    s = sizes
    name, suffix = family(variant), variant[len(family(variant)) :]
    arrays = {
        "q": r.normal(size=(s.B, s.T, s.H, s.K)) / np.sqrt(s.K),
        "state": random_state(r, variant, s, 0.5),
    } | MAKERS[name][suffix](r, s)
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), arrays)


def cotangents(variant, sizes):
    r = np.random.default_rng(zlib.crc32(f"cotangent{sizes}".encode()))
    o = r.normal(size=(sizes.B, sizes.T, sizes.H, sizes.V))
    state = random_state(r, variant, sizes)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (o, state))


def quick_jit(fn):
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS)


def form_of(variant, form, chunk_size=None):
    """The family's `form` function."""
    fn = getattr(cells.get(family(variant)), form)
    return functools.partial(fn, chunk_size=chunk_size) if chunk_size else fn


@functools.cache
def jitted(variant, form, chunk_size=None):
    """inputs dict -> (o, state), compiled once per (variant, form, chunk size) and shape."""
    fn = form_of(variant, form, chunk_size)
    return quick_jit(lambda inputs: fn(**inputs))


@functools.cache
def jitted_vjp(variant, form, chunk_size=None):
    """(inputs, cotangents[, reset]) -> ((o, state), gradients w.r.t. every input)."""
    fn = form_of(variant, form, chunk_size)

    def run(inputs, cotangent, reset=None):
        out, pullback = jax.vjp(lambda x: fn(**x, reset=reset), inputs)
        return out, pullback(cotangent)[0]

    return quick_jit(run)


def run_form(variant, form, inputs, chunk_size=16):
    """((o, state), gradients) of `form` on inputs [B, T, ...], with the cotangents drawn for T.

    `recurrent` always runs padded to LONGEST, so it compiles once per variant: a zero token (and
    IDENTITY_PAD) is an identity step for every family (x + 0 and 1 * x are exact), which leaves
    the outputs, the final state and the gradients w.r.t. the real tokens and the initial state
    unchanged.
    """
    T = inputs["q"].shape[1]
    o_bar, state_bar = cotangents(variant, Sizes(T))
    if form != "recurrent":
        run = jitted_vjp(variant, form, chunk_size if form == "chunkwise" else None)
        return run(inputs, (o_bar, state_bar))

    def pad(x, value=0.0):
        widths = [(0, 0), (0, LONGEST - T)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value)

    padded = {
        key: pad(x, IDENTITY_PAD.get(key, 0.0)) if timed(key, x) else x for key, x in inputs.items()
    }
    (o, state), grads = jitted_vjp(variant, "recurrent")(padded, (pad(o_bar), state_bar))
    return (o[:, :T], state), split_time(grads, 0, T)


@functools.cache
def reference(variant, T):
    return run_form(variant, "recurrent", draw(variant, Sizes(T)))


def relative_rms(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.sqrt(np.mean(expected**2))
    return np.sqrt(np.mean((actual - expected) ** 2)) / max(scale, 1e-30)


def assert_close(actual, expected, tolerance):
    """Every leaf of two pytrees within `tolerance` relative RMS error; names the worst leaves."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(expected)
    errors = {
        jax.tree_util.keystr(path): relative_rms(a, e)
        for (path, e), a in zip(leaves, jax.tree.leaves(actual), strict=True)
    }
    for leaf in jax.tree.leaves(actual):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    bad = {path: f"{err:.2e}" for path, err in errors.items() if not err <= tolerance}
    assert not bad, f"relative RMS error above {tolerance:.0e}: {bad}"


def split_time(inputs, start, stop):
    return {key: x[:, start:stop] if timed(key, x) else x for key, x in inputs.items()}


@pytest.mark.parametrize(
    "variant, form, chunk_size, T",
    with_forms(FORM_CASES),
    ids=[f"{v}-{f}-C{c}-T{t}" for v, f, c, t in with_forms(FORM_CASES)],
)
def test_form_matches_recurrent_outputs_state_and_gradients(variant, form, chunk_size, T):
    actual = run_form(variant, form, draw(variant, Sizes(T)), chunk_size)
    assert_close(actual, reference(variant, T), TOLERANCE[form])


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_loop_equals_recurrent(variant):
    inputs = draw(variant, Sizes(7))
    step = quick_jit(cells.get(family(variant)).step)
    state, outputs = inputs["state"], []
    for t in range(7):
        per_token = {key: x[:, t] if timed(key, x) else x for key, x in inputs.items()}
        state, o = step(**per_token | {"state": state})
        outputs.append(o)
    (o_ref, state_ref), _ = reference(variant, 7)
    assert_close((jnp.stack(outputs, axis=1), state), (o_ref, state_ref), TOLERANCE["recurrent"])


PIECES = (15, 16, 16)  # lengths every form has compiled above; 47 in all


ALL_FORMS = with_forms([(form,) for form in cells.FORMS])


@pytest.mark.parametrize("variant, form", ALL_FORMS)
def test_pieces_with_carried_state_equal_one_pass(variant, form):
    inputs = draw(variant, Sizes(sum(PIECES)))
    state, outputs, start = inputs["state"], [], 0
    for length in PIECES:
        piece = split_time(inputs, start, start + length) | {"state": state}
        (o, state), _ = run_form(variant, form, piece)
        outputs.append(o)
        start += length
    (o_whole, state_whole), _ = run_form(variant, form, inputs)
    assert_close((jnp.concatenate(outputs, axis=1), state), (o_whole, state_whole), 1e-5)


def bf16_inputs(inputs):
    return {key: x if key == "state" else x.astype(jnp.bfloat16) for key, x in inputs.items()}


def equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan bodies, custom_vjp rules)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from equations(sub)


def bf16_product(eqn):
    return eqn.primitive.name == "dot_general" and any(
        v.aval.dtype == jnp.bfloat16 for v in eqn.invars
    )


def rounds_operands(jitted_fn, inputs):
    """Whether jitted_fn(inputs) has a product on bfloat16 operands (jit's cached trace of a
    call already made: no new trace)."""
    return any(bf16_product(e) for e in equations(jitted_fn.trace(inputs).jaxpr))


@pytest.mark.parametrize("variant, form", ALL_FORMS)
@pytest.mark.slow
def test_bf16_inputs_keep_a_float32_state(variant, form):
    inputs = draw(variant, Sizes(15))
    low = bf16_inputs(inputs)
    chunk_size = 16 if form == "chunkwise" else None
    o, state = jitted(variant, form, chunk_size)(low)
    assert o.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state))
    (o_f32, state_f32), _ = run_form(variant, form, jax.tree.map(jnp.float32, low))
    if form == "chunkwise" and rounds_operands(jitted(variant, form, chunk_size), low):
        # The chunk engine's policy (cells/chunked/precision.py): chunk matmuls on bfloat16
        # operands, the state, decays, inverses and scan in float32. On the same (rounded)
        # numbers the outputs and the final state are within the policy's bound.
        assert_close((o, state), (o_f32, state_f32), chunk_bf16_tolerance(chunk_size))
    else:
        # The arithmetic is float32: on the same (rounded) numbers only the output's rounding
        # differs.
        assert_close(state, state_f32, 1e-6)
        assert_close(o, o_f32, BF16_TOLERANCE)
    # And against the float32 inputs it is off by bfloat16 input rounding only.
    assert_close((o, state), run_form(variant, form, inputs)[0], 2e-2)


STRESS = Sizes(T=16384, B=1, H=1, K=4, V=4, N=2, log_alpha_min=-5.0, beta_range=(1.9, 2.0))


@pytest.mark.parametrize(
    "variant, form, chunk_size", with_forms([("chunkwise", 64), ("associative", None)])
)
@pytest.mark.slow
def test_long_sequence_strong_decay_and_beta_near_two(variant, form, chunk_size):
    """T = 16384, log_alpha down to -5: exp of a cumulative decay would under/overflow here.

    Also the state=None path: the run starts from zeros."""
    inputs = draw(variant, STRESS)
    del inputs["state"]
    expected = jitted(variant, "recurrent")(inputs)
    assert_close(jitted(variant, form, chunk_size)(inputs), expected, TOLERANCE[form])


def per_key_decay(variant):
    """The name of the variant's per-key log-decay gate ([B, T, H, K]), or None."""
    decay = cells.get(family(variant)).OBJECTIVE.decay
    inputs = draw(variant, Sizes(1))
    return decay if decay in inputs and inputs[decay].ndim == 4 else None


PER_KEY = [variant for variant in VARIANTS if per_key_decay(variant)]


@pytest.mark.parametrize("variant", PER_KEY)
@pytest.mark.slow
def test_chunks_beyond_the_factored_spread_take_the_halving(variant):
    """A per-key decay's chunk products come from factored rows only while every key decays by
    at most e^{-FACTORED_SPREAD} across the chunk; chunks of stronger decays (here tokens 16-31,
    log decays down to -20 per token) take the per-key halving, beside factored ones. Outputs,
    final state and gradients equal `recurrent`, without and with resets."""
    from fwpzoo.cells.chunked.chunking import factored_chunks

    C, decay = 16, per_key_decay(variant)
    sizes = Sizes(3 * C - 1)
    inputs = draw(variant, sizes)
    inputs[decay] = inputs[decay].at[:, C : 2 * C].multiply(20.0)
    tokens = C // (sizes.N if family(variant) == "delta_product" else 1)
    assert set(np.asarray(factored_chunks(inputs[decay], tokens)).tolist()) == {True, False}
    cotangent = cotangents(variant, sizes)
    for reset in (None, reset_mask(sizes)):
        actual = jitted_vjp(variant, "chunkwise", C)(inputs, cotangent, reset)
        expected = jitted_vjp(variant, "recurrent")(inputs, cotangent, reset)
        assert_close(actual, expected, TOLERANCE["chunkwise"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_reference_gradients_match_finite_differences(variant):
    """check_grads in float64 on tiny shapes (B = T = H = 1 is not enough to mix tokens: T = 3).

    Float64 inputs make the reference compute and keep its state in float64, so finite
    differences can be tight.
    """
    sizes = Sizes(T=3, B=1, H=1, K=2, V=2, N=2)
    recurrent = cells.get(family(variant)).recurrent
    with jax.enable_x64(True):
        inputs = draw(variant, sizes, jnp.float64)
        names = list(inputs)
        o, state = recurrent(**inputs)
        assert {x.dtype for x in jax.tree.leaves((o, state))} == {jnp.dtype(jnp.float64)}
        eps, tol = 1e-4, 1e-5
        check_grads(
            jax.jit(lambda *xs: recurrent(**dict(zip(names, xs, strict=True)))),
            tuple(inputs.values()),
            order=1,
            modes=("rev",),
            eps=eps,
            atol=tol,
            rtol=tol,
        )


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("variant", ONE_VARIANT_PER_FAMILY)
def test_chunkwise_jitted_and_eager_agree_with_reference(variant, jit):
    inputs = draw(variant, Sizes(17))
    if jit:
        out, _ = run_form(variant, "chunkwise", inputs)
    else:  # op by op, as a caller without jax.jit runs it
        out = form_of(variant, "chunkwise", 16)(**inputs)
    assert_close(out, reference(variant, 17)[0], TOLERANCE["chunkwise"])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.slow
def test_chunkwise_backward_keeps_no_per_chunk_intermediates(variant):
    """The chunk scans hold only the chunk-entering states across chunks and recompute the rest;
    computing all chunks' [C, C] products at once would hold several sequence-sized arrays.

    T = 4096 makes one chunk's working set, which does not grow with T (at these sizes mostly
    the per-key products' pairwise blocks, about 0.1 MB), small beside those arrays."""
    s = Sizes(T=4096)
    fn = form_of(variant, "chunkwise", 16)

    def run(inputs, cotangent):
        out, pullback = jax.vjp(lambda x: fn(**x), inputs)
        return out, pullback(cotangent)[0]

    inputs = draw(variant, s)
    compiled = jax.jit(run).lower(inputs, cotangents(variant, s)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        pytest.skip("this backend reports no memory analysis")
    # outputs in flight, one [B, T, H, max(K, V)] array, and the chunk-entering states (T / 16
    # states) twice over: two sequences for a [K, V] state, as much again for mesa's [K, K]
    sequence = s.B * s.T * s.H * max(s.K, s.V) * 4
    entering = s.T // 16 * sum(x.size * 4 for x in jax.tree.leaves(inputs["state"]))
    assert stats.temp_size_in_bytes <= sequence + 2 * entering + 2 * mapped_bytes(variant, inputs)


def mapped_bytes(variant, inputs):
    """Bytes of the inputs a cell that runs on dplr's forms (gdn2, comba: `as_dplr`) maps its
    gates to, over the whole sequence before dplr's chunk scan: they and their cotangents are
    sequence-sized by design, not per-chunk intermediates. 0 for every other cell."""
    module = cells.get(family(variant))
    if not hasattr(module, "as_dplr"):
        return 0
    gates = {name: inputs[name] for name in module.GATES}
    mapped = jax.eval_shape(lambda: module.as_dplr(inputs["k"], inputs["v"], **gates))
    return sum(x.size * 4 for x in jax.tree.leaves(mapped))


# Resets at t = 0, at the chunk edges 16 and 32 (C = 16; also DeltaProduct's 8-token chunks),
# inside chunks, at adjacent tokens (21, 22 inside a chunk; 32, 33 across an edge) and at the last
# token (in the padded tail chunk). Row 1 keeps its initial state until t = 5, and segments
# 22..31 and 5..31 cross chunk edges.
RESET_T = LONGEST
RESET_AT = {0: (0, 16, 21, 22, 46), 1: (5, 32, 33)}
RESET_CASES = [("recurrent", None), ("chunkwise", 16), ("associative", None)]


def reset_mask(sizes):
    """[B, T] bool, True at RESET_AT."""
    reset = np.zeros((sizes.B, sizes.T), bool)
    for row, times in RESET_AT.items():
        reset[row, list(times)] = True
    return jnp.asarray(reset)


def segments(reset_row):
    """[(start, stop, from_initial_state)] of one row's segments, cut before every reset."""
    T = len(reset_row)
    starts = sorted({0, *np.flatnonzero(reset_row).tolist()})
    stops = starts[1:] + [T]
    return [(a, z, a == 0 and not reset_row[0]) for a, z in zip(starts, stops, strict=True)]


@functools.cache
def segment_reference(variant):
    """((o, state), gradients) with resets at RESET_AT, from `recurrent` run on each segment
    alone: the first segment of a row from the initial state, later ones from the zero state.

    Each segment runs padded to RESET_T (zero tokens and IDENTITY_PAD are identity steps), B
    segments per call, so the recurrent form compiled for the other tests is reused; a last,
    partial call is filled with padding inputs and zero cotangents, which add nothing (to a static
    gate's gradient, which sums over the segments, neither). Outputs and gradients are scattered
    back to rows.
    """
    sizes = Sizes(RESET_T)
    inputs, (o_bar, state_bar) = draw(variant, sizes), cotangents(variant, sizes)
    state0 = inputs.pop("state")
    static = {key: x for key, x in inputs.items() if not timed(key, x)}
    reset = np.asarray(reset_mask(sizes))
    pieces = [(b, *segment) for b in range(sizes.B) for segment in segments(reset[b])]
    last = {b: i for i, (b, *_) in enumerate(pieces)}  # each row's last segment

    def padded(x, b, a, z, value=0.0):  # [T, ...]: row b's tokens a..z-1 first, then padding
        widths = [(0, RESET_T - (z - a))] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x[b, a:z], widths, constant_values=value)

    def row_or_zeros(tree, b, keep):
        return jax.tree.map(lambda x: x[b] if keep else jnp.zeros_like(x[b]), tree)

    def piece(i):  # (inputs, cotangents) of segment i alone; None: the filler
        b, a, z, from_initial = pieces[i] if i is not None else (0, 0, 0, False)
        tokens = {
            key: padded(x, b, a, z, IDENTITY_PAD.get(key, 0.0))
            for key, x in inputs.items()
            if key not in static
        }
        state = row_or_zeros(state0, b, from_initial)
        state_bar_i = row_or_zeros(state_bar, b, i is not None and last[b] == i)
        return tokens | {"state": state}, (padded(o_bar, b, a, z), state_bar_i)

    order = list(range(len(pieces))) + [None] * (-len(pieces) % sizes.B)
    outs, static_grads = [], []  # per segment ((o, state), gradients); per call, static ones
    for start in range(0, len(order), sizes.B):
        calls = map(piece, order[start : start + sizes.B])
        batch, cot = jax.tree.map(lambda *xs: jnp.stack(xs), *calls)
        (o, state), grads = jitted_vjp(variant, "recurrent")(batch | static, cot)
        static_grads.append({key: grads.pop(key) for key in static})
        outs += [jax.tree.map(lambda x, j=j: x[j], ((o, state), grads)) for j in range(sizes.B)]

    def scatter(like, get):  # per-token [B, T, ...] from every segment's [T, ...]
        full = jnp.zeros_like(like)
        for i, (b, a, z, _) in enumerate(pieces):
            full = full.at[b, a:z].set(get(outs[i])[: z - a])
        return full

    def stack(trees):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    o = scatter(o_bar, lambda out: out[0][0])
    state = stack([outs[last[b]][0][1] for b in range(sizes.B)])
    grads = {
        key: scatter(x, lambda out, key=key: out[1][key])
        for key, x in inputs.items()
        if key not in static
    }
    grads |= {key: sum(g[key] for g in static_grads) for key in static}
    first = [min(i for i, (row, *_) in enumerate(pieces) if row == b) for b in range(sizes.B)]
    zeros_unless = lambda keep, tree: tree if keep else jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    grads["state"] = stack([zeros_unless(pieces[i][3], outs[i][1]["state"]) for i in first])
    return (o, state), grads


@pytest.mark.parametrize("variant, form, chunk_size", with_forms(RESET_CASES))
def test_resets_equal_recurrent_on_each_segment(variant, form, chunk_size):
    """Outputs, final state and every gradient with resets equal `recurrent` on each segment; no
    gradient reaches the initial state of a row that resets at t = 0."""
    sizes = Sizes(RESET_T)
    run = jitted_vjp(variant, form, chunk_size)
    actual = run(draw(variant, sizes), cotangents(variant, sizes), reset_mask(sizes))
    assert_close(actual, segment_reference(variant), TOLERANCE[form])
    reset_first = [b for b, times in RESET_AT.items() if 0 in times]
    for leaf in jax.tree.leaves(actual[1]["state"]):
        assert np.all(np.asarray(leaf)[reset_first] == 0.0)


@pytest.mark.parametrize("variant", ONE_VARIANT_PER_FAMILY)
def test_step_with_reset_equals_recurrent_on_each_segment(variant):
    sizes = Sizes(RESET_T)
    inputs, reset = draw(variant, sizes), reset_mask(sizes)
    step = quick_jit(cells.get(family(variant)).step)
    state = inputs.pop("state")
    static = {key: x for key, x in inputs.items() if not timed(key, x)}
    outputs = []
    for t in range(sizes.T):
        token = {key: x[:, t] for key, x in inputs.items() if timed(key, x)}
        state, o = step(state, **token, **static, reset=reset[:, t])  # reset [B]
        outputs.append(o)
    (o_ref, state_ref), _ = segment_reference(variant)
    assert_close((jnp.stack(outputs, axis=1), state), (o_ref, state_ref), TOLERANCE["recurrent"])


def orthonormal_rows(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0].T


@pytest.mark.parametrize("form", cells.FORMS)
@pytest.mark.parametrize("name", ["linear_attn", "delta_rule"])
def test_orthonormal_keys_are_retrieved_exactly(rng, name, form):
    """With orthonormal keys every stored value comes back unchanged (beta = 1 for the delta rule:
    S^T k is zero before each write, so it writes exactly what linear attention writes)."""
    K = 8
    k = orthonormal_rows(rng, K)  # [T = K, K]
    v = rng.normal(size=(K, K))
    recall = np.arange(K) // 2  # at step t ask for the value written at step t // 2 <= t
    gates = {"beta": jnp.ones((1, K, 1))} if name == "delta_rule" else {}
    as_input = lambda x: jnp.asarray(x[None, :, None], jnp.float32)  # noqa: E731  [1, T, 1, K]
    fn = quick_jit(form_of(name, form, 4 if form == "chunkwise" else None))
    o, state = fn(as_input(k[recall]), as_input(k), as_input(v), **gates)
    np.testing.assert_allclose(o[0, :, 0], v[recall], atol=1e-5)
    np.testing.assert_allclose(state[0, 0], k.T @ v, atol=1e-5)


@pytest.mark.parametrize("form", cells.FORMS)
def test_delta_rule_with_beta_one_overwrites_a_key(rng, form):
    K = 8
    k = unit(rng.normal(size=K))
    v1, v2 = rng.normal(size=(2, K))
    as_input = lambda x: jnp.asarray(np.stack(x)[None, :, None], jnp.float32)  # noqa: E731
    fn = quick_jit(form_of("delta_rule", form, 16 if form == "chunkwise" else None))
    o, state = fn(as_input([k, k]), as_input([k, k]), as_input([v1, v2]), beta=jnp.ones((1, 2, 1)))
    np.testing.assert_allclose(o[0, :, 0], np.stack([v1, v2]), atol=1e-5)
    np.testing.assert_allclose(state[0, 0], np.outer(k, v2), atol=1e-5)


@pytest.mark.parametrize("form", cells.FORMS)
def test_delta_product_sub_steps_run_in_order(rng, form):
    """One token, two sub-steps writing (k, v1) then (k, v2) with beta = 1: v2 wins."""
    K = 8
    k = unit(rng.normal(size=K))
    v = rng.normal(size=(2, K))
    q = jnp.asarray(k[None, None, None], jnp.float32)  # [1, 1, 1, K]
    ks = jnp.asarray(np.stack([k, k])[None, None, None], jnp.float32)  # [1, 1, 1, 2, K]
    vs = jnp.asarray(v[None, None, None], jnp.float32)  # [1, 1, 1, 2, V]
    fn = quick_jit(form_of("delta_product", form, 16 if form == "chunkwise" else None))
    o, state = fn(q, ks, vs, beta=jnp.ones((1, 1, 1, 2)))
    np.testing.assert_allclose(o[0, 0, 0], v[1], atol=1e-5)
    np.testing.assert_allclose(state[0, 0], np.outer(k, v[1]), atol=1e-5)


# The objective view: `step` is the optimiser step its module's OBJECTIVE names -----------------


def decayed(W, log_decay):
    """exp(log_decay) W for a scalar [B, H] or per-key [B, H, K] log decay; None means 1."""
    if log_decay is None:
        return W
    factor = jnp.exp(log_decay)
    return (factor[..., None] if factor.ndim == W.ndim - 1 else factor[..., None, None]) * W


def loss_gradient(objective, W, k, v):
    """dL/dW [B, H, K, V] of the per-head loss at W, by jax.grad."""
    per_head = jax.vmap(jax.vmap(objective.loss_fn))
    return jax.grad(lambda W: jnp.sum(per_head(W, k, v)))(W)


def times(gate, x):
    """gate [B, H] times x [B, H, K, V]; None means 1."""
    return x if gate is None else gate[..., None, None] * x


def weights_of(objective, state):
    """The weights the loss is on, [B, H, K, V], unscaled by e^m where the state keeps a log
    scale m."""
    W = state[objective.weights] if objective.weights else state
    return times(jnp.exp(state[objective.log_scale]), W) if objective.log_scale else W


def optimiser_step(objective, state, k, v, gates):
    """The weights after one token, built from OBJECTIVE alone (for the implicit step: the
    residual S_t - (S' - lr dL/dS at S_t), with S_t the `step` result passed in `gates`)."""
    W = weights_of(objective, state)
    lr = gates.get(objective.lr)
    if objective.log_scale and lr is not None:
        lr = jnp.exp(lr)
    if objective.step == _spec.MOMENTUM:
        (M,) = (state[key] for key in state if key != objective.weights)
        gradient = loss_gradient(objective, W, k, v)  # at S_{t-1}
        M = decayed(M, gates[objective.momentum]) + times(gates[objective.momentum_lr], gradient)
        return decayed(W, gates.get(objective.decay)) - times(lr, M)
    W = decayed(W, gates.get(objective.decay))
    if objective.step == _spec.GRADIENT:
        return W - times(lr, loss_gradient(objective, W, k, v))
    if objective.step == _spec.GRADIENT_STEPS:
        for j in range(k.shape[-2]):
            W = W - times(lr[..., j], loss_gradient(objective, W, k[..., j, :], v[..., j, :]))
        return W
    assert objective.step == _spec.IMPLICIT, objective.step
    new = gates["new"]
    return new - (W - times(lr, loss_gradient(objective, new, k, v)))


# the inner-optimiser cells (cells/deep) have their oracles in tests/test_deep_cells.py
OPTIMISER_VARIANTS = [
    v
    for v in VARIANTS
    if cells.get(family(v)).OBJECTIVE.loss_fn is not None
    and cells.get(family(v)).OBJECTIVE.step != _spec.INNER
]


@pytest.mark.parametrize("variant", OPTIMISER_VARIANTS)
def test_step_is_the_optimiser_step_on_its_objective(variant):
    """In float64, `step` from a random state equals the step OBJECTIVE derives with jax.grad
    of its loss (the implicit step: its fixed-point equation holds at the result)."""
    module = cells.get(family(variant))
    objective = module.OBJECTIVE
    with jax.enable_x64(True):
        inputs = draw(variant, Sizes(T=1), jnp.float64)
        state = inputs.pop("state")
        at_0 = {key: x[:, 0] for key, x in inputs.items()}
        new, _ = module.step(state, **at_0)
        weights = weights_of(objective, new)
        gates = {key: x for key, x in at_0.items() if key not in ("q", "k", "v")}
        if objective.step == _spec.IMPLICIT:
            residual = optimiser_step(
                objective, state, at_0["k"], at_0["v"], gates | {"new": weights}
            )
            np.testing.assert_allclose(residual, 0.0, atol=1e-12)
        else:
            expected = optimiser_step(objective, state, at_0["k"], at_0["v"], gates)
            np.testing.assert_allclose(weights, expected, rtol=1e-12, atol=1e-12)


# Chunk summaries (cells/chunked/summary.py): what a span does to its entering state ------------

# RESET_T tokens padded with identity tokens to three equal pieces
SUMMARY_PIECES = 3
SUMMARY_T = -(-RESET_T // SUMMARY_PIECES) * SUMMARY_PIECES


@functools.cache
def jitted_fold(variant):
    """(inputs [B, SUMMARY_T, ...] without q, reset [B, SUMMARY_T]) -> the state left by folding
    the summaries of the three pieces into the initial state. The pieces ride on the batch axis,
    so one compiled summary serves all three."""
    name = family(variant)

    def pieces(x):  # [B, 3 L, ...] -> [3 B, L, ...], piece-major
        x = x.reshape(x.shape[0], SUMMARY_PIECES, -1, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    def run(inputs, reset):
        inputs = dict(inputs)
        state = inputs.pop("state")
        spans = {key: pieces(x) if timed(key, x) else x for key, x in inputs.items()}
        summaries = summary.summarize(name, reset=pieces(reset), chunk_size=16, **spans)
        by_piece = jax.tree.map(lambda x: x.reshape(SUMMARY_PIECES, -1, *x.shape[1:]), summaries)
        return summary.fold(name, by_piece, state)[1]

    return quick_jit(run)


# one variant per family, and the per-key decay of gated linear attention (a per-row factor)
SUMMARY_VARIANTS = [
    v
    for v in ONE_VARIANT_PER_FAMILY
    if cells.get(family(v)).OBJECTIVE.state.transition != _spec.NOT_AFFINE
] + ["gated_linear_attn/per_key"]


@pytest.mark.parametrize("variant", SUMMARY_VARIANTS)
def test_folded_summaries_of_pieces_equal_recurrent_final_state(variant):
    """Summaries of three pieces, folded from the initial state, give `recurrent`'s final state,
    without resets and with RESET_AT's (pieces that reset and pieces the state passes through)."""
    sizes = Sizes(RESET_T)
    inputs = draw(variant, sizes)
    del inputs["q"]

    def pad(x, value=0.0):
        widths = [(0, 0), (0, SUMMARY_T - RESET_T)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value)

    padded = {
        key: pad(x, IDENTITY_PAD.get(key, 0.0)) if timed(key, x) else x for key, x in inputs.items()
    }
    run = jitted_fold(variant)
    no_reset = jnp.zeros((sizes.B, SUMMARY_T), bool)
    assert_close(run(padded, no_reset), reference(variant, RESET_T)[0][1], TOLERANCE["chunkwise"])
    resets = pad(reset_mask(sizes), False)
    assert_close(run(padded, resets), segment_reference(variant)[0][1], TOLERANCE["chunkwise"])


# The chunk engine's accelerator layout (cells/chunked/engine.py): every chunk in one block ------

# the engine's two hand-derived rules (no decay, a per-key decay, DeltaProduct's sub-steps with
# a scalar one) and every other family on the engine, each preparing its chunks its own way
# (chunked/autodiff.py's rules, dplr and the cells built on it)
ENGINE_VARIANTS = [
    "linear_attn",
    "gated_delta_rule/per_key",
    "delta_product/decay",
    *(
        pytest.param(v, marks=pytest.mark.slow)  # the quick suite's budget: the first three
        for v in ["oja", "momentum_delta", "mlstm", "dplr/rwkv7", "gdn2", "comba", "mesa"]
    ),
]


@pytest.mark.parametrize("variant", ENGINE_VARIANTS)
def test_chunkwise_with_all_chunks_in_one_block_equals_recurrent(variant):
    """One block of every chunk (prepared at once, a scan of state-sized steps, outputs at once:
    an accelerator's layout) gives `recurrent`'s outputs, final state and gradients, with
    resets. The CPU's layout, a block per chunk, is what the other tests run."""
    fn = form_of(variant, "chunkwise", 16)

    def run(inputs, cotangent, reset):
        out, pullback = jax.vjp(lambda x: fn(**x, reset=reset), inputs)
        return out, pullback(cotangent)[0]

    sizes = Sizes(RESET_T)
    args = (draw(variant, sizes), cotangents(variant, sizes), reset_mask(sizes))
    with engine.compiling_for("tpu"):  # traced as for a TPU, run here
        compiled = quick_jit(run).lower(*args).compile()
    assert_close(compiled(*args), segment_reference(variant), TOLERANCE["chunkwise"])


# the engine's bfloat16 policy is stressed most by the delta rule without decay (nothing fades)
PRECISION_VARIANTS = ["delta_rule", *ENGINE_VARIANTS]
# where the engine keeps float32 arithmetic at HIGHEST precision, whatever model.matmul_precision
FLOAT32_SCOPES = ("triangular_inverse", "decay_cumsum", "decay_product", "cholesky")


def in_float32_scope(eqn):
    """Whether eqn is traced inside one of FLOAT32_SCOPES, through any transformation (the rules
    whose chunk backward is autodiff name theirs jvp(cholesky), transpose(jvp(...)), ...)."""
    names = re.split(r"[/()]", str(eqn.source_info.name_stack))
    return any(name in FLOAT32_SCOPES for name in names)


@pytest.mark.parametrize("variant", PRECISION_VARIANTS)
def test_bf16_chunk_matmuls_in_the_accelerator_layout(variant):
    """bfloat16 inputs, every chunk in one block, model.matmul_precision=high: outputs, final
    state and gradients within chunk_bf16_tolerance of float32 on the same rounded inputs (the
    chunk matmuls round most in this layout: W = T diag(beta) K is a product of the prepare
    stage here, of the float32 scan in the CPU's layout); in the jaxpr of the
    forward and the backward, every product on bfloat16 operands accumulates in float32 at the
    precision asked for, the state carried by every scan is float32, and the triangular
    inverses and decay cumsums are float32 at HIGHEST precision."""
    sizes = Sizes(LONGEST)
    low = bf16_inputs(draw(variant, sizes))
    o_bar, state_bar = cotangents(variant, sizes)
    fn = form_of(variant, "chunkwise", 16)

    def run(inputs, cotangent):
        out, pullback = jax.vjp(lambda x: fn(**x), inputs)
        return out, pullback(cotangent)[0]

    args = (low, (o_bar.astype(jnp.bfloat16), state_bar))
    with engine.compiling_for("tpu"), precision.matmul_precision("high"):
        jaxpr = jax.make_jaxpr(run)(*args).jaxpr
        (o, state), grads = quick_jit(run).lower(*args).compile()(*args)
    # float32 on the same rounded inputs: `recurrent`, compiled once for the suite at this T
    (o_f32, state_f32), grads_f32 = run_form(variant, "recurrent", jax.tree.map(jnp.float32, low))
    # the gradients too (measured: at most 2.5 x 2^-8, d log_alpha of a per-key decay: gdn2's
    # and comba's on dplr's chunk 2.5, dplr's d log_w 2.3, gated_delta_rule's 2.3)
    assert_close((o, state, grads), (o_f32, state_f32, grads_f32), chunk_bf16_tolerance(16))

    eqns = list(equations(jaxpr))
    products = [e for e in eqns if e.primitive.name == "dot_general"]
    assert any(bf16_product(e) for e in products)
    for eqn in products:
        scope = str(eqn.source_info.name_stack)
        if in_float32_scope(eqn):
            assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, scope
        else:
            assert eqn.params["precision"] == (jax.lax.Precision.HIGH,) * 2, scope
        assert eqn.outvars[0].aval.dtype == jnp.float32, scope
    assert all(
        v.aval.dtype == jnp.float32
        for e in eqns
        if in_float32_scope(e)
        for v in [*e.invars, *e.outvars]
        if hasattr(v, "aval") and jnp.issubdtype(v.aval.dtype, jnp.floating)
    )
    # the delta rules, oja, momentum_delta and dplr invert (I + A) in every chunk; mesa solves
    # by Cholesky
    solver = {"linear_attn": None, "mlstm": None, "mesa": "cholesky"}.get(
        family(variant), "triangular_inverse"
    )
    if solver:
        assert any(solver in str(e.source_info.name_stack) for e in eqns)
    state_shapes = {leaf.shape for leaf in jax.tree.leaves(state_bar)}  # a dict for some rules
    carries = [
        v.aval
        for e in eqns
        if e.primitive.name == "scan"
        for v in e.invars[e.params["num_consts"] : e.params["num_consts"] + e.params["num_carry"]]
        if v.aval.shape in state_shapes
    ]
    assert carries and all(aval.dtype == jnp.float32 for aval in carries)
