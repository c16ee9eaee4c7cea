"""The data part of the run config: one flat frozen dataclass, every field typed and defaulted.

Fields are shared where tasks share a notion (`seq_len`, `min_len`/`max_len`, `vocab_size`) and
named after their task otherwise. A config that cannot make its task is refused at construction
with one line naming the field.
"""

from dataclasses import dataclass

TASK_NAMES = (
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
)
# formal_language: the languages of fwpzoo.data.formal_languages
LANGUAGE_NAMES = (
    "parity",
    "aa_star",
    "abab_star",
    "counter_2",
    "counter_3",
    "dyck_1",
    "shuffle_2",
    "reset_dyck_1",
    "reset_dyck_1_grammar",
)
OPERATORS = "+-*"


class DataConfigError(ValueError):
    """A data config that cannot make its task; the message is one line naming the field."""


class MissingCorpusError(DataConfigError):
    """A text corpus that is not on disk; the message says how to fetch it."""


@dataclass(frozen=True)
class DataConfig:
    """What to train on.

    task: mqar | parity | mod_arith | s3 | cyclic | copy | text | formal_language | familiarity |
        regression.
    seq_len: length T of every training batch (padded with token 0, weight 0, where a task draws
        shorter sequences).
    vocab_size (mqar, copy, familiarity): token count. MQAR splits it in half, keys below values
        (Zoology); copy uses tokens 2.. as symbols, familiarity 3.. as patterns. Parity (3),
        mod_arith (5 + modulus), s3 (7), cyclic (1 + modulus) and text (256) fix their own
        vocabulary.
    num_pairs, power_alpha, random_non_queries (mqar): key-value pairs per sequence; exponent a of
        the query-gap law p(gap = g) ~ a * g^(a - 1) (small a: recall soon after the pair is
        likely); filler positions drawn uniformly from the vocabulary instead of token 0.
    rebinds (mqar): how many of the keys are bound again, to a new value, after the pairs and
        before the queries; a query's answer is its key's latest value.
    language (formal_language): one of LANGUAGE_NAMES (character prediction; lengths min_len..
        max_len for training, max_len + 1..L at an eval length L).
    min_len, max_len (parity, mod_arith, s3, cyclic, copy, formal_language): training sequence
        lengths are drawn uniformly from this range (copy: the length of the string to copy).
    modulus (mod_arith, cyclic), operators (mod_arith): answers mod `modulus`; expressions use
        the operators in `operators` (a subset of "+-*"; `*` binds tighter, no brackets).
    bos (s3, cyclic): a start token (the last token id, never scored) before every word, which
        then takes max_len + 1 <= seq_len tokens; an eval length counts the word's elements.
    repeat_interval, repeat_prob (familiarity): a pattern comes back R steps later with
        probability p (Tyulmankov et al. 2022).
    regression_dim (regression): the dimension d of x in y = w . x (fwpzoo.data.regression:
        2^d tokens for x, 2d + 1 for y, pairs scored from the d-th on).
    corpus, data_dir (text): "gutenberg" or "brown" (fetched into data_dir by
        scripts/fetch_data.py), "fixture" (the small committed test text), or a path to a text
        file or to a directory of .txt files (each split 90/5/5 by bytes).
    pack (text): rows of whole documents back to back with a reset at each document start, no
        prediction across a boundary (see fwpzoo.data.text).
    tokenizer (text): a tokenizer.json (the `tokenizers` package's format) that turns each
        document into tokens, the task's vocabulary being the tokenizer's; None: bytes.
    """

    task: str = "mqar"
    seq_len: int = 64
    # mqar, copy
    vocab_size: int = 256
    # mqar
    num_pairs: int = 8
    power_alpha: float = 0.01
    random_non_queries: bool = True
    rebinds: int = 0
    # formal_language
    language: str = "parity"
    # parity, mod_arith, s3, cyclic, copy, formal_language
    min_len: int = 3
    max_len: int = 40
    # mod_arith, cyclic
    modulus: int = 3
    operators: str = OPERATORS
    # s3, cyclic
    bos: bool = False
    # familiarity
    repeat_interval: int = 3
    repeat_prob: float = 0.5
    # regression
    regression_dim: int = 6
    # text
    corpus: str = "fixture"
    data_dir: str = "data"
    pack: bool = False
    tokenizer: str | None = None

    def __post_init__(self):
        for message in config_problems(self):
            raise DataConfigError(message)


