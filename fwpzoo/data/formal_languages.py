"""Formal-language recognition as character prediction (Bhattamishra, Ahuja & Goyal, EMNLP 2020),
the setup of Irie, Csordas & Schmidhuber (EMNLP 2023).

The model reads a string of the language one character at a time; after each character its
target is the set of characters that may follow, with `$` (end of string) in the set where the
prefix read so far is itself in the language. Each distinct set is one class, so the model
predicts one token per position; a string counts as recognised only if every position is right
(`sequence_accuracy`).

    language      strings                                   target sets after a prefix
    parity        bit strings with an even number of 1s     01 / 01$ (prefix parity even)
    aa_star       (aa)*                                     a / a$ (prefix length even)
    abab_star     (abab)*                                   b, a, b, a$ (prefix length mod 4)
    counter_2     a^n b^n                                   ab, then b, then $ after the last b
    counter_3     a^n b^n c^n                               ab, then b, then c, then $
    dyck_1        balanced ( )                              ($ at depth 0, () deeper
    shuffle_2     interleaved Dyck-1 words over ( ) and [ ] ([ plus ) if (-depth > 0, ] if
                                                            [-depth > 0, $ if both are 0
    reset_dyck_1  a Dyck-1 prefix, the reset 1, a Dyck-1    (1$ at depth 0, ()1 deeper; depth
                  word                                      counts from the last reset
    reset_dyck_1_grammar  the same language, drawn as Bhattamishra et al.'s code draws it

Lengths: training strings have lengths uniform over the language's lengths in
data.min_len..data.max_len ("bin 0": 1..50); an evaluation at eval length L draws lengths in
data.max_len + 1..L ("bin 1": L = 100, lengths 51..100), padded to L. A bin that holds no
string of the language is refused.

Generators (deterministic from the task's seed, stream and batch index): parity draws uniform
bits and sets the last one so the count of 1s is even; dyck_1 draws uniformly among the Dyck
words of the drawn length (each step's bracket with the probability its completions carry);
shuffle_2 splits the length into two even parts, draws a Dyck word for each and interleaves
them at uniformly chosen positions; reset_dyck_1 places the reset uniformly, draws the prefix as
the first half of a Dyck word of twice its length (so the reset erases an open count: depth 0, 2
and 6 before it at the 10th, 50th and 90th percentile of bin 0, 1, 5 and 11 of bin 1) and the
part after the reset as a whole Dyck word. Bhattamishra et al. draw Dyck words from a
branching grammar instead and keep a fixed set of 10,000 training strings; here every batch is
fresh (aa_star, abab_star and the counters have one string per length anyway).
reset_dyck_1_grammar is their generator (S -> (S) with p 0.5, SS with q 0.25, else empty; a
uniform cut of one word, the reset, a second word), each string redrawn until its length falls
in the bin, so lengths follow the grammar (most training strings are short) rather than being
uniform; batches are fresh, not their fixed, de-duplicated set.
"""

import math
import random
from dataclasses import dataclass
from functools import cache

import numpy as np

from fwpzoo.data.config import LANGUAGE_NAMES, DataConfigError
from fwpzoo.data.task import SyntheticTask, make_batch

END = "$"


@dataclass(frozen=True)
class Language:
    symbols: str  # the input alphabet; symbol i is token 1 + i
    classes: tuple[str, ...]  # the target sets; class j is token 1 + len(symbols) + j
    period: int  # string lengths are multiples of this (reset_dyck_1: any length)

    def valid_lengths(self, low: int, high: int) -> list[int]:
        return [n for n in range(max(low, 1), high + 1) if n % self.period == 0]


@cache
def dyck_paths(steps: int, depth: int) -> int:
    """Bracket sequences of `steps` characters from `depth` down to 0 that never go below 0."""
    if depth < 0 or depth > steps or (steps - depth) % 2:
        return 0
    down = (steps + depth) // 2  # closing brackets among the steps
    return math.comb(steps, down) - math.comb(steps, down + 1)


