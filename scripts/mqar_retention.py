"""How much of an MQAR pair the delta rule still holds at its query, in an untrained model.

The delta rule's write at token t erases along its key: S <- S (I - beta_t k_t k_t^T) + ...
So what a pair wrote at its value token p is read back along its own key k_p at the query
token q scaled by the retention

    r = k_p^T (I - beta_{p+1} k_{p+1} k_{p+1}^T) ... (I - beta_{q-1} k_{q-1} k_{q-1}^T) k_p,

1 for the sum rule. With unit keys in K dims and beta near 0.5, each later token erases about
beta / K of it. This prints the median r over the pairs, heads and sequences of one batch, for
the first layer of the MQAR delta_rule config at init (its keys and betas as the layer makes them),
at each key dim of the grid (docs/results/mqar.md) and with `model.beta_init` lowered.

    python scripts/mqar_retention.py [--seed 1]

The seed is train.seed: the same initial weights and first training batch as a point of that seed.
"""

import argparse

import numpy as np

from fwpzoo import config
from fwpzoo.data import make_task
from fwpzoo.train.state import new_model

CONFIG = "configs/experiments/mqar/delta_rule.yaml"
SETTINGS = [  # (heads, pairs, extra overrides)
    *((heads, pairs, ()) for heads in (16, 8, 4) for pairs in (8, 16)),
    *((16, pairs, ("model.beta_init=0.1",)) for pairs in (8, 16)),
]


def first_layer_writes(cfg, batch):
    """The first layer's keys k [B, T, H, K] and betas [B, T, H] at init (the weights training
    draws from train.seed), float64."""
    model = new_model(cfg, cfg.data.vocab_size)
    block = model.blocks[0]
    written = block.mixer.cell_inputs(block.mixer_norm(model.embed(batch["inputs"])))
    return np.asarray(written["k"], np.float64), np.asarray(written["beta"], np.float64)


def retentions(inputs, weights, k, beta, num_pairs):
    """(distance from value token to query, retention) for every query and head."""
    out = []
    for row, queries in enumerate(weights > 0):
        pair_keys = list(inputs[row, : 2 * num_pairs : 2])
        for q in np.nonzero(queries)[0]:
            p = 2 * pair_keys.index(inputs[row, q]) + 1  # the pair's value token
            u = k[row, p].copy()  # [H, K]: the pair's key, carried through the later erasures
            for t in range(p + 1, q):
                u -= beta[row, t, :, None] * k[row, t] * np.sum(k[row, t] * u, -1, keepdims=True)
            for r in np.sum(k[row, p] * u, -1):
                out.append((q - p, r))
    return np.array(out)


def main(argv=None, batch_size=32):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="train.seed (default 0)")
    seed = parser.parse_args(argv).seed
    print("| key dim | pairs | beta at init (mean) | median distance | median retention |")
    print("|---|---|---|---|---|")
    for heads, pairs, extra in SETTINGS:
        overrides = [
            f"model.num_heads={heads}",
            f"data.num_pairs={pairs}",
            f"train.seed={seed}",
            *extra,
        ]
        cfg = config.load(CONFIG, overrides)
        batch = make_task(cfg.data, cfg.train.seed).train_batch(0, batch_size)  # as training
        k, beta = first_layer_writes(cfg, batch)
        found = retentions(batch["inputs"], batch["weights"], k, beta, pairs)
        distance, retention = np.median(found, axis=0)
        key_dim = cfg.model.d_model // heads
        print(f"| {key_dim} | {pairs} | {beta.mean():.2f} | {distance:.0f} | {retention:.3f} |")


if __name__ == "__main__":
    main()
