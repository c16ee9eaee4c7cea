"""The associative-retrieval capacity task of Schlag, Irie & Schmidhuber 2021 (section 4.1).

There are S keys and S values (integers 0 .. S-1, one-hot on the model side). A sequence shows L
key-value pairs, then one query key; the target is the value paired with the query's last
occurrence. "unique": L = S keys without replacement, so each key appears once. "overwrite":
L = 2S keys with replacement, so keys repeat and a memory must overwrite them. Values are drawn
with replacement; the query is the key at a uniformly drawn position.
"""

import numpy as np

SETTINGS = ("unique", "overwrite")


def capacity_batch(
    rng_or_seed: np.random.Generator | int, batch_size: int, num_pairs: int, setting: str
) -> dict[str, np.ndarray]:
    """{"keys": [B, L], "values": [B, L], "query": [B], "target": [B]}, int32, S = num_pairs."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown capacity setting {setting!r}; valid settings: unique, overwrite")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = np.random.default_rng(rng_or_seed)
    B, S = batch_size, num_pairs
    if setting == "unique":
        keys = np.argsort(rng.random((B, S)), axis=1)  # [B, S] a random permutation per row
    else:
        keys = rng.integers(0, S, size=(B, 2 * S))  # [B, 2S]
    L = keys.shape[1]
    values = rng.integers(0, S, size=(B, L))  # [B, L]
    query = keys[np.arange(B), rng.integers(0, L, size=B)]  # [B]
    matches = keys == query[:, None]  # [B, L]
    last = L - 1 - np.argmax(matches[:, ::-1], axis=1)  # [B] position of the last occurrence
    target = values[np.arange(B), last]
    return {
        "keys": keys.astype(np.int32),
        "values": values.astype(np.int32),
        "query": query.astype(np.int32),
        "target": target.astype(np.int32),
    }
