"""A trained model rebuilt from a checkpoint alone: its stored config, then its weights.

Without a step, the newest checkpoint that restores is used: a damaged newer one is skipped with
a one-line warning naming it and why, so a crash during a save or a corrupted disk never stops
eval or sampling while an older good checkpoint exists.
"""

import dataclasses
from pathlib import Path

import jax

from fwpzoo.config import Config, ConfigError, MeshConfig, from_dict
from fwpzoo.train.checkpoint import Checkpoints, UnreadableCheckpoint, newest_readable, saved_steps
from fwpzoo.train.loop import Run, prepare
from fwpzoo.train.sharding import dividing_count
from fwpzoo.train.state import abstract_model, init_train_state
from fwpzoo.train.workdir import CHECKPOINT_DIR


def restore_run(workdir: Path, step: int | None = None) -> tuple[Run, int, dict]:
    """(the run of the stored config, the step restored, {"params", "rest"}) of checkpoint `step`
    (the newest readable if None); ConfigError if the workdir has no such checkpoint."""
    steps = saved_steps(Path(workdir) / CHECKPOINT_DIR)
    if not steps:
        raise ConfigError(f"no checkpoint in {workdir}")
    if step is not None and step not in steps:
        raise ConfigError(
            f"no checkpoint at step {step} in {workdir}; saved steps: {', '.join(map(str, steps))}"
        )
    checkpoints = Checkpoints(Path(workdir) / CHECKPOINT_DIR)

    def restore(step):
        meta = checkpoints.restore_meta(step)
        run = evaluation_run(from_dict(Config, meta["config"]))
        _, abstract = abstract_model(run.cfg, run.task.vocab_size, run.mesh)
        return run, checkpoints.restore_model(step, abstract, meta)

    try:
        if step is None:
            step, (run, model_state) = newest_readable(workdir, steps, restore)
        else:
            try:
                run, model_state = restore(step)
            except UnreadableCheckpoint as error:
                message = f"checkpoint {step} in {workdir} is unreadable: {error}"
                raise ConfigError(message) from None
    finally:
        checkpoints.close()
    return run, step, model_state


def evaluation_run(cfg: Config) -> Run:
    """The run a model of `cfg` is evaluated in: data parallel whatever mesh trained it (a
    checkpoint restores onto any mesh), over the device count training takes by default, so
    evaluation sums in the same order."""
    cfg = dataclasses.replace(cfg, mesh=MeshConfig())
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    return prepare(cfg, dividing_count(jax.device_count(), [micro_batch, cfg.eval.batch_size]))


def initial_run(cfg: Config) -> tuple[Run, int, dict]:
    """restore_run's answer for a run of `cfg` that saved no checkpoint: the model as
    initialised at step 0 ({"params", "rest"}), placed as a restored one is. What a run that
    diverged before its first save is evaluated at."""
    run = evaluation_run(cfg)
    state = init_train_state(run.cfg, run.task.vocab_size, run.optimizer, run.mesh)
    return run, 0, {"params": state["params"], "rest": state["rest"]}


def training_time(workdir: Path, step: int) -> dict:
    """{"train_seconds", "train_cpu_seconds"}: the wall and CPU seconds a run spent training up
    to its checkpoint `step`, over every segment it was resumed in; {} for a checkpoint saved
    before they were kept."""
    checkpoints = Checkpoints(Path(workdir) / CHECKPOINT_DIR)
    try:
        meta = checkpoints.restore_meta(step)
    finally:
        checkpoints.close()
    return {key: meta[key] for key in ("train_seconds", "train_cpu_seconds") if key in meta}
