"""The device mesh and where every array lives on it.

One Mesh with axes (data, fsdp, tensor, context) over every device of every process (MeshConfig).
Every parameter has logical axis names (vocab, embed, heads, kv, mlp, expert, conv, state),
given by the end of its path in LOGICAL_AXES (or BESIDE, for a name two modules use alike); RULES
maps them to mesh axes: heads and the MLP's hidden axis over `tensor`, then the largest remaining
axis of each parameter over `fsdp` (an axis that does not divide by its mesh axis stays whole).
The optimizer state of a parameter has the parameter's sharding. The batch is split over (data,
fsdp) and, with context > 1, the sequence over `context`. jit's SPMD partitioner places the
collectives (all-gathers of FSDP shards, the gradient reduce-scatter, tensor-parallel
reductions); only a scan over a sharded sequence needs more (fwpzoo.layers.context).
"""

import os
import sys
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fwpzoo.config import MESH_AXES, ConfigError, MeshConfig
from fwpzoo.layers import mixer_config

BATCH_AXES = ("data", "fsdp")  # the batch is split over both; parameters are sharded over fsdp
# Logical axis names of a parameter, by the last names of its path (list indices left out): the
# first entry whose names end the path gives them, one per axis from the first (fewer names than
# axes: the rest are unnamed). A parameter no entry names is sharded by FSDP alone.
LOGICAL_AXES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("embed", "embedding"), ("vocab", "embed")),
    (("head", "kernel"), ("embed", "vocab")),
    (("mlp", "gate", "kernel"), ("embed", "mlp")),
    (("mlp", "up", "kernel"), ("embed", "mlp")),
    (("mlp", "down", "kernel"), ("mlp", "embed")),
    # a mixture of experts (Qwen3-Next): the experts' stacked kernels [E, ...], the router and the
    # shared expert behind its gate; every expert's hidden axis over tensor, as a dense MLP's
    (("mlp", "gate"), ("expert", "embed", "mlp")),
    (("mlp", "up"), ("expert", "embed", "mlp")),
    (("mlp", "down"), ("expert", "mlp", "embed")),
    (("router", "kernel"), ("embed", "expert")),
    (("shared", "gate", "kernel"), ("embed", "mlp")),
    (("shared", "up", "kernel"), ("embed", "mlp")),
    (("shared", "down", "kernel"), ("mlp", "embed")),
    (("shared_gate", "kernel"), ("embed", None)),  # one gate logit per token
    (("out_proj", "kernel"), ("heads", "embed")),
    (("qkv_proj", "kernel"), ("embed", "heads")),  # q, k, v of every head, head-major per part
    (("in_proj", "kernel"), ("embed", "heads")),
    (("gate_proj", "kernel"), ("embed", "heads")),
    (("proj", "kernel"), ("embed", "heads")),  # a per-token gate's projection
    (("conv", "kernel"), ("conv", "heads")),  # the short conv over the q, k, v channels
    (("out_norm", "weight"), ("kv",)),
    (("mixer", "norm", "weight"), ("heads",)),  # Mamba-2's gated norm over every head's values
    # attention's q/k RMSNorm, over each head's features ([K], attention_qk_norm=head) or over
    # every head at once ([H K], all): never split over tensor, since a norm across heads reads
    # every head's features on every device
    (("q_norm", "weight"), ("kv",)),
    (("k_norm", "weight"), ("kv",)),
    (("weight",), ("embed",)),  # the blocks' and the final RMSNorm
    (("B",), (None, "embed", "state")),  # the diagonal SSM's input and output maps
    (("C",), (None, "state", "embed")),
    (("W",), ("heads", "kv", "kv")),  # plastic and programmed mixers' slow weights per head
    (("W0",), ("heads", "kv", "kv")),
    (("R",), ("heads", "kv", "kv")),
    (("alpha",), ("heads", "kv", "kv")),
    (("bias",), ("heads", "kv")),  # a gate's bias, decay and static value: [H] or [H, K]
    (("A_log",), ("heads", "kv")),
    (("dt_bias",), ("heads", "kv")),
    (("raw",), ("heads", "kv")),
    (("b",), ("heads", "kv")),
    (("w_mod",), ("heads", "kv")),
    (("eta_raw",), ("heads",)),
    (("lambda_raw",), ("heads",)),
    (("D",), ("heads",)),
    (("nu_log",), ("state",)),
    (("gamma_log",), ("state",)),
    (("theta_log",), ("state",)),
)
# Parameters that one name does not tell apart, told apart by a parameter only their module has:
# (that parameter, the name) -> the axes, looked up before LOGICAL_AXES. The diagonal SSM's skip
# scale D multiplies the model's width (the residual stream's channels), mamba2's D its heads.
BESIDE: dict[tuple[str, str], tuple[str, ...]] = {("nu_log", "D"): ("embed",)}
# logical axis -> mesh axis; FSDP then takes the largest axis left unsharded
RULES: dict[str, str] = {"heads": "tensor", "mlp": "tensor"}


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