def config_problems(cfg: DataConfig) -> list[str]:
    """Why `cfg` cannot make its task's batches (empty if it can)."""
    seq_len = cfg.seq_len
    if cfg.task not in TASK_NAMES:
        return [f"unknown data.task {cfg.task!r}; valid tasks: {', '.join(TASK_NAMES)}"]
    checks = [
        (seq_len >= 1, f"data.seq_len must be >= 1, got {seq_len}"),
        (not cfg.pack or cfg.task == "text", f"data.pack is for the text task, not {cfg.task}"),
        (
            cfg.tokenizer is None or cfg.task == "text",
            f"data.tokenizer is for the text task, not {cfg.task}",
        ),
    ]
    if cfg.task == "mqar":
        checks += mqar_checks(cfg)
    if cfg.task == "formal_language" and cfg.language not in LANGUAGE_NAMES:
        valid = ", ".join(LANGUAGE_NAMES)
        return [f"unknown data.language {cfg.language!r}; valid languages: {valid}"]
    if cfg.task in ("parity", "mod_arith", "s3", "cyclic", "copy", "formal_language"):
        checks += [
            (cfg.min_len >= 1, f"data.min_len must be >= 1, got {cfg.min_len}"),
            (
                cfg.min_len <= cfg.max_len,
                f"data.min_len={cfg.min_len} > data.max_len={cfg.max_len}",
            ),
        ]
    checks.append(
        (
            not cfg.bos or cfg.task in ("s3", "cyclic"),
            f"data.bos is for s3 and cyclic, not {cfg.task}",
        )
    )
    if cfg.bos:
        checks.append(
            (
                cfg.max_len + 1 <= seq_len,
                f"data.max_len + 1 = {cfg.max_len + 1} (with the start token of data.bos) > "
                f"data.seq_len={seq_len}",
            )
        )
    elif cfg.task in ("parity", "s3", "cyclic", "formal_language"):
        checks.append(
            (cfg.max_len <= seq_len, f"data.max_len={cfg.max_len} > data.seq_len={seq_len}")
        )
    if cfg.task == "cyclic":
        checks.append((cfg.modulus >= 2, f"data.modulus must be >= 2, got {cfg.modulus}"))
    if cfg.task == "mod_arith":
        checks += mod_arith_checks(cfg)
    if cfg.task == "copy":
        checks += [
            (cfg.vocab_size >= 3, f"data.vocab_size must be >= 3 for copy, got {cfg.vocab_size}"),
            (
                2 * cfg.max_len <= seq_len,
                f"copy needs data.seq_len >= 2 * data.max_len = {2 * cfg.max_len}, got {seq_len}",
            ),
        ]
    if cfg.task == "familiarity":
        checks += familiarity_checks(cfg)
    if cfg.task == "regression":
        d = cfg.regression_dim
        checks += [
            (1 <= d <= 10, f"data.regression_dim must be in 1..10 (2^d x tokens), got {d}"),
            (
                seq_len >= 2 * (d + 1),
                f"regression needs data.seq_len >= 2 * (data.regression_dim + 1) = {2 * (d + 1)} "
                f"(one scored pair after d), got {seq_len}",
            ),
        ]
    return [message for ok, message in checks if not ok]


def familiarity_checks(cfg: DataConfig) -> list[tuple[bool, str]]:
    R = cfg.repeat_interval
    return [
        (1 <= R < cfg.seq_len, f"data.repeat_interval must be in 1..seq_len - 1, got {R}"),
        (0 < cfg.repeat_prob < 1, f"data.repeat_prob must be in (0, 1), got {cfg.repeat_prob}"),
        (
            cfg.vocab_size >= cfg.seq_len + 3,
            f"familiarity needs data.vocab_size >= data.seq_len + 3 = {cfg.seq_len + 3} "
            f"(a new pattern per step), got {cfg.vocab_size}",
        ),
    ]


def mqar_checks(cfg: DataConfig) -> list[tuple[bool, str]]:
    N, R, seq_len = cfg.num_pairs, cfg.rebinds, cfg.seq_len
    key_tokens = cfg.vocab_size // 2 - 1  # token 0 is the filler, so keys are 1 .. V/2 - 1
    value_tokens = cfg.vocab_size - cfg.vocab_size // 2
    return [
        (N >= 1, f"data.num_pairs must be >= 1, got {N}"),
        (0 <= R <= N, f"data.rebinds must be in 0..data.num_pairs = {N}, got {R}"),
        (
            key_tokens >= N and value_tokens >= N + R,
            f"data.num_pairs={N} with data.rebinds={R} needs data.vocab_size >= "
            f"{max(2 * N + 2, 2 * (N + R))}",
        ),
        # N + R bindings take 2(N + R) positions, then N queries sit on distinct even offsets
        (
            seq_len + 1 >= 4 * N + 2 * R,
            f"mqar needs data.seq_len >= 4 * data.num_pairs + 2 * data.rebinds - 1 = "
            f"{4 * N + 2 * R - 1}, got {seq_len}",
        ),
        (cfg.power_alpha > 0, f"data.power_alpha must be > 0, got {cfg.power_alpha}"),
    ]


def mod_arith_checks(cfg: DataConfig) -> list[tuple[bool, str]]:
    ops, seq_len = cfg.operators, cfg.seq_len
    return [
        (cfg.modulus >= 2, f"data.modulus must be >= 2, got {cfg.modulus}"),
        (
            len(ops) > 0 and set(ops) <= set(OPERATORS) and len(set(ops)) == len(ops),
            f"data.operators must be distinct characters of {OPERATORS!r}, got {ops!r}",
        ),
        # an expression with c numbers takes 2c tokens (numbers, operators, "=")
        (
            cfg.max_len >= 2 and cfg.max_len // 2 >= (cfg.min_len + 1) // 2,
            f"mod_arith needs an even length in data.min_len..data.max_len "
            f"({cfg.min_len}..{cfg.max_len})",
        ),
        (cfg.max_len <= seq_len, f"data.max_len={cfg.max_len} > data.seq_len={seq_len}"),
    ]
