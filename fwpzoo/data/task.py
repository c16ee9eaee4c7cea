"""What the trainer sees of a task, and the seeding shared by the synthetic ones.

A batch is {"inputs": int32 [B, T], "targets": int32 [B, T], "weights": float32 [B, T]}: the model
reads inputs[:, t] and is scored on predicting targets[:, t] where weights[:, t] > 0. Token 0 is
padding in every task but text. A task with packed rows adds "reset": bool [B, T], True where a
new segment (document) starts, which the model passes to every layer.

Every batch is a pure function of (seed, stream, index), so the data-iterator state a checkpoint
needs is the next index, and resuming reproduces the uninterrupted stream exactly.
"""

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from fwpzoo.data.config import DataConfig, DataConfigError

Batch = dict[str, np.ndarray]
# Independent random streams: training never sees a sequence drawn for evaluation on purpose.
STREAMS = {"train": 0, "valid": 1, "test": 2}
# Synthetic eval with num_batches=None covers about this many sequences per split and length.
EVAL_EXAMPLES = 1024


@runtime_checkable
class Task(Protocol):
    name: str
    vocab_size: int
    seq_len: int
    metrics: tuple[str, ...]

    def train_batch(self, index: int, batch_size: int) -> Batch: ...

    def eval_batches(
        self,
        split: str,
        batch_size: int,
        num_batches: int | None = None,
        seq_len: int | None = None,
    ) -> Iterator[Batch]: ...


def eval_stream(split: str) -> int:
    if split not in ("valid", "test"):
        raise ValueError(f"unknown eval split {split!r}; valid splits: valid, test")
    return STREAMS[split]


def make_batch(inputs: np.ndarray, targets: np.ndarray, weights: np.ndarray, reset=None) -> Batch:
    """The batch dict; `reset` [B, T] bool (packed rows: True at each segment start) if given."""
    batch = {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "weights": weights.astype(np.float32),
    }
    if reset is not None:
        batch["reset"] = np.asarray(reset, bool)
    return batch


class SyntheticTask(ABC):
    """A task whose sequences come from a generator: subclasses define `generate`.

    `generate(rng, batch_size, length)` draws one batch; `length` None means the training
    distribution padded to `seq_len`, an int means the length-generalisation batch of that length
    (at least `min_eval_len`).
    """

    metrics = ("loss", "accuracy")
    min_eval_len = 1

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg = cfg
        self.seed = seed
        self.seq_len = cfg.seq_len

    @abstractmethod
    def generate(self, rng: np.random.Generator, batch_size: int, length: int | None) -> Batch:
        """One batch drawn with `rng`."""

    def train_batch(self, index: int, batch_size: int) -> Batch:
        rng = np.random.default_rng((self.seed, STREAMS["train"], index))
        return self.generate(rng, batch_size, None)

    def eval_batches(
        self,
        split: str,
        batch_size: int,
        num_batches: int | None = None,
        seq_len: int | None = None,
    ) -> Iterator[Batch]:
        stream = eval_stream(split)
        if seq_len is not None and seq_len < self.min_eval_len:
            raise DataConfigError(
                f"{self.name} cannot be evaluated at seq_len={seq_len}: "
                f"it needs at least {self.min_eval_len}"
            )
        if num_batches is None:
            num_batches = math.ceil(EVAL_EXAMPLES / batch_size)
        for i in range(num_batches):
            # seq_len is part of the seed so each eval length is its own fixed set of sequences
            rng = np.random.default_rng((self.seed, stream, seq_len or 0, i))
            yield self.generate(rng, batch_size, seq_len)
