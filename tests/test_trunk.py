"""The shared trunk: a decoder whose lower blocks are the base's own runs only its upper blocks, on the base's
hidden state, and gives the same distributions as the whole decoder run beside the base."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.gguf_file import read_gguf
from edge_memdec.pair_check import shared_blocks


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """The top-only GGUFs go to a temp cache, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


TEXT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software. " * 6


def with_new_blocks(base, out, blocks: tuple[int, ...], seed: int):
    """A copy of the f32 GGUF `base` whose matrices in `blocks` hold new random values (the rest: its bytes)."""
    shutil.copy(base, out)
    info = read_gguf(out)
    data = np.memmap(out, np.uint8, "r+")
    rng = np.random.default_rng(seed)
    for t in info.tensors:
        if t.name.startswith(tuple(f"blk.{b}." for b in blocks)) and len(t.shape) == 2:
            view = data[t.offset : t.offset + t.n_bytes].view(np.float32)
            view[:] = rng.normal(0, view.std() * 1.5, view.size).astype(np.float32)
    data.flush()
    return out


@pytest.fixture(scope="module")
def decoder(tiny_llama_gguf, tmp_path_factory):
    """tiny_llama_gguf (2 blocks) with block 1 retrained (here: new random weights), block 0 the base's own."""
    return with_new_blocks(tiny_llama_gguf, tmp_path_factory.mktemp("trunk") / "memdec.gguf", (1,), seed=5)


def test_shared_blocks_counts_the_base_blocks_held_byte_for_byte(tiny_llama_gguf, decoder, tmp_path):
    base = read_gguf(tiny_llama_gguf)
    assert shared_blocks(base, read_gguf(decoder)) == 1
    other = with_new_blocks(tiny_llama_gguf, tmp_path / "other.gguf", (0,), seed=6)
    assert shared_blocks(base, read_gguf(other)) == 0
    assert shared_blocks(base, base) == base.n_layers - 1  # at least one block stays the decoder's to run


def test_shared_trunk_scores_as_the_whole_decoder(tiny_llama_gguf, decoder):
    """Perplexity of base, decoder and mixture, over several llama_decode calls per window (n_batch 16)."""
    reports = {}
    for shared in (True, False):
        with MemoryDecoderLM(
            tiny_llama_gguf, decoder, lam=0.4, n_ctx=128, n_batch=16, n_threads=1, shared_trunk=shared
        ) as lm:
            assert lm.pair.shared == (1 if shared else 0)
            reports[shared] = lm.perplexity(TEXT, n_ctx=64, stride=32, lambdas=[0.4])
    on, off = reports[True], reports[False]
    assert on["memdec"]["ppl"] == pytest.approx(off["memdec"]["ppl"], rel=1e-6)
    assert on["mixed"][0]["ppl"] == pytest.approx(off["mixed"][0]["ppl"], rel=1e-6)
    assert on["base"]["ppl"] == off["base"]["ppl"]
    assert on["memdec"]["ppl"] != pytest.approx(on["base"]["ppl"], rel=1e-3)  # the decoder is not the base


def test_shared_trunk_generates_the_same_tokens(tiny_llama_gguf, decoder):
    answers = []
    for shared in (True, False):
        with MemoryDecoderLM(tiny_llama_gguf, decoder, lam=0.5, n_ctx=128, n_threads=1, shared_trunk=shared) as lm:
            first = lm.generate("Permission is hereby", max_tokens=12, temperature=0)
            second = lm.generate("Permission is hereby granted", max_tokens=12, temperature=0)  # reuses the cache
            answers.append((first, second))
    assert answers[0] == answers[1]


def test_shared_trunk_decodes_one_request_at_a_time(tiny_llama_gguf, decoder, caplog):
    """The base's hidden rows come back in llama.cpp's micro-batch order, which the top decoder cannot follow
    across sequences: a trunk pair opens one sequence, and says so."""
    caplog.set_level(logging.WARNING, logger="edge_memdec.pair")
    for shared, n_parallel in ((True, 1), (False, 3)):
        with MemoryDecoderLM(
            tiny_llama_gguf, decoder, n_ctx=64, n_threads=1, n_parallel=3, shared_trunk=shared
        ) as lm:
            assert lm.pair.n_parallel == lm.pair.memdec.n_parallel == n_parallel
    assert "decoding one request at a time, not 3 in parallel" in caplog.text
