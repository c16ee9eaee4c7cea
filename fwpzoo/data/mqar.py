"""Multi-query associative recall (Arora et al. 2024, "Zoology"), after Zoology's generator.

The vocabulary is split in half: keys are tokens 1 .. V/2 - 1, values V/2 .. V - 1, token 0 the
filler. A sequence of length T starts with N pairs (distinct keys, distinct values); then each key
is asked once as a query at offset 2N + 2g, with the gaps g distinct and drawn from the power law
p(g) ~ a * (g + 1)^(a - 1) over the (T - 2N + 1) // 2 even slots. The target at a query is its
value; only query positions carry weight. Filler positions hold token 0, or with
`random_non_queries` a token drawn uniformly from the whole vocabulary, as in Zoology.

With `rebinds` R > 0, R of the N keys (a uniform subset, in random order) are bound again after
the pairs, each to a value not used before in the sequence, and the queries start after these
2(N + R) tokens; the target is the latest value. A sum of outer products then holds both values of
a re-bound key with equal weight, while the delta rule replaces the old one: here overwriting is the
point. With R = 0 the draws are exactly those of plain MQAR.

Both samples without replacement are vectorised with the same distribution as sequential draws:
a uniform ordered subset is the N smallest of iid uniforms in order, and sequential weighted
draws without replacement are the top N of log p + Gumbel noise in order (Gumbel-top-k).
"""

import numpy as np

from fwpzoo.data.task import SyntheticTask, make_batch


def ordered_sample(rng: np.random.Generator, batch_size: int, population: int, n: int):
    """[B, n] distinct indices in [0, population), each row a uniformly random ordered subset."""
    u = rng.random((batch_size, population))  # [B, P]
    smallest = np.argpartition(u, n - 1, axis=1)[:, :n]  # [B, n] unordered
    order = np.argsort(np.take_along_axis(u, smallest, axis=1), axis=1)
    return np.take_along_axis(smallest, order, axis=1)


def weighted_ordered_sample(rng: np.random.Generator, batch_size: int, p: np.ndarray, n: int):
    """[B, n] distinct indices drawn one after another with probabilities p, renormalised."""
    scores = np.log(p) + rng.gumbel(size=(batch_size, p.size))  # [B, P]
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def gap_law(num_slots: int, alpha: float) -> np.ndarray:
    """[num_slots] probabilities of query gap 0, 1, ...: Zoology's a * g^(a - 1), normalised."""
    g = np.arange(1, num_slots + 1, dtype=np.float64)
    p = alpha * g ** (alpha - 1)
    return p / p.sum()


class MQAR(SyntheticTask):
    name = "mqar"

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.vocab_size = cfg.vocab_size
        self.min_eval_len = 4 * cfg.num_pairs + 2 * cfg.rebinds - 1

    def generate(self, rng, batch_size, length):
        cfg, B, N, R = self.cfg, batch_size, self.cfg.num_pairs, self.cfg.rebinds
        T = length or self.seq_len
        half = cfg.vocab_size // 2
        keys = 1 + ordered_sample(rng, B, half - 1, N)  # [B, N]
        values = half + ordered_sample(rng, B, cfg.vocab_size - half, N + R)  # [B, N + R]
        context = 2 * (N + R)
        gaps = weighted_ordered_sample(rng, B, gap_law((T - context + 1) // 2, cfg.power_alpha), N)
        query_at = context + 2 * gaps  # [B, N] where key i is asked: query_at[:, i]

        inputs = np.zeros((B, T), np.int64)
        inputs[:, 0 : 2 * N : 2] = keys
        inputs[:, 1 : 2 * N : 2] = values[:, :N]
        latest = values[:, :N].copy()  # [B, N] the value each key holds at the queries
        if R:
            rebound = ordered_sample(rng, B, N, R)  # [B, R] which pairs, in the order re-bound
            inputs[:, 2 * N : context : 2] = np.take_along_axis(keys, rebound, axis=1)
            inputs[:, 2 * N + 1 : context : 2] = values[:, N:]
            np.put_along_axis(latest, rebound, values[:, N:], axis=1)
        np.put_along_axis(inputs, query_at, keys, axis=1)
        targets = np.zeros((B, T), np.int64)
        np.put_along_axis(targets, query_at, latest, axis=1)
        weights = np.zeros((B, T), np.float32)
        np.put_along_axis(weights, query_at, 1.0, axis=1)
        if cfg.random_non_queries:
            filler = inputs == 0  # keys and values are >= 1, so 0 marks exactly the fillers
            inputs[filler] = rng.integers(0, cfg.vocab_size, size=int(filler.sum()))
        return make_batch(inputs, targets, weights)
