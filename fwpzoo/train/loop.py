"""The training loop: prepare (validate, write nothing), lock, resume or init, step, log, save.

Workdir layout and locking: workdir.py. Nothing is written to a workdir before the config has
resolved, the workdir path is usable, and the config matches both config.json and the config
stored inside the checkpoint the run resumes from (so a missing or edited config.json cannot let
another architecture's weights be loaded).
"""

import contextlib
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from fwpzoo.config import Config, ConfigError, from_dict, to_dict
from fwpzoo.data import make_task
from fwpzoo.train.checkpoint import (
    Checkpoints,
    drop_unretrieved_disk_full_writes,
    first_line,
    kept,
    newest_readable,
    no_space_left,
    remove_temporary,
    saved_steps,
    silence_closed_loop_callbacks,
    warn,
)
from fwpzoo.train.evaluate import evaluate, summarize
from fwpzoo.train.metrics import MetricsLog
from fwpzoo.train.optim import learning_rate_schedule, make_optimizer
from fwpzoo.train.sharding import (
    axis_size,
    check_layout,
    run_mesh,
    shard_batch,
    state_shardings,
    to_host,
    under_mesh,
)
from fwpzoo.train.state import abstract_model, abstract_train_state, init_train_state
from fwpzoo.train.steps import make_eval_step, make_train_step
from fwpzoo.train.stop import RunGuard
from fwpzoo.train.workdir import (
    CHECKPOINT_DIR,
    WorkdirLock,
    check_path,
    refuse_different,
    set_aside,
    stored_config,
    write_config,
)

# A step is good when these are finite: the loss it was taken on, its gradient, and the
# parameters it produced (a finite loss with an inf gradient still writes NaN into the weights).
WATCHED = ("loss", "grad_norm", "param_norm")


