"""Language modelling on a corpus's train/valid/test documents: byte level (vocabulary 256), or
with data.tokenizer the tokens of a tokenizer.json (its vocabulary; each document tokenized on
its own, so no token spans two documents; metrics loss and perplexity per token). Below, "byte"
reads "token" when a tokenizer is set.

Training cuts the train bytes into W = (n - 1) // T windows of T + 1 bytes (inputs are the first
T, targets the last T), and one epoch visits them in a permutation seeded by (seed, epoch).
Example e of the stream is window order(e // W)[e % W], so batch `index` is a pure function of
(seed, index) and resuming mid-epoch is exact.

Evaluation predicts every byte of the split after the first exactly once: consecutive windows of
T inputs, the last one and the last batch padded with weight 0.

Packing (data.pack=true): the split is its documents (books, files; see corpora) back to back, cut
into the same windows, so a row holds the end of one document and the start of the next wherever
a boundary falls in it. Each batch then carries "reset" [B, T], True at every input that is a
document's first byte, and the target that is a document's first byte gets weight 0: the model
never sees across a boundary and is never scored on predicting one document from another.
"""

import functools
import math

import numpy as np

from fwpzoo.data.config import DataConfigError
from fwpzoo.data.corpora import concatenated, load_documents
from fwpzoo.data.task import STREAMS, eval_stream, make_batch
from fwpzoo.data.tokenizer import encode, load_tokenizer, vocab_size


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num_windows: int) -> np.ndarray:
    """[W] the order in which epoch `epoch` visits the training windows."""
    return np.random.default_rng((seed, STREAMS["train"], epoch)).permutation(num_windows)


class Text:
    name = "text"
    vocab_size = 256
    metrics = ("loss", "bpc")

    def __init__(self, cfg, seed):
        self.seed = seed
        self.seq_len = cfg.seq_len
        self.pack = cfg.pack
        documents = load_documents(cfg.corpus, cfg.data_dir)
        self.tokenizer = None if cfg.tokenizer is None else load_tokenizer(cfg.tokenizer)
        if self.tokenizer is not None:
            documents = {split: self._tokens(docs) for split, docs in documents.items()}
            self.vocab_size = vocab_size(self.tokenizer)
            self.metrics = ("loss", "perplexity")
        self.splits = {split: concatenated(docs) for split, docs in documents.items()}
        # [n] True at each document's first byte of the split
        self.starts = {split: document_starts(docs) for split, docs in documents.items()}
        self.num_windows = (self.splits["train"].size - 1) // self.seq_len
        sizes = ", ".join(f"{name} {data.size}" for name, data in self.splits.items())
        if self.num_windows < 1:
            raise DataConfigError(
                f"the train split of {cfg.corpus!r} ({self.splits['train'].size} bytes) is "
                f"shorter than data.seq_len + 1 = {self.seq_len + 1} (split sizes: {sizes} bytes)"
            )
        for split in ("valid", "test"):
            # evaluation predicts every byte after the first: one byte scores nothing, and an
            # empty score would read as a perfect loss of 0
            if self.splits[split].size < 2:
                raise DataConfigError(
                    f"the {split} split of {cfg.corpus!r} has {self.splits[split].size} bytes, "
                    f"too few to evaluate (at least 2; split sizes: {sizes} bytes)"
                )

    def _tokens(self, documents: list[np.ndarray]) -> list[np.ndarray]:
        """Each document's bytes (UTF-8; a split may cut a character, read as U+FFFD) -> its
        int32 token ids; documents with no token dropped."""
        texts = [doc.tobytes().decode("utf-8", "replace") for doc in documents]
        tokens = [encode(self.tokenizer, text) for text in texts]
        return [doc for doc in tokens if doc.size]

    def train_batch(self, index: int, batch_size: int):
        example = index * batch_size + np.arange(batch_size)  # [B] positions in the stream
        epoch, slot = np.divmod(example, self.num_windows)
        window = np.empty(batch_size, np.int64)
        for e in np.unique(epoch):  # a batch spans at most a few epochs
            window[epoch == e] = epoch_order(self.seed, int(e), self.num_windows)[slot[epoch == e]]
        at = window[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # [B, T + 1]
        return self._batch("train", at, np.ones((batch_size, self.seq_len), bool))

    def eval_batches(self, split, batch_size, num_batches=None, seq_len=None):
        eval_stream(split)  # refuses a split name other than valid and test
        data = self.splits[split]
        T = seq_len or self.seq_len
        windows = math.ceil((data.size - 1) / T)
        available = math.ceil(windows / batch_size)
        for b in range(available if num_batches is None else min(num_batches, available)):
            start = (b * batch_size + np.arange(batch_size)) * T  # [B]
            at = start[:, None] + np.arange(T + 1)  # [B, T + 1] byte positions
            yield self._batch(split, at, at[:, 1:] < data.size)

    def _batch(self, split: str, at: np.ndarray, weights: np.ndarray):
        """The batch of byte positions at [B, T + 1] of `split` (past its end: byte 0), scored
        where weights [B, T]; with packing, reset and no score at document starts."""
        data, inside = self.splits[split], at < self.splits[split].size
        rows = np.where(inside, data[np.minimum(at, data.size - 1)], 0)  # [B, T + 1]
        if not self.pack:
            return make_batch(rows[:, :-1], rows[:, 1:], weights)
        starts = inside & self.starts[split][np.minimum(at, data.size - 1)]  # [B, T + 1]
        return make_batch(rows[:, :-1], rows[:, 1:], weights & ~starts[:, 1:], starts[:, :-1])


def document_starts(documents: list[np.ndarray]) -> np.ndarray:
    """[n] bool over the concatenated documents, True at each one's first byte."""
    starts = np.zeros(sum(doc.size for doc in documents), bool)
    starts[np.cumsum([0] + [doc.size for doc in documents[:-1]])[: len(documents)]] = True
    return starts
