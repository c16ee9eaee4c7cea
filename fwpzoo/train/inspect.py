"""Pictures of fast weights from a checkpoint: `fwpzoo inspect --workdir DIR`.

The checkpointed model reads a prompt one token at a time through the cells' `step`; for one
layer and head the page shows S_t as heatmaps at a few steps, ||S_t||_F for every head, the
singular values of S_t with its effective rank (exp of the entropy of the normalised singular
values; Roy & Vetterli 2007), and the gates each token set (write strength beta, decay,
learning rate).
"""

import tempfile
from pathlib import Path

import jax
import matplotlib
import numpy as np
from flax import nnx

from fwpzoo.config import ConfigError
from fwpzoo.data.tokenizer import decode
from fwpzoo.models.inspection import fast_weight_layers, trace
from fwpzoo.train.restore import restore_run
from fwpzoo.train.sample import parse_prompt, text_task

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402

HEATMAPS = 4  # steps shown as heatmaps, evenly spaced over the prompt
MAX_DEFAULT_PROMPT = 128  # tokens of the first valid sequence used when no prompt is given


def default_prompt(task) -> np.ndarray:
    """The start of the first valid sequence."""
    return next(task.eval_batches("valid", 1, 1))["inputs"][0, :MAX_DEFAULT_PROMPT]


def choose_layer(model, mixers: list[str], layer: int | None) -> int:
    """`layer`, or the first with fast weights; ConfigError naming the valid ones otherwise, with
    each layer's mixer as the config names it (`mixers`)."""
    valid = fast_weight_layers(model)
    listing = ", ".join(f"{i} ({mixers[i]})" for i in valid) or "none"
    if layer is None:
        if not valid:
            raise ConfigError(f"no layer has fast weights (mixers: {', '.join(mixers)})")
        return valid[0]
    if not 0 <= layer < len(model.blocks):
        raise ConfigError(
            f"--layer {layer} is out of range; the model has layers 0..{len(model.blocks) - 1}, "
            f"those with fast weights: {listing}"
        )
    if layer not in valid:
        raise ConfigError(
            f"layer {layer} ({mixers[layer]}) has no fast-weight matrix to draw; "
            f"layers with one: {listing}"
        )
    return layer


def effective_rank(singular_values: np.ndarray) -> np.ndarray:
    """exp(entropy of s / sum s) over the last axis; 0 for an all-zero matrix."""
    total = singular_values.sum(-1, keepdims=True)
    p = np.divide(singular_values, total, out=np.zeros_like(singular_values), where=total > 0)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return np.where(total[..., 0] > 0, np.exp(entropy), 0.0)


def plot(path: Path, S, gates, head: int, labels: list[str], title: str) -> dict:
    """The page for S [T, H, K, V] and gates {name: [T, H]}; returns the summary numbers."""
    T = S.shape[0]
    norms = np.sqrt(np.sum(S**2, axis=(-2, -1)))  # [T, H]
    singular = np.linalg.svd(S[:, head], compute_uv=False)  # [T, min(K, V)]
    ranks = effective_rank(singular)  # [T]
    steps = sorted({int(round(s)) for s in np.linspace(0, T - 1, min(HEATMAPS, T))})
    fig = plt.figure(figsize=(14, 7.2))
    grid = fig.add_gridspec(2, 12, height_ratios=[1.1, 1], hspace=0.45, wspace=2.4)
    bound = float(np.max(np.abs(S[steps, head]))) or 1.0
    for i, t in enumerate(steps):
        ax = fig.add_subplot(grid[0, 3 * i : 3 * i + 3])
        image = ax.imshow(S[t, head], cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto")
        ax.set(title=f"S after token {t} {labels[t]}", xlabel="value / post (V)")
        ax.set_ylabel("key / pre (K)" if i == 0 else "")
    fig.colorbar(image, ax=fig.axes[: len(steps)], shrink=0.8)
    tokens = np.arange(T)
    panels = [fig.add_subplot(grid[1, 3 * i : 3 * i + 3]) for i in range(4)]
    for h in range(S.shape[1]):
        panels[0].plot(tokens, norms[:, h], lw=2.2 if h == head else 0.8, label=f"head {h}")
    panels[0].set(title="||S_t||_F", xlabel="token")
    panels[0].legend(fontsize=7)
    panels[1].plot(tokens, singular, lw=0.8)
    panels[1].set(title=f"singular values, head {head}", xlabel="token", yscale="symlog")
    panels[2].plot(tokens, ranks, "k")
    panels[2].set(title=f"effective rank, head {head}", xlabel="token", ylim=(0, None))
    for name, values in gates.items():
        panels[3].plot(tokens, values[:, head], label=name)
    panels[3].set(title=f"gates, head {head}", xlabel="token")
    if gates:
        panels[3].legend(fontsize=7)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {
        "steps_drawn": steps,
        "final_norm": float(norms[-1, head]),
        "final_effective_rank": float(ranks[-1]),
        "max_effective_rank": float(ranks.max()),
    }


def check_writable(path: Path) -> None:
    """ConfigError, before anything is computed, if the picture cannot be written at `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png"):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot write {path} ({error.strerror or error}); choose another file with --out"
        ) from None


def token_labels(tokens: np.ndarray, task) -> list[str]:
    if text_task(task) and task.tokenizer is not None:
        return [repr(decode(task.tokenizer, [t])) for t in tokens]
    if text_task(task):
        return [repr(bytes([int(t)]).decode("latin-1")) for t in tokens]
    return [f"({int(t)})" for t in tokens]


def inspect(workdir: Path, step, prompt, layer, head, out) -> dict:
    """Draws the fast weights of a checkpoint; the summary of what was drawn."""
    run, step, model_state = restore_run(workdir, step)
    model = nnx.merge(run.graphdef, model_state["params"], model_state["rest"])
    mixers = [entry.mixers[0] for entry in run.cfg.model.layers()]  # also per-layer mappings
    layer = choose_layer(model, mixers, layer)
    H = model.blocks[layer].mixer.H  # the layer's own heads (value heads where grouped)
    if not 0 <= head < H:
        raise ConfigError(f"--head {head} is out of range; valid heads: 0..{H - 1}")
    tokens = default_prompt(run.task) if prompt is None else parse_prompt(prompt, run.task)
    out = Path(out) if out else Path(workdir) / f"fast_weights-layer{layer}-head{head}.png"
    check_writable(out)
    records = jax.device_get(trace(model, np.asarray(tokens, np.int32), layer))
    S = np.asarray(records["S"], np.float64)  # [T, H, K, V]
    gates = {name: np.asarray(g, np.float64) for name, g in records["gates"].items()}
    mixer = mixers[layer]
    title = f"{Path(workdir).name} step {step}: layer {layer} ({mixer}), head {head}"
    summary = plot(out, S, gates, head, token_labels(tokens, run.task), title)
    return {
        "workdir": str(workdir),
        "step": step,
        "layer": layer,
        "mixer": mixer,
        "head": head,
        "prompt_tokens": len(tokens),
        "state_shape": list(S.shape[1:]),
        "gates": sorted(gates),
        "out": str(out),
        **summary,
    }
