"""The shared trunk: a decoder whose lower blocks are the base's own runs only its upper blocks, on the base's
hidden state, and gives the same distributions as the whole decoder run beside the base."""

from __future__ import annotations

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


def test_shared_trunk_batches_sequences_as_the_whole_decoder_runs_them_one_by_one(tiny_llama_gguf, decoder):
    """--parallel with a shared trunk: the top decoder reads the base's hidden rows of each batched call in the
    call's order (llama.cpp keeps it for one token per sequence and for one sequence's piece), so the batched
    greedy answers, with prompts split over several steps (n_batch 8), equal the whole decoder's one by one."""
    from edge_memdec.batch import BatchDecoder

    prompts = [
        "Permission is hereby",
        "Permission is hereby granted, free of charge, to any person obtaining a copy",
        "to any person",
    ]
    lams = [0.5, 0.9, 0.2]
    with MemoryDecoderLM(tiny_llama_gguf, decoder, n_ctx=64, n_threads=1, shared_trunk=False) as lm:
        wanted = [lm.generate(p, max_tokens=10, temperature=0, lam=lam) for p, lam in zip(prompts, lams, strict=True)]
    with MemoryDecoderLM(
        tiny_llama_gguf, decoder, n_ctx=64, n_batch=8, n_threads=1, n_parallel=3, shared_trunk=True
    ) as lm:
        assert lm.pair.shared == 1 and lm.pair.n_parallel == lm.pair.memdec.n_parallel == 3
        for _ in range(2):  # the second round reuses the slots' cached prefixes
            generations = [
                lm.start(lm.tokenize(p), max_tokens=10, temperature=0, lam=lam)
                for p, lam in zip(prompts, lams, strict=True)
            ]
            batch = BatchDecoder(lm.pair)
            for generation in generations:
                batch.add(generation)
            while batch.active:
                batch.step()
            assert [g.text for g in generations] == wanted
        with pytest.raises(ValueError, match="one token per sequence"):
            lm.pair.eval_seqs([0, 1], [[5, 6], [7]], [True, True])


def test_the_cache_keeps_the_most_recently_used_top_decoders(tiny_llama_gguf, decoder):
    """A rebuilt decoder gets a new top-only GGUF; beyond the KEEP_TOPS most recently used, those unused for
    IDLE_S seconds go, and one used a moment ago stays (another process may be opening it)."""
    import os
    import time

    from edge_memdec.paths import cache_dir
    from edge_memdec.trunk import IDLE_S, KEEP_TOPS

    folder = cache_dir("trunk")

    def made(name: str, mtime: float):
        path = folder / f"{name}-top1-0123456789abcdef.gguf"
        path.write_bytes(b"GGUF")
        os.utime(path, (mtime, mtime))
        return path

    stale = [made(f"old{i}", 1000 + i) for i in range(3)]
    recent = [made(f"new{i}", time.time() - IDLE_S / 10 * (i + 1)) for i in range(KEEP_TOPS)]
    with MemoryDecoderLM(tiny_llama_gguf, decoder, n_ctx=64, n_threads=1) as lm:
        assert lm.pair.shared == 1
    kept = {p.name for p in folder.glob("*.gguf")}
    used = {name for name in kept if name.startswith("memdec-top1-")}
    assert len(used) == 1
    assert kept == used | {p.name for p in recent}  # the oldest recent one is beyond the bound, yet kept
    assert not any(p.exists() for p in stale)
