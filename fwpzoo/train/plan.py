"""`fwpzoo plan`: whether a run fits its devices, from its exact train step compiled ahead of time.

The train step `fwpzoo train` would run (same model, optimizer, mesh, shardings, donation) is
lowered on abstract inputs and compiled for a TPU topology (jax.experimental.topologies with
libtpu, no TPU needed) or for this host's CPU split into N devices. The compiler's memory
analysis gives the bytes one device holds: arguments (parameters, optimizer state, the batch
shard) + outputs - outputs aliased to donated arguments + temporaries; its cost analysis the
FLOPs of one device's step (a loop body, e.g. a chunk scan, is counted once, so the count is a
lower bound: use it to compare configs, not to predict time).
"""

import os
import re
import sys
import threading
import time
from dataclasses import dataclass

import jax

from fwpzoo.config import MESH_AXES, Config, ConfigError
from fwpzoo.platform import libtpu_installed, quiet_libtpu
from fwpzoo.train.loop import prepare
from fwpzoo.train.sharding import (
    batch_sharded,
    make_mesh,
    sequence_sharded,
    state_shardings,
)
from fwpzoo.train.state import abstract_train_state
from fwpzoo.train.steps import make_train_step

GiB = 2**30
# HBM of one device, by JAX's device kind: v5e as XLA:TPU states it ("available HBM (15.75G)");
# v5p and v6e as Cloud TPU's system architecture pages give a chip (95 and 32 GiB)
DEVICE_MEMORY = {"TPU v5 lite": int(15.75 * GiB), "TPU v5": 95 * GiB, "TPU v6 lite": 32 * GiB}


@dataclass(frozen=True)
class Target:
    """Where a plan compiles for: its name, its devices (concrete or a topology's), whether those
    are a TPU topology's, and the memory of one device."""

    name: str
    devices: list
    topology: object | None
    device_memory: int


def cpu_count_of(topology: str) -> int | None:
    """N of 'cpu:N', None for any other name; ConfigError for a malformed cpu:N."""
    if not topology.startswith("cpu:"):
        return None
    count = topology[4:]
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--topology {topology!r}: expected cpu:N with N >= 1, e.g. cpu:8")
    return int(count)


def target(topology: str) -> Target:
    """The devices of `topology`: 'cpu:N' (this host, split_cpu(N) already called) or a TPU
    topology name such as v5e:16x16; ConfigError naming what would work otherwise."""
    count = cpu_count_of(topology)
    if count is not None:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return Target(topology, jax.devices()[:count], None, ram // count)
    if not libtpu_installed():
        raise ConfigError(
            f"--topology {topology} needs libtpu: pip install -e '.[tpu]' (or plan for this "
            f"host with --topology cpu:N)"
        )
    quiet_libtpu()
    from jax.experimental import topologies

    try:
        described = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as error:  # libtpu's own error types
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(
            f"--topology {topology!r} is not a TPU topology libtpu knows ({reason}); e.g. "
            f"v5e:2x2, v5e:16x16, v5p:4x4x8, v6e:8x8, or cpu:N"
        ) from None
    kind = described.devices[0].device_kind
    if kind not in DEVICE_MEMORY:
        raise ConfigError(
            f"--topology {topology}: no memory size known for {kind}; known: "
            f"{', '.join(DEVICE_MEMORY)}"
        )
    return Target(topology, list(described.devices), described, DEVICE_MEMORY[kind])


def target_mesh(cfg: Config, where: Target):
    """The run's mesh over the target's devices (a TPU topology's in its physical order)."""
    shape = cfg.mesh.shape(len(where.devices))
    if where.topology is None:
        return make_mesh(len(where.devices), shape)
    from jax.experimental import topologies

    dims = tuple(shape[name] for name in MESH_AXES)
    return topologies.make_mesh(where.topology, dims, MESH_AXES)


def abstract_batch(task, cfg: Config, mesh) -> dict:
    """ShapeDtypeStructs of a global train batch on its shardings (one row drawn for the dtypes)."""
    row = task.train_batch(0, 1)

    def place(x):
        sharding = sequence_sharded(mesh) if x.ndim >= 2 else batch_sharded(mesh)
        shape = (cfg.train.batch_size, *x.shape[1:])
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=sharding)

    return {name: place(x) for name, x in row.items()}


class Progress:
    """One line on stderr while compiling: what, and the seconds so far (updated in place on a
    terminal)."""

    def __init__(self, text: str):
        self.text, self.start, self.done = text, time.perf_counter(), threading.Event()
        self.live = sys.stderr.isatty()

    def __enter__(self):
        print(f"fwpzoo plan: {self.text}", end="" if self.live else "\n", file=sys.stderr)
        if self.live:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self):
        while not self.done.wait(1.0):
            elapsed = time.perf_counter() - self.start
            print(f"\rfwpzoo plan: {self.text} {elapsed:.0f} s", end="", file=sys.stderr)

    def __exit__(self, *exc_info):
        self.done.set()
        elapsed = time.perf_counter() - self.start
        end = (
            f"\rfwpzoo plan: {self.text} {elapsed:.0f} s"
            if self.live
            else (f"fwpzoo plan: compiled in {elapsed:.0f} s")
        )
        print(end, file=sys.stderr)


