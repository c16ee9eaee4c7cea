"""Plastic networks: a vector-state layer whose weights are a slow part plus a fast plastic part.

The fast part is a matrix S [B, H, K, V] per head, in the orientation of the FWP cells: row i is
presynaptic neuron i, column j postsynaptic neuron j, so the fast drive of the postsynaptic layer
is S^T pre (the papers' A [post, pre] is S^T). alpha [H, K, V] (optional) scales each synapse's
plastic part (Miconi et al. 2018); without it the fast part enters as is (HebbFF).

Where the plasticity sits (`site`):
    input      h_t = act(u_t + (alpha . S_{t-1})^T x_t)                  pre_t = x_t  [B, H, K]
               (HebbFF: Tyulmankov, Yang & Abbott, Neuron 2022; u_t = W x_t + b)
    recurrent  h_t = act(u_t + (R + alpha . S_{t-1})^T h_{t-1})          pre_t = h_{t-1}, K = V
               (differentiable plasticity: Miconi, Clune & Stanley, ICML 2018; u_t = W x_t + b)
The slow drive u_t [B, T, H, V] is the layer's (parallel over t); the fast read and, for the
recurrent site, R h_{t-1} happen inside the scan: the programmer reads its own past.

The rule (`rule`), post_t = h_t, lam = exp(log_lambda) in (0, 1) and eta of either sign per head:
    hebb            S_t = lam S_{t-1} + eta pre_t post_t^T           (eta < 0: anti-Hebbian)
    oja             S' = lam S_{t-1};  S_t = S' + eta (pre_t - S' post_t) post_t^T
                    (Oja's subspace rule, forgetting first: the step of the `oja` cell)
    neuromodulated  m_t = tanh(w_mod . h_t)                          (the third factor)
                    S_t = clip(lam S_{t-1} + eta m_t pre_t post_t^T, -2, 2)
                    (backpropamine: Miconi et al., ICLR 2019, which clips the trace at 2)
Only the neuromodulated rule clips, as its paper does: HebbFF's and Oja's traces are bounded by
lam < 1 and by the rule itself.

State: {"S": [B, H, K, V]} (input) or {"S": [B, H, V, V], "h": [B, H, V]} (recurrent), float32;
None means zeros. `reset` [B, T] (or [B] for `step`) replaces the state before a token by zeros.

Forms: `recurrent` (lax.scan over `step`, the spec) and `checkpointed` (the same scan, its
backward recomputing chunks from their entering states) for every configuration; `parallel` where
the rule is affine in S: input site, hebb, identity activation, no alpha. There
    S_t = lam (I - b x_t x_t^T) S_{t-1} + b x_t (-lam u_t)^T,   b = -eta / lam,
the gated delta rule with keys x_t, so the layer runs on that cell's chunkwise form (derivation in
docs/plasticity.md). An anti-Hebbian linear plastic layer is a delta-rule memory whose target is
minus the slow drive: a repeated input is cancelled (repetition suppression).
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from fwpzoo.cells import gated_delta_rule
from fwpzoo.cells._reference import reset_state, state_dtype
from fwpzoo.cells.programmed import scans
from fwpzoo.cells.programmed.scans import batch_major, time_major

RULES: tuple[str, ...] = ("hebb", "oja", "neuromodulated")
SITES: tuple[str, ...] = ("input", "recurrent")
ACTIVATIONS = {
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "relu": jax.nn.relu,
    "identity": lambda x: x,
}
CLIP: dict[str, float | None] = {"hebb": None, "oja": None, "neuromodulated": 2.0}


def _one_of(what: str, value: str, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")


@dataclass(frozen=True)
class Plasticity:
    """What kind of plastic layer: where the plasticity sits, its rule, the activation."""

    site: str = "input"
    rule: str = "hebb"
    activation: str = "tanh"

    def __post_init__(self):
        _one_of("plastic_on", self.site, SITES)
        _one_of("plasticity", self.rule, RULES)
        _one_of("plastic_activation", self.activation, ACTIVATIONS)

    @property
    def clip(self) -> float | None:
        return CLIP[self.rule]

    def params_needed(self, per_synapse_alpha: bool) -> tuple[str, ...]:
        """The parameter names `step` reads for this kind (eta and log_lambda always)."""
        return (
            ("eta", "log_lambda")
            + ("alpha",) * per_synapse_alpha
            + ("R",) * (self.site == "recurrent")
            + ("w_mod",) * (self.rule == "neuromodulated")
        )

    def is_affine(self, per_synapse_alpha: bool) -> bool:
        """Whether the update is affine in S, so the `parallel` form exists."""
        return (
            self.site == "input"
            and self.rule == "hebb"
            and self.activation == "identity"
            and not per_synapse_alpha
        )


def zero_state(kind: Plasticity, batch_size: int, H: int, K: int, V: int, dtype=jnp.float32):
    """The state of no history: S [B, H, K, V] (K = V at the recurrent site) and h [B, H, V]."""
    if kind.site == "recurrent":
        S = jnp.zeros((batch_size, H, V, V), dtype)
        return {"S": S, "h": jnp.zeros((batch_size, H, V), dtype)}
    return {"S": jnp.zeros((batch_size, H, K, V), dtype)}


def fast_read(S, pre, alpha=None):
    """(alpha . S)^T pre: S [B, H, K, V], pre [B, H, K], alpha [H, K, V] or None -> [B, H, V]."""
    weights = S if alpha is None else alpha * S
    return jnp.einsum("bhkv,bhk->bhv", weights, pre)


def update(kind: Plasticity, params: dict, S, pre, post):
    """The rule's step: S [B, H, K, V], pre [B, H, K], post [B, H, V] -> S [B, H, K, V]."""
    S = jnp.exp(params["log_lambda"])[:, None, None] * S  # forgetting first
    eta = params["eta"][:, None]  # [H, 1]
    if kind.rule == "neuromodulated":
        m = jnp.tanh(jnp.sum(params["w_mod"] * post, axis=-1))  # [B, H]: the third factor
        eta = eta * m[..., None]  # [B, H, 1]
    if kind.rule == "oja":
        pre = pre - jnp.einsum("bhkv,bhv->bhk", S, post)  # what the synapses do not yet hold
    S = S + (eta * pre)[..., :, None] * post[..., None, :]
    return S if kind.clip is None else jnp.clip(S, -kind.clip, kind.clip)