def make_mesh(count: int | None = None, shape: Mapping[str, int] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES over all devices (or the first `count`), in jax.devices() order
    (process by process): `shape` ({axis: size}, product = the devices), or all along data."""
    devices = jax.devices()[:count]
    sizes = dict(shape) if shape is not None else {"data": len(devices)}
    dims = tuple(sizes.get(name, 1) for name in MESH_AXES)
    return Mesh(np.array(devices).reshape(dims), MESH_AXES)


def run_mesh(cfg: MeshConfig, count: int | None = None) -> Mesh:
    """The mesh of a run's `mesh` section over all devices (or the first `count`); ConfigError
    (one line) if its axes do not multiply to the device count."""
    devices = len(jax.devices()[:count])
    return make_mesh(count, cfg.shape(devices))


def axis_size(mesh, name: str) -> int:
    return dict(mesh.shape).get(name, 1)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_axes(mesh) -> tuple[str, ...]:
    return tuple(name for name in BATCH_AXES if name in mesh.axis_names)


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over data x fsdp."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def sequence_sharded(mesh: Mesh) -> NamedSharding:
    """[B, T, ...]: the batch over data x fsdp, the sequence over context."""
    context = "context" if axis_size(mesh, "context") > 1 else None
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), context))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """A global batch of host arrays [B, T, ...] -> global jax Arrays, the batch split over
    data x fsdp and the sequence over context.

    Every process holds the same global batch (the data stream is a pure function of seed and
    index) and feeds only the pieces of its own devices.
    """

    def put(name, x):
        x = np.asarray(x)
        # token_values [B, vocab] has no sequence axis (data/regression.py)
        along_time = x.ndim >= 2 and name != "token_values"
        sharding = sequence_sharded(mesh) if along_time else batch_sharded(mesh)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return {name: put(name, x) for name, x in batch.items()}


def path_names(path) -> tuple[str, ...]:
    """A pytree key path -> its names, list indices and nnx's `value` left out."""
    names = []
    for key in path:
        name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", None)))
        if isinstance(name, str) and name != "value":
            names.append(name)
    return tuple(names)


def logical_entry(
    names: Sequence[str], siblings: frozenset[str] = frozenset()
) -> tuple[str | None, ...] | None:
    """The axis names of a parameter at path `names` among `siblings` (the names of its module's
    parameters): its BESIDE entry, else the first LOGICAL_AXES entry ending the path, else None."""
    for (sibling, name), axes in BESIDE.items():
        if tuple(names[-1:]) == (name,) and sibling in siblings:
            return axes
    for suffix, axes in LOGICAL_AXES:
        if tuple(names[-len(suffix) :]) == suffix:
            return axes
    return None


def logical_axes(
    names: Sequence[str], ndim: int, siblings: frozenset[str] = frozenset()
) -> tuple[str | None, ...]:
    """The logical axis names of a parameter at path `names` with `ndim` axes among `siblings`
    (logical_entry)."""
    axes = logical_entry(names, siblings) or ()
    return (tuple(axes) + (None,) * ndim)[:ndim]


def partition_spec(axes: Sequence[str | None], shape: Sequence[int], mesh) -> PartitionSpec:
    """RULES applied to one parameter: each named axis to its mesh axis where that divides it,
    then the largest remaining axis that divides by fsdp to fsdp."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        target = RULES.get(name)
        divides = target is not None and axis_size(mesh, target) > 1
        spec.append(target if divides and size % axis_size(mesh, target) == 0 else None)
    fsdp = axis_size(mesh, "fsdp")
    free = [i for i, size in enumerate(shape) if spec[i] is None and size % fsdp == 0]
    if fsdp > 1 and free:
        spec[max(free, key=lambda i: shape[i])] = "fsdp"  # the first of the largest
    return PartitionSpec(*spec)


def param_shardings(params, mesh: Mesh):
    """A NamedSharding for every leaf of `params` (arrays or shapes), by RULES."""
    siblings = sibling_names(params)

    def place(path, x):
        axes = logical_axes(path_names(path), len(x.shape), siblings[module_of(path)])
        return NamedSharding(mesh, partition_spec(axes, x.shape, mesh))

    return jax.tree_util.tree_map_with_path(place, params)


def sibling_names(params) -> dict[tuple[str, ...], frozenset[str]]:
    """{the path of a module: the names of its parameters} over the leaves of `params`; a
    leaf's own key is module_of(its path)."""
    names: dict[tuple[str, ...], set[str]] = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names.setdefault(module_of(path), set()).add(path_names(path)[-1])
    return {module: frozenset(found) for module, found in names.items()}


def module_of(path) -> tuple[str, ...]:
    """A leaf's key path -> the path of the module that holds it (nnx's `value` left out)."""
    keys = [key for key in path if getattr(key, "name", getattr(key, "key", None)) != "value"]
    return tuple(map(str, keys[:-1]))


def like_params(tree, params, shardings, mesh: Mesh):
    """A sharding for every leaf of `tree` (optimizer state): the sharding of the parameter whose
    path ends its own path and whose shape it has (Adam's moments), else replicated (counts)."""
    by_path = {}
    for (path, x), sharding in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings), strict=True
    ):
        by_path[tuple(map(str, path))] = (x.shape, sharding)

    def place(path, x):
        path = tuple(map(str, path))
        for start in range(len(path)):
            shape, sharding = by_path.get(path[start:], (None, None))
            if shape == x.shape:
                return sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(place, tree)


def state_shardings(abstract_state: dict, mesh: Mesh) -> dict:
    """The shardings of a train state {"params", "rest"(, "opt_state")} of arrays or shapes:
    parameters by RULES, the other model variables replicated, the optimizer state like its
    parameters."""
    params = param_shardings(abstract_state["params"], mesh)
    out = {
        "params": params,
        "rest": jax.tree.map(lambda _: replicated(mesh), abstract_state["rest"]),
    }
    if "opt_state" in abstract_state:
        out["opt_state"] = like_params(
            abstract_state["opt_state"], abstract_state["params"], params, mesh
        )
    return out


def to_host(tree):
    """Replicated jax Arrays -> numpy, in any process (a global array may not be fully local)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def check_layout(cfg, mesh: Mesh) -> None:
    """ConfigError (one line) unless the run's model and data fit its mesh: the batch splits over
    data x fsdp (checked by the caller), `tensor` divides every layer's heads, and with
    context > 1 the sequence splits into whole chunks of a mixer that can run split."""
    tensor, context = axis_size(mesh, "tensor"), axis_size(mesh, "context")
    for i, view in enumerate(layer_views(cfg.model)):
        # the heads fields the layer reads, resolved (the SSM reads none: nothing to split)
        for key in ("num_heads", "num_kv_heads", "num_value_heads"):
            count = getattr(view, key, None)
            if count is not None and count % tensor:
                raise ConfigError(
                    f"mesh.tensor={tensor} does not divide model.mixers[{i}] ({view.MIXER}) "
                    f"{key}={count}; use a tensor size that divides {count}"
                )
        refusal = view.context_refusal(f"model.mixers[{i}]") if context > 1 else None
        if refusal:
            raise ConfigError(refusal)
    if context > 1:
        for length in (cfg.data.seq_len, *cfg.eval.lengths):
            check_context_length(cfg.model, length, context)


def check_context_length(model, length: int, context: int) -> None:
    """The sequence of `length` tokens splits over `context` devices into whole chunks."""
    if length % context:
        raise ConfigError(
            f"mesh.context={context} does not divide the sequence length {length}; use a "
            f"context size that divides it"
        )
    local = length // context
    views = layer_views(model)
    for i, layer in enumerate(views):
        if layer.CONTEXT_IN_CHUNKS and local < layer.conv_size - 1:
            raise ConfigError(
                f"mesh.context={context} leaves {local} tokens per device, fewer than the "
                f"{layer.conv_size - 1}-token halo of model.mixers[{i}] conv_size="
                f"{layer.conv_size}; use a smaller context size"
            )
    for i, layer in enumerate(views):
        chunked = layer.CONTEXT_IN_CHUNKS and local > layer.chunk_size
        if chunked and local % layer.chunk_size:
            raise ConfigError(
                f"mesh.context={context} splits {length} tokens into pieces of {local}, not "
                f"whole chunks of model.mixers[{i}] chunk_size={layer.chunk_size}; make "
                f"{length} / context a multiple of {layer.chunk_size}"
            )


def layer_views(model) -> list:
    """Each layer's typed view (fwpzoo.layers.MixerConfig) of a ModelConfig: how the mesh may
    split a layer is the layer's to say."""
    return [mixer_config(layer.mixers[0], layer) for layer in model.layers()]


def under_mesh(fn, mesh: Mesh):
    """fn called with `mesh` set (jax.set_mesh), so the layers traced inside see its axes (a
    layer splits its sequence over `context`, fwpzoo.layers.context)."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call
