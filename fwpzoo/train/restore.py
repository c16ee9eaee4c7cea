"""A trained model rebuilt from a checkpoint alone: its stored config, then its weights."""

from pathlib import Path

from fwpzoo.config import Config, ConfigError, from_dict
from fwpzoo.train.checkpoint import Checkpoints
from fwpzoo.train.loop import CHECKPOINT_DIR, Run, prepare
from fwpzoo.train.state import abstract_model


def restore_run(workdir: Path, step: int | None = None) -> tuple[Run, int, dict]:
    """(the run of the stored config, the step restored, {"params", "rest"}) of checkpoint `step`
    (the latest if None); ConfigError if the workdir has no such checkpoint."""
    directory = Path(workdir) / CHECKPOINT_DIR
    steps = Checkpoints(directory).steps() if directory.is_dir() else []
    if not steps:
        raise ConfigError(f"no checkpoint in {workdir}")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise ConfigError(
            f"no checkpoint at step {step} in {workdir}; "
            f"saved steps: {', '.join(map(str, sorted(steps)))}"
        )
    checkpoints = Checkpoints(directory)
    cfg = from_dict(Config, checkpoints.restore_meta(step)["config"])
    run = prepare(cfg)
    _, abstract = abstract_model(cfg, run.task.vocab_size, run.mesh)
    model_state = checkpoints.restore_model(step, abstract)
    checkpoints.close()
    return run, step, model_state