def step(kind: Plasticity, params: dict, state, u, x=None, *, reset=None):
    """One token: u [B, H, V] (slow drive), x [B, H, K] (input site) -> (state, h [B, H, V]).

    params: eta, log_lambda [H]; alpha [H, K, V] (optional); R [H, V, V] (recurrent site);
    w_mod [H, V] (neuromodulated).
    """
    state = reset_state(state, reset)
    params = {name: value.astype(state["S"].dtype) for name, value in params.items()}
    u = u.astype(state["S"].dtype)
    S = state["S"]
    if kind.site == "input":
        pre = x.astype(S.dtype)
        drive = u + fast_read(S, pre, params.get("alpha"))
    else:
        pre = state["h"]
        drive = u + fast_read(S, pre, params.get("alpha"))
        drive = drive + jnp.einsum("hkv,bhk->bhv", params["R"], pre)
    h = ACTIVATIONS[kind.activation](drive)  # [B, H, V]
    new_state = {"S": update(kind, params, S, pre, h)}
    if kind.site == "recurrent":
        new_state["h"] = h
    return new_state, h


def initial_state(kind: Plasticity, state, u, x):
    """The given state in state_dtype, or zeros sized from u [B, T, H, V] and x [B, T, H, K]."""
    dtype = state_dtype(u, x, state)
    if state is not None:
        return jax.tree.map(lambda s: s.astype(dtype), state)
    B, _, H, V = u.shape
    K = x.shape[-1] if x is not None else V
    return zero_state(kind, B, H, K, V, dtype)


