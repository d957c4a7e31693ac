"""The edge runtime through its Python API: the real SmolLM2 base paired with a tiny random memory decoder."""

from __future__ import annotations

import numpy as np
import pytest
from llama_cpp import Llama

from edge_memdec import MemoryDecoderLM, UserError

PROMPT = "The licensee shall"


def log_softmax64(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    shifted = row - row.max()
    return shifted - np.log(np.exp(shifted).sum())


def next_token_rows(base: Llama, mem: Llama, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Both models' logits for the token after `tokens` over their shared ids, from fresh full evaluations
    (no shared state)."""
    rows = []
    for model in (base, mem):
        model.reset()
        model.eval(tokens)
        rows.append(np.array(model.scores[len(tokens) - 1]))
    n = min(len(rows[0]), len(rows[1]))
    return rows[0][:n], rows[1][:n]


def reference_mixture(base: Llama, mem: Llama, tokens: list[int], lam: float) -> np.ndarray:
    """Mixed log-probs for the next token, from fresh full evaluations of both models (no shared state)."""
    row_base, row_mem = next_token_rows(base, mem, tokens)
    lb, lm = log_softmax64(row_base), log_softmax64(row_mem)
    return np.logaddexp(np.log1p(-lam) + lb, np.log(lam) + lm)


@pytest.fixture(scope="module")
def lm(smollm2_gguf, tiny_memdec_gguf):
    model = MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.5, n_ctx=512, n_threads=2)
    yield model
    model.close()


def test_lambda_comes_from_the_memory_decoder_gguf(smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=128) as model:
        assert model.lam == pytest.approx(0.3)


def test_greedy_mixed_generation_is_argmax_of_an_independent_mixture(lm, smollm2_gguf, tiny_memdec_gguf):
    tokens = lm.tokenize(PROMPT)
    generation = lm.start(tokens, max_tokens=6, temperature=0.0)
    generation.run()
    assert len(generation.tokens) == 6
    base = Llama(str(smollm2_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    mem = Llama(str(tiny_memdec_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    context = list(tokens)
    for token in generation.tokens:
        assert token == int(np.argmax(reference_mixture(base, mem, context, 0.5)))
        context.append(token)


def test_greedy_generation_with_penalties_and_bias_follows_the_reference(lm):
    """The decode loop's penalties count the last repeat_last_n tokens of prompt + answer, as llama.cpp's
    samplers do; every step is checked against the numpy reference on the same pair's logit rows."""
    from test_kernels import ref_adjusted

    tokens = lm.tokenize(PROMPT)
    plain = lm.start(tokens, max_tokens=16, temperature=0.0)
    plain.run()
    bias = {plain.tokens[0]: -100.0, plain.tokens[3]: 2.5}
    penalties = (1.5, 0.2, 0.3)  # repeat, frequency, presence
    generation = lm.start(tokens, max_tokens=16, temperature=0.0, logit_bias=bias, repeat_last_n=8,
                          repeat_penalty=1.5, frequency_penalty=0.2, presence_penalty=0.3)  # fmt: skip
    generation.run()
    pair = lm.pair
    pair.rewind(0)
    pair.eval(tokens)
    context, decided_by_penalties = list(tokens), 0
    for token in generation.tokens:
        rows = (pair.base.last_logits(), pair.memdec.last_logits())
        best = int(np.argmax(ref_adjusted(*rows, 0.5, context[-8:], *penalties, bias)))
        assert token == best
        decided_by_penalties += best != int(np.argmax(ref_adjusted(*rows, 0.5, [], 1.0, 0.0, 0.0, bias)))
        context.append(token)
        pair.eval([token])
    assert decided_by_penalties > 0 and generation.tokens[0] != plain.tokens[0]


def test_lambda_one_follows_the_memory_decoder_and_zero_the_base(lm):
    tokens = lm.tokenize(PROMPT)
    only_base = lm.start(tokens, max_tokens=5, temperature=0.0, lam=0.0)
    only_base.run()
    with MemoryDecoderLM(lm.pair.base.path, None, n_ctx=512) as base_alone:
        plain = base_alone.start(tokens, max_tokens=5, temperature=0.0)
        plain.run()
    assert only_base.tokens == plain.tokens
    only_mem = lm.start(tokens, max_tokens=5, temperature=0.0, lam=1.0)
    only_mem.run()
    assert only_mem.tokens != plain.tokens


def test_seeded_sampled_chat_is_reproducible(lm):
    messages = [{"role": "user", "content": "Name one software licence."}]
    first = lm.chat(messages, max_tokens=12, temperature=0.9, seed=7)
    again = lm.chat(messages, max_tokens=12, temperature=0.9, seed=7)
    assert first == again
    others = {lm.chat(messages, max_tokens=12, temperature=0.9, seed=s) for s in range(3)}
    assert len(others) > 1


def test_stream_pieces_join_to_generate_and_stop_strings_end_it(lm):
    pieces = list(lm.stream(PROMPT, max_tokens=10, temperature=0.0))
    assert "".join(pieces) == lm.generate(PROMPT, max_tokens=10, temperature=0.0)
    text = "".join(pieces)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        cut = lm.generate(PROMPT, max_tokens=10, temperature=0.0, stop=[stop])
        assert cut == text[: text.index(stop)]


def test_prefix_of_the_previous_call_is_reused_and_gives_the_same_answer(lm):
    tokens = lm.tokenize(PROMPT + " not")
    cold = lm.start(tokens, max_tokens=4, temperature=0.0)
    cold.run()
    warm = lm.start(tokens, max_tokens=4, temperature=0.0)
    warm.run()
    assert warm.n_cached == len(tokens) - 1
    assert warm.tokens == cold.tokens


def test_full_context_ends_the_answer_with_reason_context(smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=32) as small:
        n_ctx = small.pair.n_ctx  # llama.cpp may round the context up
        assert 32 <= n_ctx <= 512
        generation = small.start(small.tokenize(PROMPT), max_tokens=4 * n_ctx, temperature=0.0, lam=1.0)
        generation.run()
        assert generation.finish_reason in ("context", "stop")
        assert small.pair.base.n_past <= n_ctx
        assert small.pair.memdec.n_past == small.pair.base.n_past


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 1.5}, "lambda must be between 0 and 1"),
        ({"top_p": 0.0}, "top-p"),
        ({"max_tokens": 0}, "max tokens"),
        ({"bogus": 1}, "unknown sampling option"),
        ({"repeat_penalty": 0.0}, "repeat penalty must be above 0"),
        ({"repeat_last_n": -2}, "repeat-last-n"),
        ({"presence_penalty": float("nan")}, "presence penalty must be a finite number"),
        ({"logit_bias": {49152: 1.0}}, "token ids go from 0 to 49151"),
        ({"logit_bias": {5: float("inf")}}, "logit bias of token 5"),
    ],
)
def test_bad_sampling_options_are_user_errors(lm, kwargs, message):
    with pytest.raises(UserError, match=message):
        lm.generate(PROMPT, **kwargs)


