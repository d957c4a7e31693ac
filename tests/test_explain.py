"""The per-token trace from the one decode loop: `MemoryDecoderLM.stream(..., explain=...)` over the real SmolLM2
base and the tiny memory decoder."""

from __future__ import annotations

import math

import pytest

from edge_memdec import MemoryDecoderLM
from edge_memdec.errors import UserError
from edge_memdec.trace import TracedText, summary

PROMPT = "The licensee shall"


@pytest.fixture(scope="module")
def lm(smollm2_gguf, tiny_memdec_gguf):
    model = MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.4, n_ctx=256, n_threads=1)
    yield model
    model.close()


def test_explained_pieces_carry_one_trace_per_token_and_the_same_text(lm):
    plain = lm.generate(PROMPT, max_tokens=16, temperature=0)
    generation = lm.start(lm.tokenize(PROMPT), max_tokens=16, temperature=0, explain=4)
    pieces = list(generation)
    assert all(isinstance(p, TracedText) for p in pieces)
    assert "".join(pieces) == generation.text == plain
    traced = [t for p in pieces for t in p.tokens]
    assert [t.token for t in traced] == [t.token for t in generation.traces] == generation.tokens
    assert b"".join(t.piece for t in traced).decode("utf-8", errors="replace") == plain
    for t in traced:
        assert t.lam == 0.4
        assert math.isclose(t.p_mix, 0.4 * t.p_mem + 0.6 * t.p_base, rel_tol=1e-9)
        # greedy draws the mixture's argmax: rank 1, and its own top alternative
        assert t.rank_mix == 1 and t.top_mix[0].token == t.token
        assert len(t.top_base) == len(t.top_mem) == len(t.top_mix) == 4
        assert [a.logprob for a in t.top_base] == sorted((a.logprob for a in t.top_base), reverse=True)
        assert t.top_base[t.rank_base - 1].token == t.token if t.rank_base <= 4 else True
        assert t.changed == (t.top_base[0].token != t.token)
    counts = summary(traced)
    assert counts["tokens"] == len(traced) and counts["changed"] == sum(t.changed for t in traced)


def test_explain_true_without_a_decoder_and_at_lambda_zero(lm, smollm2_gguf):
    at_zero = [t for p in lm.stream(PROMPT, max_tokens=6, temperature=0, lam=0.0, explain=True) for t in p.tokens]
    assert all(t.p_mix == t.p_base and not t.changed and len(t.top_mix) == 3 for t in at_zero)
    with MemoryDecoderLM(smollm2_gguf, None, n_ctx=256, n_threads=1) as alone:
        traced = [t for p in alone.stream(PROMPT, max_tokens=6, temperature=0, explain=True) for t in p.tokens]
    assert [t.token for t in traced] == [t.token for t in at_zero]
    assert all(t.p_mem is None and t.top_mem is None and t.rank_mem is None for t in traced)
    assert all(math.isclose(a.p_mix, b.p_base, rel_tol=1e-6) for a, b in zip(traced, at_zero, strict=True))


def test_sampled_tokens_are_traced_where_they_rank(lm):
    generation = lm.start(lm.tokenize(PROMPT), max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                          seed=3, explain=0)  # fmt: skip
    generation.run()
    assert len(generation.traces) == len(generation.tokens)
    assert any(t.rank_mix > 1 for t in generation.traces)  # hot sampling leaves the argmax sometimes
    for t in generation.traces:
        assert len(t.top_mix) == 1 and t.n_top == 0  # the argmax is always kept: `changed` needs it
        assert (t.rank_mix == 1) == (t.top_mix[0].token == t.token)


def test_bad_explain_values_are_one_sentence(lm):
    with pytest.raises(UserError, match="explain takes 0 to 20"):
        lm.start(lm.tokenize(PROMPT), explain=21)
