"""Several memory decoders on one base: p = sum_i lambda_i p_i + (1 - sum_i lambda_i) p_base.

The real SmolLM2 base with two tiny random decoders (tiny-memdec-f32 at memdec.lambda 0.3, finance at 0.2),
through the public interfaces: the Python API against an independent float64 mixture of three llama.cpp
distributions, perplexity sweeps against recomputation, the CLI's one-line errors, and the server's
per-request lambdas by decoder name (sequential and batched)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from conftest import serving
from llama_cpp import Llama
from test_batch import post
from test_cli_errors import assert_one_line_error, run_cli
from test_runtime import log_softmax64
from test_server import raw_request

from edge_memdec import MemoryDecoderLM, UserError
from edge_memdec.convert import convert_checkpoint
from edge_memdec.server import MemdecServer

PROMPT = "The licensee shall"
LAMS = (0.3, 0.2)


@pytest.fixture(scope="module")
def decoders(tiny_memdec_gguf, finance_memdec_gguf):
    return [tiny_memdec_gguf, finance_memdec_gguf]


@pytest.fixture(scope="module")
def lm(smollm2_gguf, decoders):
    model = MemoryDecoderLM(smollm2_gguf, decoders, lam=list(LAMS), n_ctx=512, n_threads=2, flash_attn=False)
    yield model
    model.close()


def reference_mixture(paths, tokens: list[int], lams: tuple[float, ...]) -> np.ndarray:
    """float64 log p for the next token, p = (1 - sum lams) p_base + sum_i lams_i p_i, from fresh llama.cpp
    evaluations of each model (paths: base first)."""
    logps = []
    for path in paths:
        model = Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        model.eval(tokens)
        logps.append(log_softmax64(np.array(model.scores[len(tokens) - 1])))
        model.close()
    n = min(len(lp) for lp in logps)
    weights = np.array([1.0 - sum(lams), *lams])
    return np.log(sum(w * np.exp(lp[:n]) for w, lp in zip(weights, logps, strict=True)))


def test_two_decoders_give_the_float64_mixture_of_three_distributions(lm, smollm2_gguf, decoders):
    assert lm.lambdas == {"tiny-memdec-f32": 0.3, "finance": 0.2} and lm.lam == pytest.approx(0.5)
    tokens = lm.tokenize(PROMPT)
    generation = lm.start(tokens, max_tokens=4, temperature=0.0, explain=3)
    generation.run()
    context = list(tokens)
    for token, trace in zip(generation.tokens, generation.traces, strict=True):
        reference = reference_mixture([smollm2_gguf, *decoders], context, LAMS)
        assert token == int(np.argmax(reference))
        assert trace.logprob_mix == pytest.approx(reference[token], abs=2e-5)
        assert [a.token for a in trace.top_mix] == list(np.argsort(-reference, kind="stable")[:3])
        context.append(token)


def test_one_decoder_given_twice_at_half_equals_it_once(smollm2_gguf, tiny_memdec_gguf, legal_text):
    with MemoryDecoderLM(smollm2_gguf, [tiny_memdec_gguf] * 2, lam=[0.2, 0.2], n_ctx=256, flash_attn=False) as twice:
        assert twice.pair.names == ("tiny-memdec-f32", "tiny-memdec-f32-2")
        doubled = twice.start(twice.tokenize(PROMPT), max_tokens=8, temperature=0.0, explain=0,
                              repeat_penalty=1.3, presence_penalty=0.5)  # fmt: skip
        doubled.run()
        ppl_twice = twice.perplexity(legal_text[:1500], n_ctx=64, lambdas=[0.1, 0.3], max_windows=2)
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.4, n_ctx=256, flash_attn=False) as once:
        single = once.start(once.tokenize(PROMPT), max_tokens=8, temperature=0.0, explain=0,
                            repeat_penalty=1.3, presence_penalty=0.5)  # fmt: skip
        single.run()
        ppl_once = once.perplexity(legal_text[:1500], n_ctx=64, lambdas=[0.3, 0.5], max_windows=2)
    assert doubled.tokens == single.tokens  # penalties too: the decoders' mixture keeps the decoder's logits
    for a, b in zip(doubled.traces, single.traces, strict=True):
        assert a.logprob_mix == pytest.approx(b.logprob_mix, abs=1e-5)
        assert a.logprob_mem == pytest.approx(b.logprob_mem, abs=1e-5)
    # sweeping the first copy's lambda with the second at 0.2: the single decoder at lambda + 0.2
    for swept, single_row in zip(ppl_twice["mixed"], ppl_once["mixed"], strict=True):
        assert swept["ppl"] == pytest.approx(single_row["ppl"], rel=1e-9)
    assert ppl_twice["selected"]["ppl"] == pytest.approx(ppl_once["selected"]["ppl"], rel=1e-9)


def test_request_lambdas_by_position_by_name_and_zero(lm):
    tokens = lm.tokenize(PROMPT)

    def greedy(lam) -> list[int]:
        generation = lm.start(tokens, max_tokens=5, temperature=0.0, lam=lam)
        generation.run()
        return generation.tokens

    assert greedy({"finance": 0.2}) == greedy(None) == greedy([0.3, 0.2])
    assert greedy({"tiny-memdec-f32": 0.0}) == greedy([0.0, 0.2])
    with MemoryDecoderLM(lm.pair.base.path, None, n_ctx=256) as base_alone:
        plain = base_alone.start(tokens, max_tokens=5, temperature=0.0)
        plain.run()
    assert greedy(0) == greedy([0, 0]) == plain.tokens


@pytest.mark.parametrize(
    "lam, words",
    [
        ([0.7, 0.5], "sum to 1.2"),
        ([0.3, 0.2, 0.1], "3 lambdas for 2 memory decoders"),
        ([0.3], "1 lambda for 2 memory decoders"),
        (0.4, "one lambda (0.4) for 2 memory decoders"),
        ({"legal": 0.1}, "no memory decoder is named 'legal'"),
        ([1.5, 0.0], "between 0 and 1"),
    ],
)
def test_bad_lambdas_are_one_sentence(lm, lam, words):
    with pytest.raises(UserError, match=None) as err:
        lm.generate(PROMPT, max_tokens=2, lam=lam)
    assert words in str(err.value)


def test_own_lambdas_summing_above_one_are_refused_before_loading(smollm2_gguf, tiny_memdec_gguf):
    with pytest.raises(UserError, match="sum to 1.2, above 1; give the lambdas"):
        MemoryDecoderLM(smollm2_gguf, [tiny_memdec_gguf] * 4)


def test_every_decoder_is_checked_against_the_base(smollm2_gguf, tiny_memdec_gguf, tiny_llama_gguf):
    with pytest.raises(UserError, match="tiny-llama-f32.gguf"):
        MemoryDecoderLM(smollm2_gguf, [tiny_memdec_gguf, tiny_llama_gguf], lam=[0.1, 0.1])


def test_perplexity_sweep_of_one_decoder_equals_recomputation(lm, smollm2_gguf, decoders, legal_text):
    text = legal_text[:2000]
    report = lm.perplexity(text, n_ctx=64, lambdas=[0.0, 0.4, 0.7], max_windows=3, sweep="finance")
    assert report["sweep"] == "finance" and report["lambda"] == 0.2
    assert [m["name"] for m in report["memdecs"]] == ["tiny-memdec-f32", "finance"]
    assert report["selected"]["ppl"] == pytest.approx(_ppl(lm, text, LAMS), rel=1e-12)
    for row in report["mixed"]:
        with MemoryDecoderLM(smollm2_gguf, decoders, lam=[0.3, row["lambda"]], n_ctx=512, flash_attn=False) as again:
            assert row["ppl"] == pytest.approx(_ppl(again, text, (0.3, row["lambda"])), rel=1e-9)
    # the default sweep stops where the lambdas would sum above 1: tiny-memdec-f32 swept, finance at 0.2
    assert [r["lambda"] for r in lm.perplexity(text, n_ctx=64, max_windows=1)["mixed"]][-1] == 0.8
    with pytest.raises(UserError, match="sum to 1.1"):
        lm.perplexity(text, n_ctx=64, lambdas=[0.9], max_windows=1)
    with pytest.raises(UserError, match="--sweep names no memory decoder"):
        lm.perplexity(text, n_ctx=64, max_windows=1, sweep="legal")


def _ppl(model: MemoryDecoderLM, text: str, lams: tuple[float, ...]) -> float:
    """The mixture's PPL at the model's own lambdas (`lams`, checked), a sweep of one point."""
    assert model.pair.lams == lams
    return model.perplexity(text, n_ctx=64, lambdas=[], max_windows=3)["selected"]["ppl"]


def test_cli_perplexity_and_chat_with_two_decoders(smollm2_gguf, decoders, legal_text, tmp_path):
    text = tmp_path / "legal.txt"
    text.write_text(legal_text[:2000])
    out = tmp_path / "report.json"
    mem = [arg for path in decoders for arg in ("--memdec", str(path))]
    proc = run_cli("perplexity", "-f", str(text), "-m", str(smollm2_gguf), *mem, "--lambda", "0.3,0.2",
                   "--lambda-sweep", "0,0.5", "--sweep", "finance", "-c", "64", "--chunks", "2", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "memory decoder finance" in proc.stdout and "mixed, finance lambda 0.5" in proc.stdout
    assert "selected lambdas tiny-memdec-f32 0.3, finance 0.2" in proc.stdout
    report = json.loads(out.read_text())
    assert report["lambdas"] == {"tiny-memdec-f32": 0.3, "finance": 0.2}
    proc = run_cli("chat", "-m", str(smollm2_gguf), *mem, "--lambda", "0.3,0.2", "-p", "Hello", "-n", "3",
                   "--temp", "0", "-v")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "lambda tiny-memdec-f32 0.3, finance 0.2" in proc.stderr


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lambda", "0.7,0.5"], "sum to 1.2"),
        (["--lambda", "0.3,0.2,0.1"], "3 lambdas for 2 memory decoders"),
        (["--lambda", "0.3,x"], "--lambda takes comma-separated numbers"),
        (["--lambda", "0.3,0.2", "--sweep", "legal"], "--sweep names no memory decoder"),
    ],
)
def test_cli_bad_lambdas_are_one_line(smollm2_gguf, decoders, legal_text, tmp_path, extra, words):
    text = tmp_path / "legal.txt"
    text.write_text(legal_text[:2000])
    mem = [arg for path in decoders for arg in ("--memdec", str(path))]
    proc = run_cli("perplexity", "-f", str(text), "-m", str(smollm2_gguf), *mem, "-c", "64", *extra)
    assert_one_line_error(proc, words)


@pytest.fixture(scope="module")
def server(lm):
    with serving(lm, max_tokens=16) as srv:
        yield srv


def test_server_lambdas_per_request_by_decoder_name(server, lm):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    status, reply = post(server, "/v1/completions", body | {"lambda": {"finance": 0.5}})
    assert status == 200
    assert reply["choices"][0]["text"] == lm.generate(PROMPT, max_tokens=6, temperature=0, lam=[0.3, 0.5])
    for bad, words in [
        ({"finance": 0.9}, "sum to 1.2"),
        ({"legal": 0.1}, "no memory decoder is named 'legal'"),
        ({"finance": "0.1"}, "must be a number from 0 to 1"),
        (0.4, "one lambda (0.4) for 2 memory decoders"),
    ]:
        status, reply = post(server, "/v1/completions", body | {"lambda": bad})
        assert status == 400 and reply["error"]["param"] == "lambda", reply
        assert words in reply["error"]["message"]
    status, reply = post(server, "/v1/completions", body | {"lambda": 0})
    with MemoryDecoderLM(lm.pair.base.path, None, n_ctx=256) as base_alone:
        assert reply["choices"][0]["text"] == base_alone.generate(PROMPT, max_tokens=6, temperature=0)


def test_props_and_models_list_every_decoder_by_name(server):
    status, props = raw_request(server, "GET", "/props")
    assert status == 200
    assert [(m["name"], m["lambda"]) for m in props["memdecs"]] == [("tiny-memdec-f32", 0.3), ("finance", 0.2)]
    status, models = raw_request(server, "GET", "/v1/models")
    assert [m["name"] for m in models["data"][0]["meta"]["memdecs"]] == ["tiny-memdec-f32", "finance"]


def test_batched_server_with_two_decoders_equals_sequential_answers(
    smollm2_gguf, tiny_memdec_ckpt, finance_memdec_ckpt, tmp_path
):
    """Quantized decoders (as test_batch.py's): a batch then computes each sequence to the same bits."""
    q8 = [
        convert_checkpoint(ckpt, tmp_path / f"{name}.gguf", "q8_0", tokenizer_from=smollm2_gguf)
        for ckpt, name in ((tiny_memdec_ckpt, "legal"), (finance_memdec_ckpt, "finance"))
    ]
    lm = MemoryDecoderLM(smollm2_gguf, q8, lam=list(LAMS), n_ctx=512, n_threads=1, flash_attn=False)
    model = MemoryDecoderLM(smollm2_gguf, q8, lam=list(LAMS), n_ctx=512, n_batch=64, n_threads=1, n_parallel=3)
    srv = MemdecServer(model, port=0, max_tokens=16)
    srv.warm_up()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        requests = [{"finance": 0.0}, {"legal": 0.6, "finance": 0.3}, None]
        bodies = [{"prompt": PROMPT, "max_tokens": 8, "temperature": 0} | ({"lambda": r} if r else {}) for r in requests]
        results: list = [None] * len(bodies)

        def ask(i: int) -> None:
            results[i] = post(srv, "/v1/completions", bodies[i])

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (status, reply), lam in zip(results, [[0.3, 0.0], [0.6, 0.3], [0.3, 0.2]], strict=True):
            assert status == 200
            lm.pair.rewind(0)
            assert reply["choices"][0]["text"] == lm.generate(PROMPT, max_tokens=8, temperature=0, lam=lam)
    finally:
        srv.close()
        thread.join(timeout=10)
        model.close()
        lm.close()
