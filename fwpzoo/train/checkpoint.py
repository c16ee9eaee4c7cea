"""Orbax checkpoints of a run: every N steps, the latest N kept plus the best by an eval metric.

Each checkpoint holds three items:
  model      {"params", "rest"}: the model's nnx.Param leaves and its other variables (RNG state,
             fixed random features);
  optimizer  the optax state;
  meta       JSON: the data stream's next batch index and the resolved config.
The data stream is a pure function of (seed, index), so its next index is its whole state.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fwpzoo.config import CheckpointConfig

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
        args = ocp.args.Composite(
            model=ocp.args.StandardSave({"params": state["params"], "rest": state["rest"]}),
            optimizer=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def restore_model(self, step: int, abstract_model: dict) -> dict:
        """{"params", "rest"} restored onto the shardings of `abstract_model`."""
        args = ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model))
        return self.manager.restore(step, args=args).model

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """(train state, meta) restored onto the shardings of `abstract_state`."""
        abstract_model = {"params": abstract_state["params"], "rest": abstract_state["rest"]}
        args = ocp.args.Composite(
            model=ocp.args.StandardRestore(abstract_model),
            optimizer=ocp.args.StandardRestore(abstract_state["opt_state"]),
            meta=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        return {**restored.model, "opt_state": restored.optimizer}, restored.meta

    def close(self) -> None:
        """Waits for background writes to finish, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_sharding(tree, sharding):
    """ShapeDtypeStructs of `tree` (arrays or structs) placed on `sharding`: a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