def dyck_word(rng, n: int) -> str:
    """A Dyck-1 word of even length n, uniform among all of them."""
    word, depth = [], 0
    for remaining in range(n, 0, -1):
        opening = dyck_paths(remaining - 1, depth + 1) / dyck_paths(remaining, depth)
        if rng.random() < opening:
            word.append("(")
            depth += 1
        else:
            word.append(")")
            depth -= 1
    return "".join(word)


def depths(string: str, opening: str = "(", closing: str = ")", reset: str = "1") -> list[int]:
    """The bracket depth after each character, counted from the last reset."""
    depth, out = 0, []
    for ch in string:
        depth = 0 if ch == reset else depth + (ch == opening) - (ch == closing)
        out.append(depth)
    return out


def parity(rng, n):
    bits = rng.integers(0, 2, size=n)
    bits[-1] = bits[:-1].sum() % 2  # an even number of 1s: the string is in the language
    return "".join(map(str, bits))


def parity_targets(s):
    ones = np.cumsum([ch == "1" for ch in s]).tolist()
    return ["01" + END * (c % 2 == 0) for c in ones]


def abab_targets(s):
    return [("b", "a", "b", "a" + END)[i % 4] for i in range(len(s))]


def counter_string(letters):
    return lambda rng, n: "".join(ch * (n // len(letters)) for ch in letters)


def counter_targets(letters):
    def targets(s):
        m = len(s) // len(letters)
        out = []
        for i in range(len(s)):
            block, within = divmod(i, m)
            if block == 0:
                out.append(letters[:2])  # still in the a's: another a or the first b
            elif within < m - 1:
                out.append(letters[block])  # the block is not complete yet
            else:
                out.append(letters[block + 1] if block + 1 < len(letters) else END)
        return out

    return targets


def shuffle_2(rng, n):
    first = 2 * int(rng.integers(0, n // 2 + 1))
    words = [iter(dyck_word(rng, first)), iter(dyck_word(rng, n - first).translate(SQUARE))]
    from_first = np.zeros(n, bool)
    from_first[rng.choice(n, size=first, replace=False)] = True
    return "".join(next(words[0] if f else words[1]) for f in from_first)


SQUARE = str.maketrans("()", "[]")


def shuffle_targets(s):
    round_, square = depths(s), depths(s, "[", "]")
    return [
        "(" + ")" * (r > 0) + "[" + "]" * (q > 0) + END * (r == q == 0)
        for r, q in zip(round_, square, strict=True)
    ]


def reset_dyck(rng, n):
    prefix = int(rng.integers(0, n))  # characters before the reset
    after = n - 1 - prefix
    if after % 2:  # the part after the reset is a whole Dyck word: even
        prefix, after = prefix + 1, after - 1
    # the first half of a Dyck word: the reset cuts an open count, as a reset at a random point
    # of a word does in Bhattamishra et al.'s data (a prefix of a word of its own length would
    # end at depth 0 or 1 and leave the reset nothing to erase)
    start = dyck_word(rng, 2 * prefix)[:prefix]
    return start + "1" + dyck_word(rng, after)


# Bhattamishra, Ahuja & Goyal's generator (their code's reset Dyck-1 language): a Dyck word from
# the branching grammar S -> (S) | SS | empty with these probabilities
GRAMMAR_P, GRAMMAR_Q = 0.5, 0.25


def grammar_dyck(draw: random.Random, size: int, max_size: int) -> str:
    """A Dyck-1 word from the grammar, `size` characters already around it; a part that would
    outgrow max_size becomes the empty word, as in their generator."""
    if size >= max_size:
        return ""
    u = draw.random()
    if u < GRAMMAR_P:
        word = "(" + grammar_dyck(draw, size + 2, max_size) + ")"
    elif u < GRAMMAR_P + GRAMMAR_Q:
        word = grammar_dyck(draw, size, max_size) + grammar_dyck(draw, size, max_size)
    else:
        return ""
    return word if len(word) <= max_size else ""


def grammar_reset_dyck(draw: random.Random, low: int, high: int) -> str:
    """Their reset Dyck-1 string: a prefix of one grammar word (cut uniformly), the reset, a
    second word (each of at most `high` characters); drawn again until its length is in
    low..high, so a bin holds the lengths their generator gives there, not uniform ones."""
    while True:
        first, second = grammar_dyck(draw, 0, high), grammar_dyck(draw, 0, high)
        string = first[: draw.randint(0, len(first))] + "1" + second
        if low <= len(string) <= high:
            return string


def dyck_targets(extra=""):
    def targets(s):
        return ["(" + extra + END if d == 0 else "()" + extra for d in depths(s)]

    return targets


# name -> (language, draw(rng, n) -> string, targets(string) -> list of class strings)
LANGUAGES = {
    "parity": (Language("01", ("01", "01$"), 1), parity, parity_targets),
    "aa_star": (
        Language("a", ("a", "a$"), 2),
        lambda rng, n: "a" * n,
        lambda s: ["a" + END * (i % 2) for i in range(len(s))],
    ),
    "abab_star": (
        Language("ab", ("a", "b", "a$"), 4),
        lambda rng, n: "ab" * (n // 2),
        abab_targets,
    ),
    "counter_2": (Language("ab", ("ab", "b", "$"), 2), counter_string("ab"), counter_targets("ab")),
    "counter_3": (
        Language("abc", ("ab", "b", "c", "$"), 3),
        counter_string("abc"),
        counter_targets("abc"),
    ),
    "dyck_1": (Language("()", ("($", "()"), 2), dyck_word, dyck_targets()),
    "shuffle_2": (
        Language("()[]", ("([$", "()[", "([]", "()[]"), 2),
        shuffle_2,
        shuffle_targets,
    ),
    "reset_dyck_1": (
        Language("()1", ("(1$", "()1"), 1),
        reset_dyck,
        dyck_targets("1"),
    ),
}


# languages drawn as their source's generator draws them: a string of any length in a bin,
# draw(random.Random, low, high) -> string, with its language and targets in LANGUAGES
BINNED = {"reset_dyck_1_grammar": grammar_reset_dyck}
LANGUAGES["reset_dyck_1_grammar"] = (LANGUAGES["reset_dyck_1"][0], None, dyck_targets("1"))

assert tuple(LANGUAGES) == LANGUAGE_NAMES


class FormalLanguage(SyntheticTask):
    """The language data.language as character prediction (module docstring)."""

    name = "formal_language"
    metrics = ("loss", "accuracy", "sequence_accuracy")

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.language, self.draw, self.targets = LANGUAGES[cfg.language]
        self.vocab_size = 1 + len(self.language.symbols) + len(self.language.classes)
        self.min_eval_len = cfg.max_len + 1
        self.lengths(None)  # refuses a training bin without strings now, before any training

    def lengths(self, length: int | None) -> list[int]:
        """The string lengths of the training bin (None) or of the eval bin ending at `length`."""
        low, high = (
            (self.cfg.min_len, self.cfg.max_len)
            if length is None
            else (self.cfg.max_len + 1, length)
        )
        valid = self.language.valid_lengths(low, high)
        if not valid:
            raise DataConfigError(
                f"{self.cfg.language} has no strings of lengths {low}..{high} (its lengths are "
                f"multiples of {self.language.period})"
            )
        return valid

    def generate(self, rng, batch_size, length):
        T = length or self.seq_len
        lengths = self.lengths(length)
        if self.cfg.language in BINNED:
            draw = random.Random(int(rng.integers(2**63)))  # a pure-Python grammar: its own RNG
            strings = [
                BINNED[self.cfg.language](draw, lengths[0], lengths[-1]) for _ in range(batch_size)
            ]
        else:
            strings = [self.draw(rng, int(n)) for n in rng.choice(lengths, size=batch_size)]
        inputs = np.zeros((batch_size, T), np.int64)
        targets = np.zeros((batch_size, T), np.int64)
        first_class = 1 + len(self.language.symbols)
        for row, string in enumerate(strings):
            n = len(string)
            inputs[row, :n] = [1 + self.language.symbols.index(ch) for ch in string]
            targets[row, :n] = [
                first_class + self.language.classes.index(c) for c in self.targets(string)
            ]
        return make_batch(inputs, targets, inputs > 0)
