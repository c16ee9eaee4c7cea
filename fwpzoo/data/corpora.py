"""Byte-level corpora and their train/valid/test splits.

- "gutenberg" (data_dir/gutenberg, 18 books): each book split 90/5/5 by bytes, then the parts
  concatenated per split in file-name order. A global split would make the test set one book.
- "brown" (data_dir/brown, 500 files of word/tag tokens): tags stripped, one sentence per line,
  split by words as Bengio et al. 2003: the first 800,000 words train, the next 200,000 valid,
  the rest test.
- "fixture": the small text committed under tests/fixtures, split 90/5/5 by bytes.
- any other value is a path: a text file split 90/5/5, or a folder whose *.txt files are split
  like the Gutenberg books.
"""

from pathlib import Path

import numpy as np

from fwpzoo.data.config import MissingCorpusError
from fwpzoo.data.fetch import FETCH_COMMAND, PACKAGES

FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "carroll-alice.txt"
SPLITS = ("train", "valid", "test")
BYTE_FRACTIONS = (0.9, 0.95)  # where valid and test begin
BROWN_WORDS = (800_000, 1_000_000)  # where valid and test begin

Splits = dict[str, np.ndarray]  # split name -> uint8 [n]


def split_bytes(data: bytes) -> list[bytes]:
    """[train, valid, test]: the first 90%, the next 5%, the rest."""
    cuts = [int(len(data) * f) for f in BYTE_FRACTIONS]
    return [data[: cuts[0]], data[cuts[0] : cuts[1]], data[cuts[1] :]]


def to_splits(parts: list[bytes]) -> Splits:
    pairs = zip(SPLITS, parts, strict=True)
    return {split: np.frombuffer(part, dtype=np.uint8) for split, part in pairs}


def split_files(files: list[Path]) -> Splits:
    """Each file split 90/5/5 by bytes; the parts concatenated per split in the given order."""
    per_file = [split_bytes(path.read_bytes()) for path in files]
    return to_splits([b"".join(parts[i] for parts in per_file) for i in range(len(SPLITS))])


def brown_sentences(files: list[Path]) -> list[list[str]]:
    """The words of every sentence (a non-empty line), tags (after the last '/') stripped."""
    sentences = []
    for path in files:
        for line in path.read_text(encoding="latin-1").splitlines():
            words = [token.rsplit("/", 1)[0] for token in line.split()]
            if words:
                sentences.append(words)
    return sentences


def split_brown(files: list[Path]) -> Splits:
    """Bengio et al. 2003 split by word count; words joined by spaces, sentences by newlines."""
    words, separators = [], []
    for sentence in brown_sentences(files):
        words += sentence
        separators += [" "] * (len(sentence) - 1) + ["\n"]
    bounds = [0, *BROWN_WORDS, len(words)]
    parts = [
        "".join(w + s for w, s in zip(words[a:b], separators[a:b], strict=True)).encode("latin-1")
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return to_splits(parts)


def fetched_files(name: str, data_dir: str) -> list[Path]:
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise MissingCorpusError(
            f"corpus {name!r} is not in {folder}; fetch it with: "
            f"{FETCH_COMMAND} {name} --data-dir {data_dir}"
        )
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_corpus(corpus: str, data_dir: str) -> Splits:
    """{"train", "valid", "test"} -> uint8 bytes of corpus `corpus` (a name or a path)."""
    if corpus == "gutenberg":
        return split_files(fetched_files(corpus, data_dir))
    if corpus == "brown":
        return split_brown(fetched_files(corpus, data_dir))
    path = FIXTURE if corpus == "fixture" else Path(corpus)
    if path.is_file():
        return to_splits(split_bytes(path.read_bytes()))
    if path.is_dir() and any(path.glob("*.txt")):
        return split_files(sorted(path.glob("*.txt")))
    raise MissingCorpusError(
        f"data.corpus {corpus!r} is neither a corpus name ({', '.join([*PACKAGES, 'fixture'])}) "
        "nor a text file nor a folder of .txt files"
    )
