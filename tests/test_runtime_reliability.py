"""The runtime under stress: threads sharing one model pair, a 2,000-token answer, a chat that fills the context."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from edge_memdec import MemoryDecoderLM
from edge_memdec.chat_session import ChatSession

PROMPTS = [
    "The licensee shall",
    "Permission is hereby granted",
    "THE SOFTWARE IS PROVIDED",
    "Redistribution and use",
]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    pa, pb = (np.exp(x.astype(np.float64) - x.max()) for x in (a, b))
    return 0.5 * float(np.abs(pa / pa.sum() - pb / pb.sum()).sum())


def test_threads_sharing_one_pair_get_the_answers_they_would_get_alone(smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.4, n_ctx=256) as lm:
        alone = [lm.generate(p, max_tokens=8, temperature=0.0) for p in PROMPTS]
        results: dict[int, str] = {}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                results[i] = lm.generate(PROMPTS[i % len(PROMPTS)], max_tokens=8, temperature=0.0)
            except BaseException as err:  # noqa: BLE001 - collected and re-raised in the test thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors
        assert [results[i] for i in range(8)] == alone * 2


def test_two_thousand_tokens_keep_both_caches_in_step_and_memory_flat(smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.3, n_ctx=2304, f32_kv=True) as lm:
        prompt = lm.tokenize("Write the full text of a long software licence.")
        generation = lm.start(
            prompt, max_tokens=2000, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, ignore_eos=True
        )
        rss = []
        for _ in generation:
            if len(generation.tokens) in (500, 1999):
                rss.append(rss_bytes())
        assert generation.finish_reason == "length", generation.finish_reason
        assert len(generation.tokens) == 2000
        assert rss[-1] - rss[0] < 32 * 2**20
        pair = lm.pair
        pair.eval([generation.tokens[-1]])
        assert pair.base.tokens == pair.memdec.tokens == prompt + generation.tokens
        incremental = [pair.base.last_logits().copy(), pair.memdec.last_logits().copy()]
    everything = prompt + generation.tokens
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=2304, n_batch=512, f32_kv=True) as fresh:
        fresh.pair.eval(everything)
        for model, row in zip(fresh.pair.models, incremental, strict=True):
            # batched and one-token matmuls round differently (Q4_1 base): close, not bit-equal; a cache out of
            # step would move the distribution completely
            assert total_variation(model.last_logits(), row) < 0.05


def test_chat_that_fills_the_context_drops_old_turns_and_keeps_answering(smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=256) as lm:
        err = io.StringIO()
        session = ChatSession(lm, sampling=dict(max_tokens=40, temperature=0.0), out=io.StringIO(), err=err)
        message = "Please explain the following clause in plain words: " + "the licensee shall indemnify " * 8
        for _ in range(5):
            generation = session.answer(message)
            assert generation.finish_reason in ("stop", "length", "context")
        assert "context full" in err.getvalue()
        assert lm.pair.base.n_past <= lm.pair.n_ctx


@pytest.mark.parametrize("n_ctx", [64])
def test_message_longer_than_the_context_is_refused_and_session_survives(
    smollm2_gguf, tiny_memdec_gguf, n_ctx
):
    from edge_memdec import UserError

    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=n_ctx) as lm:
        session = ChatSession(
            lm, sampling=dict(max_tokens=4, temperature=0.0), out=io.StringIO(), err=io.StringIO()
        )
        with pytest.raises(UserError, match="context holds"):
            session.answer("word " * (lm.pair.n_ctx + 50))
        assert session.turns == []
        assert session.answer("Hi").finish_reason in ("stop", "length", "context")
