"""In-context linear regression (Garg et al. 2022, "What can transformers learn in-context? A case
study of simple function classes"; von Oswald et al. 2023 read the delta rule's step as one
gradient step on it), in tokens.

Every sequence draws a fresh linear map y = w . x with w in {-1, 0, 1}^d (uniform, d =
data.regression_dim), then pairs (x_i, y_i) with x_i in {-1, +1}^d uniform, as many as fit:
sequence position 2i holds x_i, as one token of its 2^d sign patterns (token 1 + sum_j
[x_ij > 0] 2^j), and position 2i + 1 holds y_i, an integer in -d..d, as token 1 + 2^d + d + y_i.
At x_i's position the target is y_i: the model predicts y at each query from the pairs before
it. Only pairs i >= d are scored (before d pairs no map is determined); an odd last position is
padding (token 0, weight 0). Most x_i are new in a sequence once 2^d is well above the pair
count, so the task asks for the map, not for recall of a seen pair.

Besides loss and accuracy (the exact y), the metrics are the squared error of the predicted
number (the most likely of the 2d + 1 number tokens) and that error normalised by the mean y^2
of the scored pairs (1 for predicting 0 every time, 0 for the exact map): the batch carries
"token_values" [B, vocab], the number each token stands for and NaN for the others
(train/steps.token_sums).
"""

import numpy as np

from fwpzoo.data.task import SyntheticTask, make_batch


def vocab_size(d: int) -> int:
    """Padding, the 2^d patterns of x and the 2d + 1 values of y."""
    return 1 + 2**d + 2 * d + 1


class Regression(SyntheticTask):
    name = "regression"
    metrics = ("loss", "accuracy", "mse", "normalised_error")

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.dim = cfg.regression_dim
        self.vocab_size = vocab_size(self.dim)
        self.min_eval_len = 2 * (self.dim + 1)  # one scored pair
        values = np.full(self.vocab_size, np.nan, np.float32)  # [vocab]
        values[1 + 2**self.dim :] = np.arange(-self.dim, self.dim + 1)
        self.token_values = values

    def generate(self, rng, batch_size, length):
        B, d = batch_size, self.dim
        T = length or self.seq_len
        P = T // 2  # pairs
        w = rng.integers(-1, 2, size=(B, 1, d))  # [B, 1, d]
        x = rng.choice(np.array([-1, 1]), size=(B, P, d))  # [B, P, d]
        y = np.sum(w * x, axis=-1)  # [B, P] in -d..d
        inputs = np.zeros((B, T), np.int64)
        inputs[:, 0 : 2 * P : 2] = 1 + (x > 0) @ (2 ** np.arange(d))
        inputs[:, 1 : 2 * P : 2] = 1 + 2**d + d + y
        targets = np.zeros((B, T), np.int64)
        targets[:, 0 : 2 * P : 2] = inputs[:, 1 : 2 * P : 2]
        weights = np.zeros((B, T), np.float32)
        weights[:, 2 * d : 2 * P : 2] = 1.0
        batch = make_batch(inputs, targets, weights)
        batch["token_values"] = np.broadcast_to(self.token_values, (B, self.vocab_size)).copy()
        return batch
