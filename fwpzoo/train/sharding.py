"""Data parallelism: one Mesh over every device of every process, batch split on its "data" axis.

Parameters and optimizer state are replicated; jit's SPMD partitioner adds the gradient all-reduce.
"""

import os
import sys
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fwpzoo.config import ConfigError


def split_cpu(count: int) -> None:
    """Present the host CPU as `count` devices; call before any JAX operation.

    XLA:CPU runs each device's scans, and so every chunkwise cell, on one thread; one CPU device
    per core is how a data-parallel run keeps every core busy (use_cpu_devices picks that count).
    Accelerators are unaffected.
    """
    if count < 1:
        raise ConfigError(f"--cpu-devices must be >= 1, got {count}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        raise ConfigError("--cpu-devices must be set before JAX starts its backends") from None


def cpu_cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def device_count_set_elsewhere() -> bool:
    """Whether the CPU device count was already chosen: by XLA_FLAGS, JAX_NUM_CPU_DEVICES, an
    earlier jax.config.update, or because JAX's backends have started (then it is fixed)."""
    from jax._src import xla_bridge

    return (
        "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
        or jax.config.jax_num_cpu_devices != -1
        or xla_bridge.backends_are_initialized()
    )


def dividing_count(most: int, sizes, processes: int = 1) -> int:
    """The largest n <= most such that every size divides by n * processes (at least 1)."""
    fits = lambda n: all(size % (n * processes) == 0 for size in sizes)  # noqa: E731
    return max(n for n in range(1, most + 1) if n == 1 or fits(n))


def use_cpu_devices(
    requested: int | None, batches: Mapping[str, int], *, processes: int = 1
) -> None:
    """`requested` CPU devices if given, else one per core: the largest count up to the cores
    that divides every batch in `batches` (name -> size) over all `processes`' devices, said in
    one line on stderr when that is fewer than the cores. Call before any JAX operation; a count
    chosen elsewhere (see device_count_set_elsewhere) is left as it is."""
    if requested is not None:
        split_cpu(requested)
        return
    if device_count_set_elsewhere():
        return
    cores = cpu_cores()
    count = dividing_count(cores, batches.values(), processes)
    if count < cores:
        sizes = ", ".join(f"{name} = {size}" for name, size in batches.items())
        print(
            f"fwpzoo: {sizes}: not divisible by {cores * processes} CPU devices (one per core); "
            f"using {count * processes}",
            file=sys.stderr,
        )
    split_cpu(count)


def make_mesh(count: int | None = None) -> Mesh:
    """A 1-D mesh over all devices (or the first `count`), in jax.devices() order (process by
    process)."""
    return Mesh(np.array(jax.devices()[:count]), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A global batch of host arrays [B, ...] -> global jax Arrays split over the "data" axis.

    Every process holds the same global batch (the data stream is a pure function of seed and
    index) and feeds only the rows of its own devices.
    """
    sharding = batch_sharded(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {name: put(x) for name, x in batch.items()}


def to_host(tree):
    """Replicated jax Arrays -> numpy, in any process (a global array may not be fully local)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
