"""The mesh checks of tests/test_scale.py, in one process over 8 CPU devices (they need a device
count the test process does not have). Prints one JSON object of measurements on its last line.

    python tests/scale_worker.py WORKDIR [--full]
"""

import dataclasses
import json
import re
import sys
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from fwpzoo import cells  # noqa: E402
from fwpzoo.config import Config, from_dict  # noqa: E402
from fwpzoo.layers import get_mixer  # noqa: E402
from fwpzoo.platform import libtpu_installed  # noqa: E402
from fwpzoo.train import plan  # noqa: E402
from fwpzoo.train.loop import prepare, train  # noqa: E402
from fwpzoo.train.sharding import make_mesh, shard_batch, state_shardings, under_mesh  # noqa: E402
from fwpzoo.train.state import init_train_state  # noqa: E402
from fwpzoo.train.steps import make_train_step  # noqa: E402

T, B = 32, 8  # tokens per row (context=4: 8 per device, two chunks of 4), rows per batch
# resets at the start, on the context=2 and context=4 shard edges and one token on either side;
# ACROSS: the same but none on an edge, so that every edge passes a state on (the summaries'
# fold), which a reset on the edge makes irrelevant
RESETS = (0, 7, 8, 9, 16, 23, 24, 25)
ACROSS = (0, 7, 9, 23, 25)


def reset_rows(rows: int) -> np.ndarray:
    """[rows, T] bool: RESETS in the even rows, ACROSS in the odd ones."""
    reset = np.zeros((rows, T), bool)
    reset[0::2, list(RESETS)] = True
    reset[1::2, list(ACROSS)] = True
    return reset


MESHES = {
    "data=8": {"data": 8},
    "data=2 fsdp=4": {"data": 2, "fsdp": 4},
    "data=2 tensor=2 context=2": {"data": 2, "tensor": 2, "context": 2},
    "fsdp=2 context=4": {"data": 1, "fsdp": 2, "context": 4},
}
# the suite's share (compile time): a left-matrix rule and the log-scale one (the mLSTM's max
# stabiliser), mamba2 with its decay of either sign (its own summary; the other range is the
# cell's) and the complex SSM, and the mesh with data, tensor and context at once (fsdp: the
# resumed run's)
SOME = ("delta_rule", "mlstm")
OTHER_LAYERS = {
    "mamba2": {"mixer": "mamba2"},
    # dt drawn larger than by default, so that A dt > log 2 makes some decays negative
    "mamba2 -1,1": {"mixer": "mamba2", "decay_range": "-1,1", "decay_dt_range": [0.1, 1.0]},
    "ssm": {"mixer": "ssm"},
    "ssm real": {"mixer": "ssm", "ssm_complex": False},
}
SOME_OTHER = ("mamba2 -1,1", "ssm")
SUITE_MESHES = ("data=8", "data=2 tensor=2 context=2")
HYBRID = [
    {"mixer": "fwp", "cell": "delta_rule"},
    {"mixer": "fwp", "cell": "gated_delta_rule", "decay": "per_key"},
    "attention",
]


def config(mesh: dict, mixers=HYBRID, seq_len: int = T, **train) -> Config:
    """A tiny run of `mixers` on MQAR under `mesh`, its learning rate constant (warmup 0, no
    decay), so a run resumed with more steps follows the same schedule."""
    model = {"mixers": mixers, "d_model": 16, "num_heads": 2, "chunk_size": 4, "mlp_ratio": 2}
    return from_dict(
        Config,
        {
            "model": model,
            "data": {"task": "mqar", "seq_len": seq_len, "vocab_size": 32, "num_pairs": 4},
            "train": {"batch_size": B, "warmup_steps": 0, "end_learning_rate_ratio": 1.0, **train},
            "eval": {"batch_size": B, "num_batches": 1, "every": 100},
            "checkpoint": {"async_save": False, "best_metric": None},
            "mesh": mesh,
        },
    )


def with_resets(batch: dict) -> dict:
    reset = np.zeros(batch["inputs"].shape, bool)
    reset[:, list(RESETS)] = True
    return {**batch, "reset": reset}