class TrainingDiverged(RuntimeError):
    """A step's loss, gradient or parameters became NaN or inf; the message names the step, the
    value and the last good checkpoint."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped the run after a step, whose checkpoint was saved. A
    KeyboardInterrupt, so callers that do not know it (a sweep, a notebook) stop as on Ctrl-C
    and `except Exception` does not swallow it."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; saved checkpoint {step}")


class OutOfMemory(ConfigError):
    """The run does not fit in memory: a config problem, reported in one line."""


class DiskFull(ConfigError):
    """The disk filled up while the run wrote to its workdir; reported in one line."""


@contextlib.contextmanager
def disk_full_as_config_error(workdir: Path):
    """Re-raises a failed write for lack of space as DiskFull, one line naming what is kept,
    after removing the unfinished checkpoint folders."""
    try:
        yield
    except Exception as error:
        if not no_space_left(error):
            raise
        directory = workdir / CHECKPOINT_DIR
        remove_temporary(directory)
        raise DiskFull(
            f"no space left on the device of {workdir} (unfinished checkpoint folders removed); "
            f"{kept(directory)}; free some space, then the same command continues the run"
        ) from None


@contextlib.contextmanager
def out_of_memory_as_config_error():
    """Re-raises an allocation failure as OutOfMemory, one line."""
    try:
        yield
    except Exception as error:
        # XLA reports allocation failures as "RESOURCE_EXHAUSTED: ..." or, on CPU, as
        # "INTERNAL: Error dispatching computation: Out of memory allocating N bytes"
        text = first_line(error, limit=1000)
        if (
            isinstance(error, MemoryError)
            or "RESOURCE_EXHAUSTED" in text
            or "Out of memory" in text
        ):
            raise OutOfMemory(f"out of memory: {first_line(error)}") from None
        raise


@dataclass(frozen=True)
class Run:
    """What a validated config resolves to: its task, mesh, optimizer and model definition."""

    cfg: Config
    task: object
    mesh: jax.sharding.Mesh
    optimizer: object
    graphdef: object


def prepare(cfg: Config, devices: int | None = None, mesh=None) -> Run:
    """Resolves every name and checks every size of `cfg`; ConfigError (one line) if one is bad.
    The mesh (cfg.mesh) spans all devices, or the first `devices`, unless given (`fwpzoo plan`
    passes one over a TPU topology's devices).

    Writes nothing, so a bad config leaves a workdir untouched.
    """
    try:
        task = make_task(cfg.data, cfg.train.seed)
        for length in cfg.eval.lengths:  # a length the task cannot make: refused before training
            next(task.eval_batches("valid", 1, 1, seq_len=length))
        mesh = run_mesh(cfg.mesh, devices) if mesh is None else mesh
        graphdef, _ = abstract_model(cfg, task.vocab_size, mesh)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_layout(cfg, mesh)
    # the batch is split over data x fsdp; tensor and context devices share their rows
    devices = axis_size(mesh, "data") * axis_size(mesh, "fsdp")
    split = f"mesh.data x mesh.fsdp = {devices}"
    if devices == mesh.devices.size:
        split = f"the {devices} devices"
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    if micro_batch % devices:
        raise ConfigError(
            f"train.batch_size / train.grad_accum = {micro_batch} is not divisible by {split}"
        )
    if cfg.eval.batch_size % devices:
        raise ConfigError(f"eval.batch_size={cfg.eval.batch_size} is not divisible by {split}")
    metrics = summarize({"loss_sum": 0, "weight": 1, "correct": 0}, task.metrics)
    if cfg.checkpoint.best_metric not in (None, *metrics):
        raise ConfigError(
            f"checkpoint.best_metric {cfg.checkpoint.best_metric!r} is not an eval metric of "
            f"{cfg.data.task}; valid: {', '.join(metrics)}"
        )
    at_lengths = [f"{name}@{n}" for n in cfg.eval.lengths for name in metrics]
    if cfg.train.stop_metric not in (None, *metrics, *at_lengths):
        raise ConfigError(
            f"train.stop_metric {cfg.train.stop_metric!r} is not an eval metric of "
            f"{cfg.data.task}; valid: {', '.join([*metrics, *at_lengths])}"
        )
    return Run(cfg, task, mesh, make_optimizer(cfg.train), graphdef)


def check_workdir(cfg: Config, workdir: Path) -> None:
    """Refuses, before anything is written, a workdir that cannot hold the run or whose
    config.json holds a run that differs from `cfg` in more than length."""
    check_path(workdir)
    stored = stored_config(workdir)
    if stored is not None:
        refuse_different(stored, cfg, workdir)


def restore_or_init(run: Run, workdir: Path) -> tuple[dict, int, dict]:
    """(train state, its step, its checkpoint's meta) from the newest readable checkpoint, after
    checking the config stored inside it, or (a fresh state, 0, {}). Unreadable newer
    checkpoints are moved aside (process 0) so the resumed run can save those steps again."""
    cfg, vocab_size, directory = run.cfg, run.task.vocab_size, workdir / CHECKPOINT_DIR
    steps = saved_steps(directory)
    if not steps:
        return init_train_state(cfg, vocab_size, run.optimizer, run.mesh), 0, {}
    abstract = abstract_train_state(cfg, vocab_size, run.optimizer, run.mesh)
    reader = Checkpoints(directory)

    def restore(step):
        meta = reader.restore_meta(step)
        refuse_different(from_dict(Config, meta["config"]), cfg, directory / str(step))
        return reader.restore(step, abstract, meta), meta

    try:
        step, (state, meta) = newest_readable(workdir, steps, restore)
    finally:
        reader.close()
    if step > cfg.train.steps:
        raise ConfigError(
            f"{workdir} already holds step {step}, past train.steps={cfg.train.steps}"
        )
    unreadable = [s for s in steps if s > step]
    if unreadable and jax.process_index() == 0:
        where = set_aside(workdir, unreadable)
        warn(f"moved unreadable checkpoints {unreadable} to {where}; resuming from step {step}")
    multihost_utils.sync_global_devices("fwpzoo: checkpoints set aside")
    return state, step, meta


def first_nonfinite(pending: list[tuple[int, dict]]) -> tuple[int, dict] | None:
    """(step, its metrics on the host) of the first pending (step, device metrics) whose loss,
    gradient norm or parameter norm is NaN or inf, or None."""
    for step, metrics in pending:
        values = {name: float(value) for name, value in to_host(metrics).items()}
        if not all(np.isfinite(values[name]) for name in WATCHED):
            return step, values
    return None


def describe(mesh, workdir: Path, start: int) -> str:
    devices = mesh.devices.flat[0].platform
    where = f"{mesh.devices.size} {devices} devices in {jax.process_count()} processes"
    return f"fwpzoo: training on {where} into {workdir}, from step {start}"


def train(cfg: Config, workdir: Path, *, progress: bool = True) -> dict:
    """Trains `cfg` into `workdir`, resuming from its newest readable checkpoint; returns the last
    logged metrics.

    ConfigError, with nothing left written, if the config or the workdir is refused; OutOfMemory
    (a ConfigError) if the run does not fit. A workdir this call created is removed again when it
    fails that way before saving a checkpoint. Interrupted after SIGTERM or SIGINT, once the
    current step is saved; TrainingDiverged on a NaN or inf, with no bad state saved.
    """
    workdir = Path(workdir)
    run = prepare(cfg)
    check_workdir(cfg, workdir)
    multihost_utils.sync_global_devices("fwpzoo: workdir checked")  # before any process writes
    chief = jax.process_index() == 0
    created = not workdir.exists()
    silence_closed_loop_callbacks()  # a failed save's leftovers would print a traceback each
    drop_unretrieved_disk_full_writes()
    guard = RunGuard(cfg.train.stall_timeout, lambda: kept(workdir / CHECKPOINT_DIR))
    with WorkdirLock(workdir) if chief else contextlib.nullcontext(), guard as stop:
        try:
            with out_of_memory_as_config_error(), disk_full_as_config_error(workdir):
                return _train(run, workdir, chief, progress, stop)
        except ConfigError:
            if chief and created and not saved_steps(workdir / CHECKPOINT_DIR):
                shutil.rmtree(workdir, ignore_errors=True)
            raise


def _train(run: Run, workdir: Path, chief: bool, progress: bool, stop: RunGuard) -> dict:
    cfg = run.cfg
    training_clock = TrainingClock()
    stop.beat("restoring the newest checkpoint")
    state, start, meta = restore_or_init(run, workdir)
    training_clock.resume(meta)
    if meta.get("reached_stop_metric"):
        return {"step": start}  # an early-stopped run is finished: resuming trains no further
    data_index = meta.get("next_batch_index", 0)
    if chief:
        write_config(workdir, cfg)
        remove_temporary(workdir / CHECKPOINT_DIR)  # the unfinished writes of a killed run
    checkpoints = Checkpoints(workdir / CHECKPOINT_DIR, cfg.checkpoint)
    log = MetricsLog(workdir, start, enabled=chief, start_row=meta.get("metrics_row"))
    if chief:
        print(describe(run.mesh, workdir, start), file=sys.stderr)
        for note in cfg.model.notes():  # e.g. a model-wide form a mixer has not: once per run
            print(f"fwpzoo train: {note}", file=sys.stderr)
    bar = tqdm(total=cfg.train.steps, initial=start, unit="step", disable=not (chief and progress))
    try:
        return _loop(run, state, start, data_index, checkpoints, log, bar, stop, training_clock)
    finally:
        stop.beat("finishing the checkpoint writes")
        checkpoints.close()  # lets async writes finish: the last good checkpoint stays complete
        log.close()
        bar.close()


class TrainingClock:
    """Wall and CPU (process) seconds spent on a run, carried in its checkpoints so a resumed run
    counts every segment that led to its state (the work after the last checkpoint of an
    interrupted segment is redone, and counted once)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.before = {"train_seconds": 0.0, "train_cpu_seconds": 0.0}

    def resume(self, meta: dict) -> None:
        self.before = {key: meta.get(key, 0.0) for key in self.before}

    def spent(self) -> dict:
        return {
            "train_seconds": self.before["train_seconds"] + time.perf_counter() - self.wall,
            "train_cpu_seconds": self.before["train_cpu_seconds"] + time.process_time() - self.cpu,
        }


def _loop(run: Run, state, start, data_index, checkpoints, log, bar, stop, training_clock) -> dict:
    cfg, task, mesh = run.cfg, run.task, run.mesh
    # The old state is dead once the step returns, so its buffers hold the new one: params and
    # optimizer state exist once on the device, not twice.
    # the new state keeps the old one's shardings (parameters and optimizer state by the rules)
    train_step = jax.jit(
        make_train_step(run.graphdef, run.optimizer, grad_accum=cfg.train.grad_accum),
        out_shardings=(state_shardings(state, mesh), None),
        donate_argnums=0,
    )
    # traced with the mesh set: a layer under mesh.context > 1 splits its sequence
    train_step = under_mesh(train_step, mesh)
    eval_step = under_mesh(jax.jit(make_eval_step(run.graphdef)), mesh)
    schedule = learning_rate_schedule(cfg.train)
    pending, tokens, clock = [], 0, time.perf_counter()
    row = {}
    for step in range(start + 1, cfg.train.steps + 1):
        batch = task.train_batch(data_index, cfg.train.batch_size)
        data_index += 1
        tokens += batch["inputs"].size
        stop.beat(f"running step {step}" + (", compiled first" if step == start + 1 else ""))
        state, metrics = train_step(state, shard_batch(batch, mesh))
        pending.append((step, metrics))
        stopping = stop.requested(step)
        plan = plan_step(cfg, step, stopping)
        if not (plan.log or plan.save):
            continue
        # Checked before anything is saved, so no checkpoint holds a diverged state.
        bad = first_nonfinite(pending)
        if bad is not None:
            bad_step, values = bad
            log.write({"step": bad_step, **values})  # the values that stopped it, as null
            name = next(name for name in WATCHED if not np.isfinite(values[name]))
            good = checkpoints.latest_step()
            kept = "no checkpoint" if good is None else f"the last good checkpoint is step {good}"
            raise TrainingDiverged(
                f"{name} is {values[name]} at step {bad_step}; training stopped, {kept}"
            )
        eval_metrics = None
        if plan.evaluate:
            stop.beat(f"evaluating at step {step}")
            eval_metrics = evaluate(eval_step, state, task, cfg.eval, mesh, "valid")
        if plan.log:
            row = {
                "step": step,
                **{name: float(value) for name, value in to_host(metrics).items()},
                "learning_rate": float(schedule(step - 1)),
                "tokens_per_sec": tokens / (time.perf_counter() - clock),
                **{f"valid_{k}": v for k, v in (eval_metrics or {}).items() if plan.scheduled_eval},
            }
            log.write(row)
            bar.update(step - bar.n)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
            tokens, clock = 0, time.perf_counter()
        # only a scheduled eval may end the run, so an interrupted run stops where it would have
        reached = plan.scheduled_eval and reached_stop_metric(cfg.train, eval_metrics)
        if plan.save or reached:
            meta = {
                "next_batch_index": data_index,
                "config": to_dict(cfg),
                "reached_stop_metric": reached,
                "metrics_row": row if plan.log else None,  # logged again if metrics.jsonl loses it
            }
            stop.beat(f"saving checkpoint {step}")
            checkpoints.save(step, state, meta | training_clock.spent(), eval_metrics)
        pending = []
        if reached:
            break
        if stopping:
            raise Interrupted(stop.signum, step)
    return row


@dataclass(frozen=True)
class StepPlan:
    """What the loop does after a step besides the step itself."""

    save: bool  # write a checkpoint
    evaluate: bool  # evaluate on the valid split
    log: bool  # write a metrics row
    scheduled_eval: bool  # the schedule's eval: logged, and the one that may end the run


def plan_step(cfg: Config, step: int, stopping: bool) -> StepPlan:
    """The plan after `step` under `cfg`'s schedules; `stopping`: a signal asked to stop."""
    last = step == cfg.train.steps
    scheduled_save = step % cfg.checkpoint.every == 0 or last
    track_best = cfg.checkpoint.best_metric is not None
    # a checkpoint ranked by an eval metric needs that metric at its step
    scheduled_eval = step % cfg.eval.every == 0 or last or (scheduled_save and track_best)
    return StepPlan(
        save=scheduled_save or stopping,
        evaluate=scheduled_eval or (stopping and track_best),
        # what a run logs does not depend on whether it was interrupted
        log=step % cfg.train.log_every == 0 or scheduled_eval or scheduled_save,
        scheduled_eval=scheduled_eval,
    )


def reached_stop_metric(cfg, eval_metrics: dict | None) -> bool:
    """Whether this eval ends training: train.stop_metric at or above train.stop_at."""
    if cfg.stop_metric is None or eval_metrics is None:
        return False
    return eval_metrics[cfg.stop_metric] >= cfg.stop_at
