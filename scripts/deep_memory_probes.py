"""Two probes behind docs/results/deep_memory.md's notes, no training.

`inner CONFIG [key=value ...]`: a deep_memory config at initialisation (the weights training
draws from train.seed, one training batch of 16 sequences of 128 tokens): per layer, the largest
norm of the cell's state parts (the fast net's parameters and the optimiser's momenta; RMS over
the batch and heads) after 64 and after 128 tokens. A preset whose inner steps overflow shows it
here, before any training (e.g. deep_mlp at beta_init 0.1: 3e12 within 64 tokens).

`ttt`: can a memory hold a linear map y = w . x from n in-context pairs? The cells alone, float64:
keys k = x / |x| (x in {-1, 1}^6 padded to K = 32), values v = y u (u a fixed vector of norm 5,
about the layer's |v|), n pairs written in mini-batches of 16; fresh queries read the final
state, and y is decoded from the reads by least squares over 512 sequences (fit on half, scored
on the other). Normalised error: mean (y_hat - y)^2 / mean y^2 (1: predicting 0). Rows: the delta
rule (beta 0.5); TTT-Linear as our cell runs it (zero start, eta 0.5); with TTT's published eta
scale (base_lr 1 / head_dim: 0.5 / 32); with a start W0 ~ N(0, 0.02) as TTT's learned W1 starts;
both; and the same mini-batches without the LayerNorm (W -= eta sum_s k_s (k_s W - v_s)^T).

    python scripts/deep_memory_probes.py inner configs/experiments/deep_memory/deep_mlp.yaml
    python scripts/deep_memory_probes.py ttt
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from fwpzoo import config
from fwpzoo.cells import get
from fwpzoo.cells.deep.ttt_linear import _read
from fwpzoo.data import make_task
from fwpzoo.train.state import new_model


def layer_inputs(model, tokens) -> list[tuple]:
    """Every block's (mixer, cell inputs {"q", "k", "v", gates...}) for tokens [B, T]."""
    x, out = model.embed(tokens), []
    for block in model.blocks:
        out.append((block.mixer, block.mixer.cell_inputs(block.mixer_norm(x))))
        x = block(x)
    return out


def largest_norm(state) -> float:
    """The largest RMS norm (over batch and heads) of a state's parts, the window buffer aside."""
    norms = [
        jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x.reshape(*x.shape[:2], -1)), -1)))
        for name, x in state.items()
        if not name.startswith("past")
    ]
    return float(max(norms))


def inner(path: str, overrides: list[str]) -> None:
    cfg = config.load(path, [*overrides, "data.seq_len=128"])
    task = make_task(cfg.data, cfg.train.seed)
    model = new_model(cfg, task.vocab_size)
    tokens = jnp.asarray(task.train_batch(0, 16)["inputs"])  # [16, 128]
    for i, (mixer, x) in enumerate(layer_inputs(model, tokens)):
        cut = {n: a[:, :64] if a.ndim >= 3 else a for n, a in x.items()}  # static gates whole
        cell, options = get(mixer.cell), dict(mixer.options)
        sizes = []
        for inputs in (cut, x):
            _, state = cell.chunkwise(**inputs, chunk_size=mixer.chunk_size, **options)
            sizes.append(largest_norm(state))
        print(f"layer {i}: largest state norm {sizes[0]:.3g} at 64 tokens, {sizes[1]:.3g} at 128")


def ttt_probe(n: int, rng, variant: dict, sequences=512, d=6, K=32, queries=16) -> float:
    """The normalised error of y decoded from a memory of n pairs (see the module docstring)."""
    w = rng.integers(-1, 2, (sequences, d))
    x = rng.choice([-1.0, 1.0], (sequences, n + queries, d))
    y = np.einsum("bnd,bd->bn", x, w)
    features = np.zeros((sequences, n + queries, K))
    features[..., :d] = x / np.sqrt(d)
    u = np.zeros(K)
    u[-1] = 5.0
    k = jnp.asarray(features[:, :n, None])  # [S, n, 1, K]
    v = jnp.asarray(y[:, :n, None, None] * u)  # [S, n, 1, K]
    q = jnp.asarray(features[:, n:])  # [S, queries, K]
    eta = variant.get("eta", 0.5)
    if variant.get("rule") == "delta_rule":
        _, S = get("delta_rule").recurrent(k, k, v, beta=jnp.full(k.shape[:3], 0.5))
        reads = q @ S[:, 0]
    elif variant.get("no_layer_norm"):
        W = jnp.zeros((sequences, K, K))
        for start in range(0, n, 16):
            ks, vs = k[:, start : start + 16, 0], v[:, start : start + 16, 0]
            W = W - eta * ks.mT @ (ks @ W - vs)
        reads = q @ W
    else:
        state = None
        if "w0_std" in variant:
            W0 = variant["w0_std"] * jax.random.normal(jax.random.PRNGKey(1), (1, K, K))
            state = {"W": jnp.broadcast_to(W0, (sequences, 1, K, K)), "b": jnp.zeros((1, 1, K))}
            state["b"] = jnp.broadcast_to(state["b"], (sequences, 1, K))
        ln_w, ln_b = jnp.ones((1, K)), jnp.zeros((1, K))
        gate = jnp.full(k.shape[:3], eta)
        norm = {"ln_w": ln_w, "ln_b": ln_b}
        _, state = get("ttt_linear").recurrent(
            k, k, v, state=state, eta=gate, **norm, mini_batch=16
        )
        reads = _read(state["W"][:, :1], state["b"][:, :1], q, ln_w[0], ln_b[0])
    reads = np.asarray(reads).reshape(-1, K)
    design = np.concatenate([reads, np.ones((len(reads), 1))], axis=1)
    target, half = y[:, n:].reshape(-1), len(reads) // 2
    coefficients, *_ = np.linalg.lstsq(design[:half], target[:half], rcond=None)
    error = design[half:] @ coefficients - target[half:]
    return float(np.mean(error**2) / np.mean(target[half:] ** 2))


VARIANTS = {
    "delta_rule (beta 0.5)": {"rule": "delta_rule"},
    "ttt_linear (zero start, eta 0.5)": {},
    "ttt_linear, eta 0.5 / 32": {"eta": 0.5 / 32},
    "ttt_linear, W0 ~ N(0, 0.02)": {"w0_std": 0.02},
    "ttt_linear, both": {"eta": 0.5 / 32, "w0_std": 0.02},
    "mini-batches of 16 without the LayerNorm": {"no_layer_norm": True},
}


def main(argv: list[str]) -> None:
    if argv[:1] == ["inner"] and len(argv) >= 2:
        return inner(argv[1], argv[2:])
    if argv != ["ttt"]:
        sys.exit("usage: deep_memory_probes.py inner CONFIG [key=value ...] | ttt")
    jax.config.update("jax_enable_x64", True)
    pairs = (16, 32, 64)
    print("| memory | " + " | ".join(f"{n} pairs" for n in pairs) + " |")
    print("|---|" + "---:|" * len(pairs))
    for name, variant in VARIANTS.items():
        rng = np.random.default_rng(0)
        errors = [ttt_probe(n, rng, variant) for n in pairs]
        print(f"| {name} | " + " | ".join(f"{e:.3f}" for e in errors) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
