"""Corpora that need no network, tokenized once and cut into fixed-length blocks.

Default: the Python language reference behind ``help()`` (``pydoc_data.topics``, in every
CPython, PSF-2.0). Any local ``.txt`` file, or ``.jsonl`` with a ``text`` field per line,
can be given instead. The text's sha256 is recorded with every result: curves are
comparable only when it matches (pydoc_data changes between Python versions).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def pydoc_corpus() -> Corpus:
    import pydoc_data.topics as topics

    return Corpus("pydoc_data.topics", "\n\n".join(topics.topics[k] for k in sorted(topics.topics)))


def file_corpus(path: Path) -> Corpus:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "text" not in record:
                raise ValueError(f"--data {path}: line {i} has no 'text' field")
            texts.append(str(record["text"]))
        text = "\n\n".join(texts)
    else:
        text = path.read_text()
    if not text.strip():
        raise ValueError(f"--data {path} holds no text")
    return Corpus(path.name, text)


def load_corpus(path: Path | None) -> Corpus:
    return pydoc_corpus() if path is None else file_corpus(path)


@dataclass(frozen=True)
class Blocks:
    """Train and eval blocks (``[count, seq_len]`` token ids) and the train order."""

    train: torch.Tensor
    eval: torch.Tensor
    order: torch.Tensor  # a seeded permutation of the train blocks

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The ``step``-th batch: consecutive blocks of the permutation, wrapping around."""
        n = len(self.order)
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
        return self.train[self.order[idx]]

    def for_seed(self, seed: int) -> "Blocks":
        """The same train and eval blocks, the train order drawn from ``seed``."""
        order = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))
        return Blocks(train=self.train, eval=self.eval, order=order)


#: The eval split never depends on the run's seed: every run of every seed is scored on
#: the same held-out blocks, so seeds vary only the training order (and statistics samples).
SPLIT_SEED = 0


def make_blocks(ids: list[int], seq_len: int, seed: int, eval_fraction: float = 0.1, max_eval: int = 8) -> Blocks:
    """Cut ``ids`` into non-overlapping blocks: a fixed held-out subset of at most
    ``max_eval`` blocks (≤ 10 %, chosen with :data:`SPLIT_SEED`) for eval, the rest for
    training in an order drawn from ``seed``. Same ``seed``, same batches: the paired design."""
    count = len(ids) // seq_len
    if count < 4:
        raise ValueError(f"corpus too short: {len(ids)} tokens make {count} blocks of {seq_len}; need >= 4")
    if max_eval < 1:
        raise ValueError(f"--eval-blocks must be >= 1, got {max_eval}")
    data = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    perm = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_eval = max(1, min(max_eval, int(count * eval_fraction)))
    split = Blocks(train=data[perm[n_eval:]], eval=data[perm[:n_eval]], order=torch.arange(count - n_eval))
    return split.for_seed(seed)