def test_empty_prompt_is_a_user_error(lm):
    with pytest.raises(UserError, match="prompt is empty"):
        lm.generate("")


def test_incompatible_memory_decoder_names_the_failed_check(smollm2_gguf, tiny_llama_gguf):
    with pytest.raises(UserError) as err:
        MemoryDecoderLM(smollm2_gguf, tiny_llama_gguf, n_ctx=64)
    assert "token" in str(err.value) or "vocab" in str(err.value)


def test_the_pair_shares_one_thread_pool_and_it_changes_no_logit(smollm2_gguf, tiny_memdec_gguf):
    """Both models run on one persistent ggml pool; the same threads without it give bit-identical logits."""
    rows = []
    for pooled in (True, False):
        with MemoryDecoderLM(
            smollm2_gguf, tiny_memdec_gguf, n_ctx=128, n_threads=2, cpu_threadpool=pooled
        ) as model:
            pair = model.pair
            pool = pair._threadpool
            assert (pool is not None) == pooled  # this Linux build ships libggml-cpu next to libllama
            if pooled:
                assert pair.base._threadpool is pool and pair.memdec._threadpool is pool
            tokens = model.tokenize(PROMPT)
            pair.eval(tokens)
            for token in (11, 42, 7):
                pair.eval([token])
            rows.append([m.last_logits().copy() for m in pair.models])
    for pooled_row, plain_row in zip(*rows, strict=True):
        np.testing.assert_array_equal(pooled_row, plain_row)


