"""Data parallelism: one Mesh over every device of every process, batch split on its "data" axis.

Parameters and optimizer state are replicated; jit's SPMD partitioner adds the gradient all-reduce.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fwpzoo.config import ConfigError


def split_cpu(count: int) -> None:
    """Present the host CPU as `count` devices; call before any JAX operation.

    XLA:CPU runs each device's scans, and so every chunkwise cell, on one thread; one CPU device
    per core is how a data-parallel run keeps every core busy. Accelerators are unaffected.
    """
    if count < 1:
        raise ConfigError(f"--cpu-devices must be >= 1, got {count}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:
        raise ConfigError("--cpu-devices must be set before JAX starts its backends") from None


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices, in jax.devices() order (process by process)."""
    return Mesh(np.array(jax.devices()), ("data",))


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
