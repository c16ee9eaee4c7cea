"""`fwpzoo bench cells --topology NAME`: every family's chunkwise forward and forward + backward
compiled ahead of time for a TPU topology (libtpu from the `tpu` extra, no TPU needed), with
the memory one device holds, without running anything.

The inputs are those the timed benchmark draws (bench/cells.py: B, T, H, K, V from its options)
as abstract arrays, the batch split over the topology's devices; the chunkwise forms are traced
with the chunk engine's accelerator layout (cells/chunked/engine.compiling_for), every chunk of a
sequence prepared at once and only the state scanned. Per device: arguments + outputs -
aliased + temporaries, from XLA's memory analysis (bench/_common.footprint_bytes). The
compiler's FLOP count is left out: a loop body is counted once.
"""

import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fwpzoo.bench._common import footprint_bytes
from fwpzoo.cells.chunked import engine
from fwpzoo.config import ConfigError
from fwpzoo.train.plan import target


def abstract_inputs(inputs, mesh):
    """ShapeDtypeStructs of (q, k, v, gates): [B, ...] arrays split over the mesh's data axis,
    static gates ([H, K], no batch axis) replicated."""
    split = NamedSharding(mesh, PartitionSpec("data"))
    whole = NamedSharding(mesh, PartitionSpec())

    def abstract(x, batched):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split if batched else whole)

    q, k, v, gates = inputs
    batch = q.shape[0]
    gates = {name: abstract(x, x.ndim > 2 and x.shape[0] == batch) for name, x in gates.items()}
    return abstract(q, True), abstract(k, True), abstract(v, True), gates


def compile_rows(cases, directions: dict, topology: str, batch: int, progress=print) -> list[dict]:
    """One row per case: the per-device bytes and compile seconds of each direction for
    `topology`. cases yields (family, T, chunk, form, inputs): form (q, k, v, **gates) -> (o,
    state), inputs (q, k, v, gates) arrays of the case's shape; directions maps a name ("fwd",
    "fwd+bwd") to make(form) -> the function to compile on the inputs."""
    where = target(topology)
    if where.topology is None:
        raise ConfigError(f"--topology {topology!r}: name a TPU topology, e.g. v5e:2x2")
    if batch % len(where.devices):
        raise ConfigError(
            f"--batch {batch} is not divisible by the {len(where.devices)} devices of {topology}"
        )
    mesh = Mesh(np.asarray(where.devices), ("data",))
    rows = []
    for family, T, chunk, form, inputs in cases:
        args = abstract_inputs(inputs, mesh)
        row = {"family": family, "T": T, "chunk": chunk, "topology": topology}
        for direction, make in directions.items():
            start = time.perf_counter()
            with engine.compiling_for("tpu"):
                compiled = jax.jit(make(form)).lower(*args).compile()
            row[direction + " bytes"] = footprint_bytes(compiled)
            row[direction + " compile s"] = time.perf_counter() - start
        progress(line(row, where.device_memory))
        rows.append(row | {"device_memory": where.device_memory})
    return rows


def line(row: dict, device_memory: int) -> str:
    cells_ = [row["family"], str(row["T"]), f"C={row['chunk']}"]
    for direction in ("fwd", "fwd+bwd"):
        held = row[direction + " bytes"]
        share = "" if held is None else f" ({held / device_memory:.1%})"
        cells_.append("-" if held is None else f"{held / 2**20:.1f} MiB{share}")
        cells_.append(f"{row[direction + ' compile s']:.1f}")
    return "| " + " | ".join(cells_) + " |"


def markdown(rows: list[dict], topology: str, command: str) -> str:
    memory = rows[0]["device_memory"] if rows else 0
    header = [
        f"Command: `{command}`",
        "",
        f"Compiled ahead of time for {topology} ({memory / 2**30:.0f} GiB per device), nothing "
        "run; per device: arguments + outputs - aliased + temporaries (XLA's memory analysis), and "
        "the share of the device's memory.",
        "",
        "| family | T | chunk | fwd per device | compile s | fwd+bwd per device | compile s |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    return "\n".join(header + [line(row, row["device_memory"]) for row in rows]) + "\n"