def compile_step(cfg: Config, where: Target):
    """The compiled train step of `cfg` on the target's mesh, and that mesh."""
    mesh = target_mesh(cfg, where)
    run = prepare(cfg, mesh=mesh)
    state = abstract_train_state(cfg, run.task.vocab_size, run.optimizer, mesh)
    shardings = state_shardings(state, mesh)
    step = jax.jit(
        make_train_step(run.graphdef, run.optimizer, grad_accum=cfg.train.grad_accum),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    batch = abstract_batch(run.task, cfg, mesh)
    sizes = " ".join(f"{name}={size}" for name, size in dict(mesh.shape).items())
    text = f"compiling the train step for {where.name} (mesh {sizes})..."
    # compiled with the mesh set: a layer under mesh.context > 1 splits its sequence
    with Progress(text), jax.set_mesh(mesh):
        compiled = step.lower(state, batch).compile()
    return compiled, mesh


# XLA:TPU refuses to compile a program whose temporaries exceed the chip's memory, saying so:
# "... HLO temporaries (30.08G) exceeds available HBM (15.75G)"
TOO_LARGE = re.compile(r"temporaries \(([\d.]+)([KMG])\) exceeds available HBM \(([\d.]+)([KMG])\)")
UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}


def refused_plan(cfg: Config, topology: str, where: Target, error: Exception) -> dict | None:
    """The plan of a compile XLA refused for its temporaries (they alone exceed the chip):
    fits false, the temporaries as the bytes per device (a lower bound); None for any other
    error."""
    found = TOO_LARGE.search(str(error))
    if found is None:
        return None
    temporaries = int(float(found.group(1)) * UNITS[found.group(2)])
    available = int(float(found.group(3)) * UNITS[found.group(4)])
    return {
        "fits": False,
        "bytes_per_device": temporaries,
        "device_memory_bytes": available,
        "flops": None,
        "mesh": {name: int(size) for name, size in cfg.mesh.shape(len(where.devices)).items()},
        "topology": topology,
        "devices": len(where.devices),
        "remat": cfg.model.remat,
        "argument_bytes": 0,
        "output_bytes": 0,
        "alias_bytes": 0,
        "temp_bytes": temporaries,
    }


def plan(cfg: Config, topology: str) -> dict:
    """The plan of `cfg` on `topology`: {"fits", "bytes_per_device", "device_memory_bytes",
    "flops", "mesh", "topology", and the parts of the bytes}."""
    where = target(topology)
    try:
        compiled, mesh = compile_step(cfg, where)
    except jax.errors.JaxRuntimeError as error:
        refused = refused_plan(cfg, topology, where, error)
        if refused is None:
            raise
        return refused
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost  # one entry per program
    parts = {
        "argument_bytes": int(memory.argument_size_in_bytes),
        "output_bytes": int(memory.output_size_in_bytes),
        "alias_bytes": int(memory.alias_size_in_bytes),
        "temp_bytes": int(memory.temp_size_in_bytes),
    }
    total = (
        parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"] + parts["temp_bytes"]
    )
    return {
        "fits": total <= where.device_memory,
        "bytes_per_device": total,
        "device_memory_bytes": where.device_memory,
        "flops": float(cost.get("flops", 0.0)),
        "mesh": {name: int(size) for name, size in dict(mesh.shape).items()},
        "topology": topology,
        "devices": len(where.devices),
        "remat": cfg.model.remat,
        **parts,
    }


def advice(cfg: Config, result: dict) -> str:
    """One line: by how much a plan misses, and the change that helps most, read off which part
    of the bytes dominates (parameters and optimizer state fall as 1 / fsdp; temporaries with
    model.remat and as 1 / context in the sequence)."""
    over = result["bytes_per_device"] - result["device_memory_bytes"]
    resident = result["argument_bytes"]
    temporaries = result["temp_bytes"]
    mesh = result["mesh"]
    if resident >= temporaries:
        if mesh["data"] > 1:
            fsdp = mesh["fsdp"] * mesh["data"]
            change = f"shard them over more devices: mesh.fsdp={fsdp} mesh.data=1"
        else:
            change = "a larger topology (mesh.fsdp over more devices)"
        what = f"parameters, optimizer state and batch {resident / GiB:.2f} GiB"
    else:
        if cfg.model.remat == "none":
            change = "model.remat=block"
        elif mesh["data"] > 1:
            change = f"mesh.context={mesh['context'] * 2} (halves each device's tokens)"
        else:
            change = "a smaller train.batch_size per step (train.grad_accum)"
        what = f"temporaries {temporaries / GiB:.2f} GiB"
    return (
        f"does not fit: {result['bytes_per_device'] / GiB:.2f} GiB per device against "
        f"{result['device_memory_bytes'] / GiB:.2f} GiB ({over / GiB:.2f} GiB over); the larger "
        f"part is {what}: try {change}"
    )


def report(result: dict) -> list[str]:
    """The human-readable lines of a plan."""
    mesh = " ".join(f"{name}={size}" for name, size in result["mesh"].items())
    return [
        f"topology {result['topology']}: {result['devices']} devices, mesh {mesh}, "
        f"remat {result['remat']}",
        f"per device: arguments {result['argument_bytes'] / GiB:.3f} GiB, outputs "
        f"{result['output_bytes'] / GiB:.3f} GiB ({result['alias_bytes'] / GiB:.3f} GiB of them "
        f"donated arguments' buffers), temporaries {result['temp_bytes'] / GiB:.3f} GiB",
        f"total {result['bytes_per_device'] / GiB:.3f} GiB of "
        f"{result['device_memory_bytes'] / GiB:.2f} GiB: "
        + ("fits" if result["fits"] else "does not fit"),
        "compiler FLOPs per device per step: "
        + ("none: XLA refused the program" if result["flops"] is None else f"{result['flops']:.4g}")
        + " (each loop body counted once)",
    ]
