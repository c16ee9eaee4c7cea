"""Byte-level corpora and their train/valid/test splits.

- "gutenberg" (data_dir/gutenberg, 18 books): each book split 90/5/5 by bytes, then the parts
  concatenated per split in file-name order. A global split would make the test set one book.
- "brown" (data_dir/brown, 500 files of word/tag tokens): tags stripped, one sentence per line,
  split by words as Bengio et al. 2003: the first 800,000 words train, the next 200,000 valid,
  the rest test.
- "fixture": the small text committed under tests/fixtures, split 90/5/5 by bytes.
- any other value is a path: a text file split 90/5/5, or a folder whose *.txt files are split
  like the Gutenberg books.

Documents (for packing, data.pack): a Gutenberg book or a .txt file of a folder is a document, and
so is a Brown file; a split holds each document's part of it, in file order (a Brown file the word
cut passes through gives a document to both splits). The fixture, or a single text file, is one
document. A split's bytes are its documents' bytes concatenated.
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
Documents = dict[str, list[np.ndarray]]  # split name -> the documents' uint8 bytes, in order


def split_bytes(data: bytes) -> list[bytes]:
    """[train, valid, test]: the first 90%, the next 5%, the rest."""
    cuts = [int(len(data) * f) for f in BYTE_FRACTIONS]
    return [data[: cuts[0]], data[cuts[0] : cuts[1]], data[cuts[1] :]]


def to_documents(parts: list[list[bytes]]) -> Documents:
    """[train, valid, test] lists of document bytes -> Documents (empty documents dropped)."""
    pairs = zip(SPLITS, parts, strict=True)
    return {
        split: [np.frombuffer(doc, dtype=np.uint8) for doc in docs if doc] for split, docs in pairs
    }


def split_files(files: list[Path]) -> Documents:
    """Each file (a document) split 90/5/5 by bytes; each split holds every file's part, in the
    given order."""
    per_file = [split_bytes(path.read_bytes()) for path in files]
    return to_documents([[parts[i] for parts in per_file] for i in range(len(SPLITS))])


def brown_sentences(path: Path) -> list[list[str]]:
    """The words of every sentence (a non-empty line) of a file, tags (after the last '/')
    stripped."""
    sentences = []
    for line in path.read_text(encoding="latin-1").splitlines():
        words = [token.rsplit("/", 1)[0] for token in line.split()]
        if words:
            sentences.append(words)
    return sentences


def split_brown(files: list[Path]) -> Documents:
    """Bengio et al. 2003 split by word count; words joined by spaces, sentences by newlines,
    one document per file (per split it reaches)."""
    words, separators, file_of = [], [], []
    for i, path in enumerate(files):
        for sentence in brown_sentences(path):
            words += sentence
            separators += [" "] * (len(sentence) - 1) + ["\n"]
            file_of += [i] * len(sentence)
    bounds = [0, *BROWN_WORDS, len(words)]
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        docs = {}  # file index -> its text in this split, in file order
        for w, s, i in zip(words[a:b], separators[a:b], file_of[a:b], strict=True):
            docs.setdefault(i, []).append(w + s)
        parts.append(["".join(doc).encode("latin-1") for doc in docs.values()])
    return to_documents(parts)


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
    documents = load_documents(corpus, data_dir)
    return {split: concatenated(docs) for split, docs in documents.items()}


def concatenated(documents: list[np.ndarray]) -> np.ndarray:
    """The documents' bytes back to back, uint8 [n]."""
    return np.concatenate([np.zeros(0, np.uint8), *documents])


def load_documents(corpus: str, data_dir: str) -> Documents:
    """{"train", "valid", "test"} -> the documents of corpus `corpus` (a name or a path)."""
    if corpus == "gutenberg":
        return split_files(fetched_files(corpus, data_dir))
    if corpus == "brown":
        return split_brown(fetched_files(corpus, data_dir))
    path = FIXTURE if corpus == "fixture" else Path(corpus)
    if path.is_file():
        return to_documents([[part] for part in split_bytes(path.read_bytes())])
    if path.is_dir() and any(path.glob("*.txt")):
        return split_files(sorted(path.glob("*.txt")))
    raise MissingCorpusError(
        f"data.corpus {corpus!r} is neither a corpus name ({', '.join([*PACKAGES, 'fixture'])}) "
        "nor a text file nor a folder of .txt files"
    )