def step_fn(run, state):
    step = make_train_step(run.graphdef, run.optimizer, grad_accum=1)
    jitted = jax.jit(step, out_shardings=(state_shardings(state, run.mesh), None))
    return under_mesh(jitted, run.mesh)


def keeping_gradients(optimizer):
    """optimizer (the same updates) whose state also holds the last step's gradients, at
    state["opt_state"][1]."""

    def update(grads, state, params=None):
        updates, inner = optimizer.update(grads, state[0], params)
        return updates, (inner, grads)

    return optax.GradientTransformation(
        lambda params: (optimizer.init(params), jax.tree.map(jnp.zeros_like, params)), update
    )


def trainer(mesh: dict):
    """(run, initial train state, jitted train step) of the hybrid under `mesh`; its optimizer
    keeps the gradients (keeping_gradients)."""
    cfg = config(mesh)
    run = prepare(cfg)
    run = dataclasses.replace(run, optimizer=keeping_gradients(run.optimizer))
    state = init_train_state(cfg, run.task.vocab_size, run.optimizer, run.mesh)
    return run, state, step_fn(run, state)


def losses(mesh: dict, steps: int = 10, resets: bool = True, trained=None) -> list[float]:
    """The losses of `steps` train steps of the hybrid under `mesh` (`trained`: its trainer,
    already compiled), as the trainer takes them (with RESETS in every row, or the task's rows
    as they are). Not reset_rows' crossing rows: there the loss's gradient is ill-conditioned
    once the first step has moved the parameters (measured on data=8 alone: parameters
    rounded differently by relative 1e-7 noise move the second step's gradient by 1.1e-3
    relative, the first's by 8e-6), so any two float32 programs that round differently part
    ways (context=2: 3e-5 in the losses by step 10, with SGD as with AdamW, while data=2 x
    fsdp=4, rounding alike, stays at 6e-8). first_step checks the state crossing the edges."""
    run, state, step = trained or trainer(mesh)
    out = []
    for index in range(steps):
        batch = run.task.train_batch(index, B)
        batch = with_resets(batch) if resets else batch
        state, metrics = step(state, shard_batch(batch, run.mesh))
        out.append(float(metrics["loss"]))
    return out


def first_step(trained) -> tuple[float, list[np.ndarray]]:
    """The loss and gradients of a trainer's first step on reset_rows' rows (the state crosses
    every shard edge: the summaries' fold and the conv halo in the loss's gradients)."""
    run, state, step = trained
    batch = {**run.task.train_batch(0, B), "reset": reset_rows(B)}
    state, metrics = step(state, shard_batch(batch, run.mesh))
    return float(metrics["loss"]), [np.asarray(g) for g in jax.tree.leaves(state["opt_state"][1])]


def relative(a, b) -> float:
    """Relative RMS difference of b from a (as tests/test_cells.py measures the forms)."""
    return float(np.linalg.norm(a - b) / (np.linalg.norm(a) + 1e-30))


def layer_difference(entry: dict) -> float:
    """Largest relative RMS difference between a layer (a mixers entry: an FWP cell, mamba2,
    the SSM) run whole and with its sequence over context=4 (data=2): outputs, final state and
    the gradients of both in its parameters and input, with reset_rows."""
    cfg = config({}, mixers=[entry]).model.layers()[0]
    mixer = get_mixer(cfg.mixers[0])(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mixer)
    x = jax.random.normal(jax.random.key(1), (2, T, 16))
    reset = jnp.asarray(reset_rows(2))

    def run(params, x):
        y, cache, _ = nnx.merge(graphdef, params)._sequence(x, None, reset)
        return y, cache.state

    def everything(params, x):
        (y, state), pullback = jax.vjp(run, params, x)
        return y, state, pullback((jnp.cos(y), jax.tree.map(jnp.sin, state)))

    whole = jax.jit(everything)(params, x)
    mesh = make_mesh(8, {"data": 2, "context": 4})
    split = under_mesh(jax.jit(everything), mesh)(params, x)
    diffs = [  # relative RMS error, as tests/test_cells.py measures the forms
        float(jnp.linalg.norm(a - b) / (jnp.linalg.norm(a) + 1e-30))
        for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(split), strict=True)
    ]
    return max(diffs)


