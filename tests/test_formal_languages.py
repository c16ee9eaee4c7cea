"""The formal-language tasks: every target set against the language's definition, the length bins,
and bad input."""

import re

import numpy as np
import pytest

from fwpzoo.data import DataConfig, DataConfigError, make_task
from fwpzoo.data.config import LANGUAGE_NAMES
from fwpzoo.data.formal_languages import END, depths, dyck_paths, dyck_word


def balanced(s, opening="(", closing=")"):
    depth = 0
    for ch in s:
        depth += (ch == opening) - (ch == closing)
        if depth < 0:
            return False
    return depth == 0


# membership of a whole string, written from each language's definition
MEMBER = {
    "parity": lambda s: s.count("1") % 2 == 0,
    "aa_star": lambda s: re.fullmatch("(aa)*", s) is not None,
    "abab_star": lambda s: re.fullmatch("(abab)*", s) is not None,
    "counter_2": lambda s: len(s) % 2 == 0 and s == "a" * (len(s) // 2) + "b" * (len(s) // 2),
    "counter_3": lambda s: len(s) % 3 == 0 and s == "".join(c * (len(s) // 3) for c in "abc"),
    "dyck_1": balanced,
    "shuffle_2": lambda s: (
        balanced(s.replace("[", "").replace("]", ""))
        and balanced(s.replace("(", "").replace(")", ""), "[", "]")
    ),
    "reset_dyck_1": lambda s: balanced(s.rsplit("1", 1)[-1]),
    "reset_dyck_1_grammar": lambda s: balanced(s.rsplit("1", 1)[-1]),
}


def task(language, **fields):
    cfg = dict(task="formal_language", language=language, seq_len=50, min_len=1, max_len=50)
    return make_task(DataConfig(**{**cfg, **fields}), seed=0)


def decoded(t, batch):
    """[(string, [target set per position])] of a batch."""
    symbols, classes = t.language.symbols, t.language.classes
    out = []
    for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True):
        n = int((inputs > 0).sum())
        string = "".join(symbols[i - 1] for i in inputs[:n])
        out.append((string, [classes[j - 1 - len(symbols)] for j in targets[:n]]))
    return out


@pytest.mark.parametrize("language", LANGUAGE_NAMES)
def test_targets_are_the_characters_that_may_follow(language):
    """The string is in the language; each next character is in the previous target set; the
    end mark is in a set exactly where the prefix is in the language."""
    t = task(language)
    batches = [t.train_batch(0, 16), next(t.eval_batches("test", 16, 1, seq_len=100))]
    for string, targets in (pair for b in batches for pair in decoded(t, b)):
        assert MEMBER[language](string), string
        for i, target in enumerate(targets):
            assert (END in target) == MEMBER[language](string[: i + 1]), (string, i)
            if i + 1 < len(string):
                assert string[i + 1] in target, (string, i)


@pytest.mark.parametrize("language", LANGUAGE_NAMES)
def test_training_and_test_bins(language):
    t = task(language)
    train = (t.train_batch(1, 64)["weights"] > 0).sum(axis=1)
    test = next(t.eval_batches("test", 64, 1, seq_len=100))
    test_lengths = (test["weights"] > 0).sum(axis=1)
    assert test["inputs"].shape == (64, 100)
    assert train.min() >= 1 and train.max() <= 50
    assert test_lengths.min() >= 51 and test_lengths.max() <= 100
    assert len(set(test_lengths)) > 1  # lengths vary over the bin


def test_dyck_words_are_uniform():
    rng = np.random.default_rng(0)
    words = [dyck_word(rng, 6) for _ in range(2500)]
    counts = np.array([words.count(w) for w in set(words)])
    assert len(counts) == dyck_paths(6, 0) == 5
    assert counts.min() > 2500 / 5 * 0.85


def test_resets_erase_open_counts():
    """The reset comes at the depths a cut through a Dyck word leaves, not only at 0 or 1: a
    reset at depth <= 1 would leave nothing to recognise beyond Dyck-1."""
    t = task("reset_dyck_1")
    for batch in (t.train_batch(0, 256), next(t.eval_batches("test", 256, 1, seq_len=100))):
        prefixes = [s[: s.index("1")] for s, _ in decoded(t, batch)]
        at_reset = np.array([depths(p)[-1] if p else 0 for p in prefixes])  # [256]
        assert np.mean(at_reset >= 2) > 0.3 and np.mean(at_reset == 0) > 0.02, at_reset


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"language": "anbncn"}, "unknown data.language 'anbncn'; valid languages: parity"),
        ({"language": "abab_star", "max_len": 3}, "abab_star has no strings of lengths 1..3"),
        ({"max_len": 60}, "data.max_len=60 > data.seq_len=50"),
    ],
)
def test_bad_languages_and_bins_are_refused(fields, message):
    with pytest.raises(DataConfigError, match=re.escape(message)):
        task(fields.pop("language", "parity"), **fields)


def test_an_eval_bin_inside_the_training_bin_is_refused():
    t = task("counter_3", max_len=50)
    with pytest.raises(DataConfigError, match="at least 51"):
        next(t.eval_batches("test", 4, 1, seq_len=50))
    t = task("abab_star", max_len=50)
    with pytest.raises(DataConfigError, match="abab_star has no strings of lengths 51..51"):
        next(t.eval_batches("test", 4, 1, seq_len=51))
