"""Orbax checkpoints of a run: every N steps, the latest N kept plus the best by an eval metric.

Each checkpoint holds three items:
  model      {"params", "rest"}: the model's nnx.Param leaves and its other variables (RNG state,
             fixed random features);
  optimizer  the optax state;
  meta       JSON: the data stream's next batch index, the resolved config and a fingerprint of
             every array of the other two items.
The data stream is a pure function of (seed, index), so its next index is its whole state.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a killed save
leaves no half checkpoint; it does not checksum what it wrote. A flipped byte in an array file
restores without complaint (as NaN or as a wrong but finite value), so every restore here compares
the arrays against their saved fingerprints and checks they are finite. Whatever goes wrong while
reading a checkpoint is reported as UnreadableCheckpoint with a one-line reason.
"""

import errno
import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from fwpzoo.config import CheckpointConfig, ConfigError
from fwpzoo.train.sharding import to_host

MAXIMIZED_METRICS = ("accuracy",)  # every other eval metric (loss, bpc, perplexity) is minimized


def _preservation(cfg: CheckpointConfig):
    latest = ocp.checkpoint_managers.LatestN(n=cfg.keep)
    if cfg.best_metric is None:
        return latest
    best = ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: metrics[cfg.best_metric],
        reverse=cfg.best_metric not in MAXIMIZED_METRICS,
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    return ocp.checkpoint_managers.AnyPreservationPolicy([latest, best])


class UnreadableCheckpoint(Exception):
    """A checkpoint that cannot be restored as saved; the message is one line saying why."""