def _core(kind: Plasticity):
    """`step` as a core of fwpzoo.cells.programmed.scans: (params, state, (u_t, x_t, reset_t)) ->
    (state, h_t, no write factors)."""

    def core(params, state, xs):
        u_t, x_t, reset_t = xs
        state, h = step(kind, params, state, u_t, x_t, reset=reset_t)
        return state, h, None

    return core


def recurrent(kind: Plasticity, params: dict, u, x=None, *, state=None, reset=None):
    """The reference: `step` over t. u [B, T, H, V], x [B, T, H, K] (input site; None at the
    recurrent site), reset [B, T] -> (h [B, T, H, V] in u's dtype, final state)."""
    state = initial_state(kind, state, u, x)
    xs = jax.tree.map(time_major, (u, x, reset))
    h, state = scans.plain(_core(kind), params, state, xs)
    return batch_major(h).astype(u.dtype), state


def checkpointed(
    kind: Plasticity, params: dict, u, x=None, *, state=None, reset=None, chunk_size=64
):
    """`recurrent` (the same forward) with a backward that keeps only the state entering each
    chunk of chunk_size tokens and reruns that chunk: T / C + C states live instead of T."""
    state = initial_state(kind, state, u, x)
    xs = jax.tree.map(time_major, (u, x, reset))
    h, state = scans.checkpointed(_core(kind), params, state, xs, chunk_size)
    return batch_major(h).astype(u.dtype), state


def interleave(a, b):
    """[B, T, ...] twice -> [B, 2T, ...] with a at even and b at odd positions."""
    stacked = jnp.stack([a, b], axis=2)  # [B, T, 2, ...]
    return stacked.reshape(a.shape[0], 2 * a.shape[1], *a.shape[2:])


def parallel(kind: Plasticity, params: dict, u, x, *, state=None, chunk_size=64, reset=None):
    """The affine case (input site, hebb, identity activation, no alpha) on the gated delta
    rule's chunkwise form; equals `recurrent`.

    The plastic layer reads S_{t-1} before it writes, the cell reads after writing, so each token
    becomes two cell tokens: a read (q = x_t, no write) and a write (k = x_t, v = -lam u_t,
    beta = -eta / lam, decay lam); a reset before token t is a reset before its read.
    """
    if not kind.is_affine(per_synapse_alpha="alpha" in params):
        raise ValueError(f"{kind} is not affine in S: only the recurrent form exists")
    B, T, H, K = x.shape
    S0 = initial_state(kind, state, u, x)["S"]
    x32, u32 = x.astype(S0.dtype), u.astype(S0.dtype)
    log_lambda = params["log_lambda"].astype(S0.dtype)
    lam = jnp.exp(log_lambda)
    beta = jnp.broadcast_to(-params["eta"].astype(S0.dtype) / lam, (B, T, H))  # [B, T, H]
    zeros = jnp.zeros_like
    q = interleave(x32, zeros(x32))  # [B, 2T, H, K]
    k = interleave(zeros(x32), x32)
    v = interleave(zeros(u32), -lam[:, None] * u32)  # [B, 2T, H, V]
    beta = interleave(zeros(beta), beta)  # [B, 2T, H]
    log_decay = interleave(zeros(beta[:, :T]), jnp.broadcast_to(log_lambda, (B, T, H)))
    if reset is not None:
        reset = interleave(reset, jnp.zeros_like(reset))  # [B, 2T]
    o, S = gated_delta_rule.chunkwise(
        q, k, v, state=S0, chunk_size=chunk_size, reset=reset, beta=beta, log_alpha=log_decay
    )
    h = u32 + o[:, 0::2]  # the reads: (S_{t-1})^T x_t
    return h.astype(u.dtype), {"S": S}