def largest_all_gathers(seq_len: int) -> list[int]:
    """Elements of each all-gather in the compiled train step of a DeltaNet / mamba2 / SSM
    model under fsdp=2 x context=4 at `seq_len` tokens, largest first."""
    mixers = ["fwp", "mamba2", "ssm"]
    cfg = config({"data": 1, "fsdp": 2, "context": 4}, mixers=mixers, seq_len=seq_len)
    run = prepare(cfg)
    state = init_train_state(cfg, run.task.vocab_size, run.optimizer, run.mesh)
    batch = shard_batch(run.task.train_batch(0, B), run.mesh)
    step = jax.jit(make_train_step(run.graphdef, run.optimizer, grad_accum=1))
    with jax.set_mesh(run.mesh):
        hlo = step.lower(state, batch).compile().as_text()
    sizes = []
    for line in hlo.splitlines():
        match = re.search(r"= \w+\[([\d,]*)\][^ ]* all-gather\(", line)
        if match:
            dims = [int(d) for d in match.group(1).split(",") if d]
            sizes.append(int(np.prod(dims)))
    return sorted(sizes, reverse=True)


def resumed_losses(workdir: Path) -> list[float]:
    """Losses of the hybrid trained 5 steps under data=2 x fsdp=4, then resumed to 10 under
    data=8, through the trainer (checkpoints and all)."""
    train(config({"data": 2, "fsdp": 4}, steps=5, log_every=1), workdir, progress=False)
    train(config({"data": 8}, steps=10, log_every=1), workdir, progress=False)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


def main(workdir: str, flags) -> None:
    """The suite's checks; with --full, every mesh of MESHES, every affine cell and a plan on a
    TPU topology too (libtpu installed), at several times the compile time."""
    full = "--full" in flags
    meshes = MESHES if full else {name: MESHES[name] for name in SUITE_MESHES}
    out, whole = {"losses": {}, "first_step": {}}, None
    for name, mesh in meshes.items():  # data=8 first: the reference
        trained = trainer(mesh)
        out["losses"][name] = said(name, losses(mesh, trained=trained))
        loss, grads = first_step(trained)
        whole = whole or (loss, grads)
        differences = [relative(a, b) for a, b in zip(whole[1], grads, strict=True)]
        out["first_step"][name] = said(f"{name} first step", [loss, max(differences)])
    checked = [cell for cell in cells.CELLS if affine(cell)] if full else SOME
    layers = {cell: {"mixer": "fwp", "cell": cell} for cell in checked}
    layers |= {name: OTHER_LAYERS[name] for name in (OTHER_LAYERS if full else SOME_OTHER)}
    out["cells"] = {name: said(name, layer_difference(entry)) for name, entry in layers.items()}
    out["all_gathers"] = {n: said(f"T={n}", largest_all_gathers(n)[:3]) for n in (T, 2 * T)}
    out["activations"] = {n: B * n * 16 for n in (T, 2 * T)}  # a layer's [B, T, D]
    out["resumed"] = said("resumed", resumed_losses(Path(workdir) / "resume"))
    out["uninterrupted"] = said("uninterrupted", losses({"data": 8}, resets=False))
    out["plan"] = {"cpu:8": plan.plan(config({"data": 2, "fsdp": 4}, mixers=["fwp"]), "cpu:8")}
    if full and libtpu_installed():
        tiny = config({"data": 1, "fsdp": 2, "context": 2}, mixers=["fwp"])
        out["plan"]["v5e:2x2"] = plan.plan(tiny, "v5e:2x2")
    print(json.dumps(out))


def said(what: str, value):
    """value, its step named on stderr (what a failing test shows of this process)."""
    print(f"scale_worker: {what}: {value}", file=sys.stderr, flush=True)
    return value


def affine(cell: str) -> bool:
    from fwpzoo.cells._spec import NOT_AFFINE

    return cells.get(cell).OBJECTIVE.state.transition != NOT_AFFINE


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