def first_line(error: BaseException, limit: int = 160) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaf_words(x):
    """x as uint32 words, so any change of any bit changes them."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.iscomplexobj(x):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _inspect(tree):
    """(one uint32 per leaf: sum of its words times odd position weights, mod 2^32, so changing
    any one word changes it; whether every float leaf is finite)."""
    sums, finite = [], jnp.bool_(True)
    for x in jax.tree.leaves(tree):
        words = _leaf_words(x)  # [n]
        weights = 2 * jnp.arange(words.size, dtype=jnp.uint32) + 1  # odd: invertible mod 2^32
        sums.append(jnp.sum(words * weights, dtype=jnp.uint32))
        if jnp.issubdtype(x.dtype, jnp.inexact):
            finite &= jnp.all(jnp.isfinite(x))
    return sums, finite


def fingerprint(tree) -> list[int]:
    """One integer per array of `tree`, computed on the devices; equal trees give equal lists."""
    sums, _ = to_host(_inspect(tree))
    return [int(value) for value in sums]


def verify(tree, expected: list[int] | None, what: str) -> None:
    """UnreadableCheckpoint unless `tree` matches its saved fingerprint and is finite."""
    sums, finite = to_host(_inspect(tree))
    if expected is not None and [int(v) for v in sums] != expected:
        raise UnreadableCheckpoint(f"its {what} arrays differ from the fingerprint saved with them")
    if not np.all(finite):
        raise UnreadableCheckpoint(f"its {what} arrays hold NaN or inf")


class Checkpoints:
    """The checkpoints directory of a workdir; read, never written, when `cfg` is None."""

    def __init__(self, directory: Path, cfg: CheckpointConfig | None = None):
        if cfg is None:
            # A manager that never saves changes nothing on disk; orbax's read_only option would
            # do the same but warns on every use.
            options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
        else:
            best = cfg.best_metric
            options = ocp.CheckpointManagerOptions(
                preservation_policy=_preservation(cfg),
                best_fn=(lambda metrics: metrics[best]) if best else None,
                best_mode="max" if best in MAXIMIZED_METRICS else "min",
                enable_async_checkpointing=cfg.async_save,
            )
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)
        self.writes_in_background = cfg is not None and cfg.async_save

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: dict, meta: dict, metrics: dict | None = None) -> None:
        if self.writes_in_background:
            # the train step donates its input state, so a background write gets its own copy
            # rather than buffers the next step overwrites
            state = jax.tree.map(jnp.copy, state)
        model = {"params": state["params"], "rest": state["rest"]}
        fingerprints = {"model": fingerprint(model), "optimizer": fingerprint(state["opt_state"])}
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            optimizer=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave({**meta, "fingerprints": fingerprints}),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def _restore(self, step: int, **items):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as error:  # orbax, tensorstore and json each raise their own types
            raise UnreadableCheckpoint(first_line(error)) from None

    def restore_meta(self, step: int) -> dict:
        meta = self._restore(step, meta=ocp.args.JsonRestore()).meta
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise UnreadableCheckpoint("its meta item holds no config")
        return meta

    def restore_model(self, step: int, abstract_model: dict, meta: dict) -> dict:
        """{"params", "rest"} restored onto the shardings of `abstract_model`, verified against
        the fingerprints in `meta` (restore_meta of the same step)."""
        model = self._restore(step, model=ocp.args.StandardRestore(abstract_model)).model
        verify(model, meta.get("fingerprints", {}).get("model"), "model")
        return model

    def restore(self, step: int, abstract_state: dict, meta: dict) -> dict:
        """The train state restored onto the shardings of `abstract_state`, verified."""
        abstract_model = {"params": abstract_state["params"], "rest": abstract_state["rest"]}
        restored = self._restore(
            step,
            model=ocp.args.StandardRestore(abstract_model),
            optimizer=ocp.args.StandardRestore(abstract_state["opt_state"]),
        )
        expected = meta.get("fingerprints", {})
        verify(restored.model, expected.get("model"), "model")
        verify(restored.optimizer, expected.get("optimizer"), "optimizer")
        return {**restored.model, "opt_state": restored.optimizer}

    def close(self) -> None:
        """Waits for background writes to finish, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_sharding(tree, sharding):
    """ShapeDtypeStructs of `tree` (arrays or structs) placed on `sharding`: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def warn(message: str) -> None:
    print(f"fwpzoo: warning: {message}", file=sys.stderr)


TEMPORARY = ".orbax-checkpoint-tmp"  # orbax writes a checkpoint here, then renames it


def finished_steps(directory: Path) -> list[int]:
    """The complete checkpoints' steps in `directory` by its listing alone, oldest first: safe
    to call from any thread at any moment, while orbax itself may be mid-write."""
    if not Path(directory).is_dir():
        return []
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit())


def kept(directory: Path) -> str:
    """What a stopped run leaves in `directory`, in words."""
    steps = finished_steps(directory)
    if not steps:
        return "no checkpoint was saved"
    return f"checkpoint {steps[-1]} is the last one kept"


def remove_temporary(directory: Path) -> None:
    """Removes the folders of checkpoint writes that never completed (a killed process, a full
    disk): they hold no usable state and only take space."""
    if Path(directory).is_dir():
        for path in Path(directory).iterdir():
            if TEMPORARY in path.name:
                shutil.rmtree(path, ignore_errors=True)


def saved_steps(directory: Path) -> list[int]:
    """The checkpoint steps in `directory` (none if it does not exist), oldest first."""
    if not Path(directory).is_dir():
        return []
    checkpoints = Checkpoints(directory)
    steps = checkpoints.steps()
    checkpoints.close()
    return sorted(steps)


def newest_readable(workdir: Path, steps: list[int], restore: Callable[[int], object]):
    """(step, restore(step)) for the newest of `steps` whose restore raises no
    UnreadableCheckpoint; each one skipped is warned about in one line; ConfigError if none is
    readable. A damaged newer checkpoint never hides an older good one."""
    # before the first restore: a failed one's late callbacks can start before its error is
    # raised here
    silence_closed_loop_callbacks()
    for step in reversed(steps):
        try:
            return step, restore(step)
        except UnreadableCheckpoint as error:
            older = [s for s in steps if s < step]
            then = f"trying step {older[-1]}" if older else "no older checkpoint"
            warn(f"checkpoint {step} in {workdir} is unreadable ({error}); {then}")
    raise ConfigError(f"no readable checkpoint in {workdir} (steps {', '.join(map(str, steps))})")


def no_space_left(error: BaseException) -> bool:
    """Whether `error` is a write that failed for lack of disk space (Python's OSError, or
    tensorstore's error as orbax raises it)."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in text


class _UnretrievedDiskFullWrite(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" record for a write that failed for
    lack of space: a save on a full disk fails on its first array, and orbax leaves the writes of
    the others as tasks whose error nobody awaits, each logged with a traceback when collected.
    The run already ends with one line naming the full disk."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and no_space_left(error))


def drop_unretrieved_disk_full_writes() -> None:
    """Installs _UnretrievedDiskFullWrite on asyncio's logger, once."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedDiskFullWrite) for f in logger.filters):
        logger.addFilter(_UnretrievedDiskFullWrite())


def silence_closed_loop_callbacks() -> None:
    """Drops the unraisable errors a failed restore or save leaves behind.

    An orbax restore that fails on one array returns while tensorstore is still reading the
    others; each of those reads then calls back into the restore's asyncio loop, already closed,
    and Python would print one traceback per array after the one-line warning. A save that fails
    (a full disk) does the same with its other writes, and leaves coroutines pending that Python
    finalises at exit, one traceback each. Every other unraisable exception, raised before the
    interpreter shuts down, still reaches the hook that was installed before."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        if not (closed_loop or sys.is_finalizing()):
            previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook
