"""State-tracking tasks: parity, modular arithmetic without brackets, the S3 word problem, cyclic
counting.

Training lengths are drawn uniformly from min_len..max_len and padded to seq_len with token 0
(weight 0); `length` given (eval_batches(seq_len=L)) makes every sequence exactly L long, for
length generalisation (Grazzi et al. 2025: train on 3..40, test up to 256).

Parity and mod_arith follow the formal-language setup of Beck et al. 2024 (xLSTM) that Grazzi et
al. 2025 train on: the answer is scored at the final position only. S3 follows Merrill et al.
2024 and Siems et al. 2025: the running product is the target at every position; cyclic counting
is the same word problem for the cyclic group Z_m (a number n rotates by n / m of a turn).
With data.bos a start token (the last token id, scored nowhere) comes before each word, as the
tokenizer of Merrill et al. 2024 prepends one (and so Siems et al. 2025): a model can write its
initial state there and leave the elements to transform it, with no write of their own.

Prefix results are computed with doubling (Hillis-Steele) scans: log2(T) vectorised steps
instead of a Python loop over tokens.
"""

import itertools
from abc import abstractmethod

import numpy as np

from fwpzoo.data.task import SyntheticTask, make_batch

BIT_TOKENS = (1, 2)  # parity: bit 0 and bit 1 (0 is padding); the answer uses the same tokens
OPERATOR_TOKENS = {"+": 1, "-": 2, "*": 3}
EQUALS_TOKEN = 4
FIRST_NUMBER_TOKEN = 5  # mod_arith: number n is token 5 + n
PERMUTATIONS = tuple(itertools.permutations(range(3)))  # S3 element i is token i + 1; 0: identity


def compose_table(perms: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """[6, 6] table[a, b] = index of a after b: (a o b)(x) = a(b(x))."""
    index = {p: i for i, p in enumerate(perms)}
    table = np.zeros((len(perms), len(perms)), np.int64)
    for (i, a), (j, b) in itertools.product(enumerate(perms), repeat=2):
        table[i, j] = index[tuple(a[b[x]] for x in range(len(a)))]
    return table


COMPOSE = compose_table(PERMUTATIONS)


def draw_lengths(rng, batch_size: int, low: int, high: int, length: int | None) -> np.ndarray:
    """[B] sequence lengths: uniform in low..high for training, all `length` for evaluation."""
    if length is not None:
        return np.full(batch_size, length)
    return rng.integers(low, high + 1, size=batch_size)


def running_product(g: np.ndarray) -> np.ndarray:
    """[B, T] P_t = g_t o g_(t-1) o ... o g_1 (apply g_1 first) for S3 indices g [B, T]."""
    p = g.copy()
    shift = 1
    while shift < p.shape[1]:
        p[:, shift:] = COMPOSE[p[:, shift:], p[:, :-shift]]  # later factors act on the left
        shift *= 2
    return p


def segmented_cumprod(x: np.ndarray, starts: np.ndarray, modulus: int) -> np.ndarray:
    """[B, N] products mod `modulus` of x from the latest start (starts[:, i] True) up to i."""
    value, closed = x.copy(), starts.copy()
    shift = 1
    while shift < x.shape[1]:
        # combine(earlier, later) = later if later already reaches its start else earlier * later
        carried = value[:, :-shift] * value[:, shift:] % modulus
        value[:, shift:] = np.where(closed[:, shift:], value[:, shift:], carried)
        closed[:, shift:] = closed[:, shift:] | closed[:, :-shift]
        shift *= 2
    return value


class Parity(SyntheticTask):
    """Bits in, the parity of all of them out at the last bit."""

    name = "parity"
    vocab_size = 3

    def generate(self, rng, batch_size, length):
        T = length or self.seq_len
        lengths = draw_lengths(rng, batch_size, self.cfg.min_len, self.cfg.max_len, length)
        valid = np.arange(T) < lengths[:, None]  # [B, T]
        bits = rng.integers(0, 2, size=(batch_size, T)) * valid
        parity = np.cumsum(bits, axis=1) % 2  # [B, T] parity of each prefix
        last = np.arange(T) == lengths[:, None] - 1  # [B, T]
        inputs = np.where(valid, BIT_TOKENS[0] + bits, 0)
        targets = np.where(last, BIT_TOKENS[0] + parity, 0)
        return make_batch(inputs, targets, last)


class WordProblem(SyntheticTask):
    """Elements of a group in (element i is token 1 + i), their running product out at every
    position; with data.bos a start token before each word, so a word of L elements takes L + 1
    tokens (an eval length L counts the elements)."""

    group_size: int

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.start_token = 1 + self.group_size if cfg.bos else None
        self.vocab_size = 1 + self.group_size + int(cfg.bos)

    @abstractmethod
    def running_product(self, g: np.ndarray) -> np.ndarray:
        """[B, T] index of the product of g[:, :t + 1] for element indices g [B, T]."""

    def generate(self, rng, batch_size, length):
        T = length or self.seq_len - int(self.cfg.bos)  # elements per row
        lengths = draw_lengths(rng, batch_size, self.cfg.min_len, self.cfg.max_len, length)
        valid = np.arange(T) < lengths[:, None]  # [B, T]
        g = rng.integers(0, self.group_size, size=(batch_size, T))
        product = self.running_product(g)  # the prefix up to t ignores what comes after the padding
        inputs, targets = np.where(valid, 1 + g, 0), np.where(valid, 1 + product, 0)
        if self.start_token is not None:
            inputs, targets, valid = after_start_token(inputs, targets, valid, self.start_token)
        return make_batch(inputs, targets, valid)


def after_start_token(inputs, targets, weights, token: int):
    """[B, T] arrays -> [B, 1 + T]: `token` in, target 0 and weight 0 before every row."""
    first = np.zeros((inputs.shape[0], 1), inputs.dtype)
    return (
        np.concatenate([first + token, inputs], axis=1),
        np.concatenate([first, targets], axis=1),
        np.concatenate([first.astype(weights.dtype), weights], axis=1),
    )


class S3(WordProblem):
    """Permutations of three elements in, their running product out at every position."""

    name = "s3"
    group_size = len(PERMUTATIONS)

    def running_product(self, g):
        return running_product(g)


class ModArith(SyntheticTask):
    """`n0 op n1 op ... n(c-1) =` with numbers mod m; the value mod m is the target at `=`.

    An expression with c numbers takes 2c tokens, so lengths are even: training draws c uniformly
    from ceil(min_len / 2)..max_len // 2, and an eval length L holds L // 2 numbers (one padding
    token at the end when L is odd). `*` binds tighter than `+` and `-`, evaluated left to right.
    """

    name = "mod_arith"
    min_eval_len = 2

    def __init__(self, cfg, seed):
        super().__init__(cfg, seed)
        self.vocab_size = FIRST_NUMBER_TOKEN + cfg.modulus
        self.operator_tokens = np.array([OPERATOR_TOKENS[op] for op in cfg.operators])

    def generate(self, rng, batch_size, length):
        cfg, m = self.cfg, self.cfg.modulus
        T = length or self.seq_len
        low, high = (cfg.min_len + 1) // 2, cfg.max_len // 2
        count = draw_lengths(rng, batch_size, low, high, None if length is None else T // 2)
        N = T // 2 + 1  # room for the numbers and operators of any T tokens
        numbers = rng.integers(0, m, size=(batch_size, N))  # [B, N]
        # ops[:, i] stands before numbers[:, i]; ops[:, 0] is never shown
        ops = self.operator_tokens[rng.integers(0, len(cfg.operators), size=(batch_size, N))]
        value = expression_value(numbers, ops, count, m)  # [B]

        pos = np.arange(T)
        tokens = np.where(
            pos % 2 == 0,
            FIRST_NUMBER_TOKEN + numbers[:, pos // 2],
            ops[:, (pos + 1) // 2],
        )  # [B, T]
        equals = pos == 2 * count[:, None] - 1  # [B, T]
        inputs = np.where(equals, EQUALS_TOKEN, np.where(pos < 2 * count[:, None], tokens, 0))
        targets = np.where(equals, FIRST_NUMBER_TOKEN + value[:, None], 0)
        return make_batch(inputs, targets, equals)


def expression_value(numbers: np.ndarray, ops: np.ndarray, count: np.ndarray, m: int) -> np.ndarray:
    """[B] value mod m of numbers[:, :count] joined by ops[:, 1:count], `*` before `+` and `-`."""
    N = numbers.shape[1]
    index = np.arange(N)
    starts = (index == 0) | (ops != OPERATOR_TOKENS["*"])  # [B, N] a product term begins here
    term = segmented_cumprod(numbers, starts, m)  # [B, N] product of the term so far
    start_sign = np.where((ops == OPERATOR_TOKENS["-"]) & (index > 0), -1, 1)
    term_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    sign = np.take_along_axis(start_sign, term_start, axis=1)  # [B, N] sign of each one's term
    next_starts = np.concatenate([starts[:, 1:], np.ones_like(starts[:, :1])], axis=1)
    in_expression = index < count[:, None]
    ends = in_expression & (next_starts | (index == count[:, None] - 1))  # [B, N] a term ends
    return np.sum(np.where(ends, sign * term, 0), axis=1) % m


class Cyclic(WordProblem):
    """Numbers mod m in (number n is token 1 + n), their running sum mod m out at every position:
    the word problem of the cyclic group Z_m, with no operator tokens between the numbers, so
    each token must apply its whole rotation."""

    name = "cyclic"

    def __init__(self, cfg, seed):
        self.group_size = cfg.modulus
        super().__init__(cfg, seed)

    def running_product(self, g):
        return np.cumsum(g, axis=1) % self.group_size
