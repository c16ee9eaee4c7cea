"""Token vocabularies from a tokenizer.json (the format of the `tokenizers` package, which every
Hugging Face checkpoint ships), for the text task and for sampling.

Loading a tokenizer is the one place that needs the package; its absence, a missing file or one
that does not parse are each one line naming the file (DataConfigError).
"""

import functools
from pathlib import Path

import numpy as np

from fwpzoo.data.config import DataConfigError

INSTALL_HINT = "pip install tokenizers (or fwpzoo[interop])"


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizers.Tokenizer of the file at `path`."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise DataConfigError(
            f"data.tokenizer {path!r} needs the tokenizers package: {INSTALL_HINT}"
        ) from None
    if not Path(path).is_file():
        raise DataConfigError(f"data.tokenizer {path!r} is not a file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises its own exception type
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataConfigError(f"data.tokenizer {path!r} is not a tokenizer.json: {first}") from None


def vocab_size(tokenizer) -> int:
    """Token ids run over 0 .. vocab_size - 1, added (special) tokens included."""
    return tokenizer.get_vocab_size(with_added_tokens=True)


def encode(tokenizer, text: str) -> np.ndarray:
    """int32 [n] the ids of `text`, without the special tokens a template would add."""
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)
