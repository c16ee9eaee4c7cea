"""Copy: read a string, a separator, then reproduce the string token by token.

A string of n symbols (tokens 2 .. V - 1) takes 2n positions with teacher forcing:
inputs  x1 .. xn SEP x1 .. x(n-1)
targets  0 ..  0 x1  x2 .. xn        (weight 1 on the n copy positions only)
Training draws n uniformly from min_len..max_len, padded with token 0 to seq_len; an eval length
L copies strings of L // 2 symbols.
"""

import numpy as np

from fwpzoo.data.task import SyntheticTask, make_batch

SEPARATOR = 1
FIRST_SYMBOL = 2


class Copy(SyntheticTask):
    name = "copy"
    min_eval_len = 2

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.vocab_size = cfg.vocab_size

    def generate(self, rng, batch_size, length):
        T = length or self.seq_len
        if length is None:
            n = rng.integers(self.cfg.min_len, self.cfg.max_len + 1, size=(batch_size, 1))
        else:
            n = np.full((batch_size, 1), length // 2)  # [B, 1]
        string = rng.integers(FIRST_SYMBOL, self.vocab_size, size=(batch_size, T))  # [B, T]
        pos = np.arange(T)
        shown = np.take_along_axis(string, np.clip(pos - n - 1, 0, None), axis=1)  # x_(t-n-1)
        inputs = np.where(pos < n, string, np.where(pos == n, SEPARATOR, shown))
        inputs = np.where(pos < 2 * n, inputs, 0)
        copying = (pos >= n) & (pos < 2 * n)  # [B, T]
        expected = np.take_along_axis(string, np.clip(pos - n, 0, None), axis=1)  # x_(t-n)
        return make_batch(inputs, np.where(copying, expected, 0), copying)
