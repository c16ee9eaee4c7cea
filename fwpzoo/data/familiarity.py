"""Continual familiarity detection (Tyulmankov, Yang & Abbott, Neuron 2022, "HebbFF").

A stream of random patterns: at every step, with probability `repeat_prob`, the pattern shown
R = `repeat_interval` steps ago comes back (if that one was itself new: a pattern repeats at most
once), otherwise a pattern never seen in the stream appears. The model answers at every step:
familiar (a repeat) or novel.

Each pattern is a token (3 .. vocab_size - 1, drawn without replacement within a sequence, so a
novel pattern is never one seen before); the model's embedding turns it into a random vector, as
the paper's patterns are random binary vectors. Targets are NOVEL or FAMILIAR. Only steps
t >= R are scored: before R nothing can repeat, and counting those steps would flatter long
intervals. Always answering "novel" scores 1 - p / (1 + p) (2/3 at p = 1/2) once t >= 2R and
1 - p at R <= t < 2R, where nothing shown had been a repeat itself.
"""

import numpy as np

from fwpzoo.data.config import DataConfigError
from fwpzoo.data.task import SyntheticTask, make_batch

NOVEL, FAMILIAR = 1, 2
FIRST_PATTERN = 3


def familiarity_stream(rng, batch_size: int, T: int, R: int, p: float, vocab_size: int):
    """(patterns [B, T], familiar [B, T] bool) of the task's stream."""
    # distinct fresh patterns per row: the first T of a random order of the pattern tokens
    order = rng.random((batch_size, vocab_size - FIRST_PATTERN)).argsort(axis=1)
    fresh = order[:, :T] + FIRST_PATTERN  # [B, T]
    draws = rng.random((batch_size, T)) < p  # [B, T]: a repeat is asked for
    patterns = np.zeros((batch_size, T), np.int64)
    familiar = np.zeros((batch_size, T), bool)
    for t in range(T):
        repeat = draws[:, t] & ~familiar[:, t - R] if t >= R else np.zeros(batch_size, bool)
        patterns[:, t] = np.where(repeat, patterns[:, t - R], fresh[:, t])
        familiar[:, t] = repeat
    return patterns, familiar


class Familiarity(SyntheticTask):
    name = "familiarity"

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.vocab_size = cfg.vocab_size
        self.min_eval_len = cfg.repeat_interval + 1

    def generate(self, rng, batch_size, length):
        T, R = length or self.seq_len, self.cfg.repeat_interval
        if self.vocab_size < T + FIRST_PATTERN:
            raise DataConfigError(
                f"familiarity at length {T} needs data.vocab_size >= {T + FIRST_PATTERN}"
            )
        patterns, familiar = familiarity_stream(
            rng, batch_size, T, R, self.cfg.repeat_prob, self.vocab_size
        )
        scored = np.broadcast_to(np.arange(T) >= R, (batch_size, T))
        return make_batch(patterns, np.where(familiar, FAMILIAR, NOVEL), scored)