def test_overlap_auto_times_both_ways_keeps_the_faster_and_changes_no_logit(smollm2_gguf, tiny_memdec_gguf):
    """One-token steps in turns, overlapped, or "auto" (both timed on the first steps, the faster kept): every
    step's logits of both models are bit-identical whichever way ran it, and auto's choice is its faster median."""
    from statistics import median

    from edge_memdec.overlap import TIMED, WARM

    steps = [11, 42, 7, 300, 5, 901, 64, 2, 13, 77, 8, 150, 21, 33, 4, 99, 18]  # > WARM + 2 * TIMED + 1
    assert len(steps) > WARM + 2 * TIMED + 1
    rows = {}
    for setting in (False, True, "auto"):
        with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=128, n_threads=2, overlap=setting) as model:
            pair, seen = model.pair, []
            pair.eval(model.tokenize(PROMPT))
            for token in steps:
                pair.eval([token])
                seen.append([m.last_logits().copy() for m in pair.models])
            rows[setting] = seen
            choice = pair.overlap
            if setting == "auto":
                assert len(choice.times[False]) == len(choice.times[True]) == TIMED
                assert choice.chosen == (median(choice.times[True]) < median(choice.times[False]))
            else:
                assert choice.chosen is setting and not any(choice.times.values())
            assert [m.n_threads for m in pair.models] == ([1, 1] if choice.chosen else [2, 2])
    for a, b, c in zip(rows[False], rows[True], rows["auto"], strict=True):
        for x, y, z in zip(a, b, c, strict=True):
            np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(x, z)
    with pytest.raises(UserError, match="overlap takes"):
        MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=128, overlap="sometimes")


def test_one_sequence_steps_of_a_batched_pair_take_the_overlap_choice(smollm2_gguf, tiny_memdec_gguf):
    """A pair with parallel sequences (the batched server) decoding one sequence one token at a time: "auto"
    times both ways on those steps and keeps the faster, as the sequential loop does, and every logit equals
    the turns' ones; a step of two sequences is not timed."""
    from edge_memdec.overlap import TIMED, WARM

    steps = [11, 42, 7, 300, 5, 901, 64, 2, 13, 77, 8, 150, 21, 33, 4, 99, 18]
    rows = {}
    for setting in (False, "auto"):
        with MemoryDecoderLM(
            smollm2_gguf, tiny_memdec_gguf, n_ctx=128, n_threads=2, n_parallel=2, overlap=setting
        ) as model:
            pair, seen = model.pair, []
            pair.eval_seqs([0], [model.tokenize(PROMPT)], [False])
            for token in steps:
                (i,) = pair.eval_seqs([0], [[token]], [True])
                seen.append([m.logits_at(i).copy() for m in pair.models])
            timed = {way: len(t) for way, t in pair.overlap.times.items()}
            pair.eval_seqs([0, 1], [[5], [6, 7]], [True, True])
            assert {way: len(t) for way, t in pair.overlap.times.items()} == timed
            rows[setting] = seen
            if setting == "auto":
                assert len(steps) > WARM + 2 * TIMED + 1
                assert timed == {False: TIMED, True: TIMED} and pair.overlap.chosen is not None
            else:
                assert pair.overlap.chosen is False and timed == {False: 0, True: 0}
    for a, b in zip(rows[False], rows["auto"], strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_default_pair_is_the_shipped_decoder_on_smollm2():
    """`MemoryDecoderLM.default()` opens what the CLI runs with no arguments."""
    from edge_memdec.gguf_file import read_gguf
    from edge_memdec.paths import default_memdec_gguf

    shipped = default_memdec_gguf()
    with MemoryDecoderLM.default(n_ctx=128, n_threads=2) as model:
        assert model.pair.memdec is not None and model.pair.memdec.path == shipped
        assert model.lam == pytest.approx(read_gguf(shipped).memdec["lambda"])  # the shipped GGUF's memdec.lambda
        assert 0 < model.lam <= 1
        assert model.generate("This License", max_tokens=4, temperature=0).strip()


def test_base_special_tokens_keeps_the_end_of_turn_at_the_base_probability(lm):
    """At lambda 1 the tiny decoder's near-uniform distribution all but hides <|im_end|> (p ~ 1/49152); with
    base_special_tokens it keeps the base's probability, and a base sure the turn is over ends the answer."""
    tokens = lm.tokenize("<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello!")
    mixed = lm.start(tokens, max_tokens=6, temperature=0.0, lam=1.0, base_special_tokens=False)
    mixed.run()
    kept = lm.start(tokens, max_tokens=6, temperature=0.0, lam=1.0, base_special_tokens=True)
    kept.run()
    assert (mixed.finish_reason, len(mixed.tokens)) == ("length", 6)
    assert (kept.finish_reason, kept.tokens) == ("stop", [])
    # the other tokens keep their mixed order: the same greedy text where no special token wins
    plain = lm.start(lm.tokenize(PROMPT), max_tokens=8, temperature=0.0, base_special_tokens=False)
    special = lm.start(lm.tokenize(PROMPT), max_tokens=8, temperature=0.0, base_special_tokens=True)
    assert plain.run() == special.run()
