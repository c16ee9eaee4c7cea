"""Tasks and corpora: deterministic, resumable batches for the trainer.

    task = make_task(DataConfig(task="parity"), seed=0)
    batch = task.train_batch(index, batch_size)      # a pure function of (seed, index)
    for batch in task.eval_batches("valid", batch_size, seq_len=256): ...

The associative-retrieval capacity task has its own batch function, `capacity_batch`, as its
model reads (keys, values, query) rather than a token sequence.
"""

from collections.abc import Callable

from fwpzoo.data.capacity import capacity_batch
from fwpzoo.data.config import TASK_NAMES, DataConfig, DataConfigError, MissingCorpusError
from fwpzoo.data.copy_task import Copy
from fwpzoo.data.familiarity import Familiarity
from fwpzoo.data.formal_languages import FormalLanguage
from fwpzoo.data.mqar import MQAR
from fwpzoo.data.regression import Regression
from fwpzoo.data.state_tracking import S3, Cyclic, ModArith, Parity
from fwpzoo.data.task import Batch, Task
from fwpzoo.data.text import Text

TASKS: dict[str, Callable[[DataConfig, int], Task]] = {
    "mqar": MQAR,
    "parity": Parity,
    "mod_arith": ModArith,
    "s3": S3,
    "cyclic": Cyclic,
    "copy": Copy,
    "text": Text,
    "formal_language": FormalLanguage,
    "familiarity": Familiarity,
    "regression": Regression,
}
assert tuple(TASKS) == TASK_NAMES


def make_task(cfg: DataConfig, seed: int) -> Task:
    """The task `cfg.task` seeded by `seed`.

    An unknown task name never gets here: DataConfig refuses it, with a DataConfigError (a
    ValueError) naming the valid tasks. A text corpus that is not on disk raises
    MissingCorpusError (also a DataConfigError) saying how to fetch it.
    """
    return TASKS[cfg.task](cfg, seed)


__all__ = [
    "TASKS",
    "Batch",
    "DataConfig",
    "DataConfigError",
    "MissingCorpusError",
    "Task",
    "capacity_batch",
    "make_task",
]
