"""The token stream a stage reads: whole documents of a split, chosen up to a token budget, tokenized as one text."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edge_memdec.corpus import Document, join_documents, split_documents_of

VALIDATION_SEED = 0  # one validation sample for every run and report, whatever --seed orders the training data


def choose_documents(
    tokenizer: Tokenizer, docs: list[Document], max_tokens: int | None, seed: int = 0
) -> list[Document]:
    """A seeded random subset of whole documents with about `max_tokens` tokens in total (all if None),
    kept in their split order."""
    if max_tokens is None:
        return docs
    lengths = [len(e.ids) for e in tokenizer.encode_batch([d.text for d in docs], add_special_tokens=False)]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total >= max_tokens:
            break
        chosen.append(i)
        total += lengths[i]
    return [docs[i] for i in sorted(chosen)]


def token_stream(
    tokenizer: Tokenizer, docs: list[Document], max_tokens: int | None, seed: int = 0
) -> np.ndarray:
    """Token ids (int32, no BOS) of the chosen documents joined by blank lines, cut to `max_tokens`."""
    text = join_documents(choose_documents(tokenizer, docs, max_tokens, seed))
    tokens = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    return tokens if max_tokens is None else tokens[:max_tokens]


def validation_tokens(corpus: Path | None, tokenizer: Tokenizer | Path, max_tokens: int) -> np.ndarray | None:
    """The token stream a run validates on (int32 [<= max_tokens]): whole documents of `corpus`'s validation
    split, the VALIDATION_SEED sample (so runs of any --seed, and the recipe's report, validate on the same
    documents), tokenized by `tokenizer` (or by the base at that path, loaded only when needed).
    None without a corpus, and on every torchrun rank but 0 (rank 0 alone validates)."""
    from edge_memdec.train.steps import distributed

    if corpus is None or distributed()[0] != 0:
        return None
    if not isinstance(tokenizer, Tokenizer):
        from edge_memdec.train.base import load_tokenizer

        tokenizer = load_tokenizer(Path(tokenizer))
    return token_stream(tokenizer, split_documents_of(corpus, "validation"), max_tokens, VALIDATION_SEED)
