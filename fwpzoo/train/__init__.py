"""Training, evaluation and checkpoints of config-driven runs (loop.py: the workdir layout)."""

from fwpzoo.train.evaluate import evaluate, summarize
from fwpzoo.train.loop import Interrupted, OutOfMemory, TrainingDiverged, prepare, train
from fwpzoo.train.restore import initial_run, restore_run, training_time
from fwpzoo.train.steps import make_eval_step, make_train_step

__all__ = [
    "Interrupted",
    "OutOfMemory",
    "TrainingDiverged",
    "evaluate",
    "initial_run",
    "make_eval_step",
    "make_train_step",
    "prepare",
    "restore_run",
    "summarize",
    "train",
    "training_time",
]
