"""Batched decoding in the server (`--parallel N`): concurrent clients against a real server over the SmolLM2 base
and the tiny memory decoder get, token for token, the answers the sequential Python API gives on its own pair.

The decoder is the tiny one as q8_0, like the shipped one: with quantized weights (SmolLM2's Q4_1, q8_0) and
exact attention (flash attention is off with --parallel > 1) llama.cpp computes a sequence to the same bits
whatever else is in its batch, so whole answers, logprobs included, equal those of the sequential loop
started from an empty cache. (f32 weights take another matrix kernel for one row than for several: an f32
decoder's logits move by ~1e-6 in a batch; README, Serving.)
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from test_server import _send_raw, _wait_for_endings

from edge_memdec import MemoryDecoderLM
from edge_memdec.convert import convert_checkpoint
from edge_memdec.openai_api import CHAT, TEXT, Answer, parse_request
from edge_memdec.server import MemdecServer

MAX_TOKENS = 64  # the servers' cap
QUESTION = [{"role": "user", "content": "What does a software licence allow?"}]
SPECIAL_PROMPT = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello!"


@pytest.fixture(scope="module")
def q8_memdec(tmp_path_factory, tiny_memdec_ckpt, smollm2_gguf):
    """The tiny memory decoder as q8_0, the shipped decoder's type."""
    out = tmp_path_factory.mktemp("q8") / "tiny-memdec-q8_0.gguf"
    return convert_checkpoint(tiny_memdec_ckpt, out, "q8_0", tokenizer_from=smollm2_gguf, memdec={"lambda": 0.3})


@pytest.fixture(scope="module")
def lm(smollm2_gguf, q8_memdec):
    """The sequential reference: one sequence, prompts in one batch, the batched server's exact attention."""
    model = MemoryDecoderLM(smollm2_gguf, q8_memdec, n_ctx=512, n_threads=1, flash_attn=False)
    yield model
    model.close()


def start_server(lm: MemoryDecoderLM) -> tuple[MemdecServer, threading.Thread]:
    server = MemdecServer(lm, port=0, max_tokens=MAX_TOKENS)
    server.warm_up()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def batched(smollm2_gguf, q8_memdec):
    """A --parallel 4 server; n_batch 64 splits long prompts over several steps beside running decodes."""
    model = MemoryDecoderLM(smollm2_gguf, q8_memdec, n_ctx=512, n_batch=64, n_threads=1, n_parallel=4)
    server, thread = start_server(model)
    yield server
    server.close()
    thread.join(timeout=10)
    model.close()


def post(server: MemdecServer, path: str, body: dict) -> tuple[int, Any]:
    """(status, reply): the JSON object, or for a stream the list of its events' objects."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    if not body.get("stream") or response.status != 200:
        return response.status, json.loads(data)
    events = [line[len("data: ") :] for line in data.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return response.status, [json.loads(e) for e in events[:-1]]


def expected(lm: MemoryDecoderLM, kind: str, body: dict) -> dict:
    """The answer object the sequential Python API gives for the request `body` (parsed as the server does),
    from an empty cache."""
    request = parse_request(kind, body, lm, MAX_TOKENS)
    lm.pair.rewind(0)
    generation = lm.start(request.prompt_tokens, explain=request.explain, **request.sampling)
    generation.run()
    return Answer(kind, "m").complete(generation)


def joined(kind: str, events: list[dict]) -> dict:
    """A streamed answer as the one choice of a whole answer: text, finish reason and logprob entries."""
    choices = [e["choices"][0] for e in events if e["choices"]]
    key = "text" if kind == TEXT else "content"
    text = "".join((c.get(key) if kind == TEXT else c["delta"].get(key)) or "" for c in choices)
    entries = [x for c in choices if c["logprobs"] for x in c["logprobs"]["content"]] if kind == CHAT else None
    return {"text": text, "finish_reason": choices[-1]["finish_reason"], "entries": entries or None}


def test_concurrent_batched_answers_equal_the_sequential_ones(batched, lm, legal_text):
    plain = expected(lm, TEXT, {"prompt": "The licensee shall", "max_tokens": 12, "temperature": 0})
    plain_text = plain["choices"][0]["text"]
    banned = lm.tokenize(plain_text, add_bos=False)[0]
    long_prompt = legal_text[:1400]  # ~300 tokens: 5 chunks of n_batch 64
    requests = [
        (TEXT, {"prompt": "The licensee shall", "max_tokens": 12, "temperature": 0}),
        (TEXT, {"prompt": long_prompt, "max_tokens": 10, "temperature": 0, "lambda": 0.9}),
        (CHAT, {"messages": QUESTION, "max_tokens": 10, "temperature": 0, "lambda": 0.0, "stream": True}),
        (TEXT, {"prompt": "The licensee shall", "max_tokens": 12, "temperature": 0,
                "stop": [plain_text.split()[2]]}),
        (TEXT, {"prompt": "The licensee shall", "max_tokens": 12, "temperature": 0, "presence_penalty": 1.5,
                "frequency_penalty": 0.5, "repeat_penalty": 1.3, "repeat_last_n": 32,
                "logit_bias": {str(banned): -100}}),
        (TEXT, {"prompt": "Permission is hereby granted", "max_tokens": 8, "temperature": 0, "logprobs": 3,
                "lambda": 0.6}),
        (CHAT, {"messages": QUESTION, "max_tokens": 9, "temperature": 0, "logprobs": True, "top_logprobs": 2,
                "stream": True}),
        (CHAT, {"messages": [{"role": "user", "content": long_prompt[:600]}], "max_tokens": 7, "temperature": 0}),
        (TEXT, {"prompt": SPECIAL_PROMPT, "max_tokens": 6, "temperature": 0, "lambda": 1.0,
                "base_special_tokens": True}),
        (TEXT, {"prompt": SPECIAL_PROMPT, "max_tokens": 6, "temperature": 0, "lambda": 1.0}),
        (TEXT, {"prompt": lm.tokenize("THE SOFTWARE IS PROVIDED"), "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "stream": True}),
        (TEXT, {"prompt": "Redistribution and use", "max_tokens": 10, "temperature": 0.8, "seed": 7,
                "lambda": 0.5}),
        (TEXT, {"prompt": "word " * 600, "max_tokens": 2}),  # longer than a sequence's 512 cells: a 400
    ]  # fmt: skip
    wanted = [expected(lm, kind, body) if i < len(requests) - 1 else None for i, (kind, body) in enumerate(requests)]
    paths = {TEXT: "/v1/completions", CHAT: "/v1/chat/completions"}
    with ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: post(batched, paths[r[0]], r[1]), requests))
    for (kind, body), want, (status, reply) in zip(requests, wanted, replies, strict=True):
        if want is None:
            assert status == 400 and "context holds 512" in reply["error"]["message"]
            continue
        assert status == 200, reply
        if not body.get("stream"):
            assert reply["choices"] == want["choices"] and reply["usage"] == want["usage"]
            continue
        choice = want["choices"][0]
        text = choice["text"] if kind == TEXT else choice["message"]["content"]
        entries = choice["logprobs"]["content"] if choice["logprobs"] else None
        assert joined(kind, reply) == {"text": text, "finish_reason": choice["finish_reason"], "entries": entries}
    finish = [r[1]["choices"][0]["finish_reason"] for r in replies if isinstance(r[1], dict) and "choices" in r[1]]
    assert "stop" in finish and "length" in finish
    assert batched.worker.running == 0 and batched.lm.pair.lock.acquire(blocking=False)
    batched.lm.pair.lock.release()


@pytest.mark.parametrize("split", [False, True, "auto"])
def test_a_step_in_one_call_or_a_call_per_sequence_gives_the_same_answers(smollm2_gguf, q8_memdec, lm, split):
    """The batched driver decodes its sequences in one call, in a call each, or (auto) whichever it timed faster
    for that many sequences, after the pair's one-sequence overlap choice has settled: every greedy answer is
    the sequential one. Two threads, so the pair may overlap its one-sequence calls."""
    from edge_memdec.batch import BatchDecoder
    from edge_memdec.overlap import TIMED, WARM

    prompts, lams = ["The licensee shall", "Permission is hereby granted", "THE SOFTWARE IS"], [0.3, 0.9, 0.0]
    sampling = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
    wanted = []
    for prompt, lam in zip(prompts, lams, strict=True):
        lm.pair.rewind(0)
        wanted.append(lm.generate(prompt, lam=lam, **sampling))
    with MemoryDecoderLM(smollm2_gguf, q8_memdec, n_ctx=128, n_threads=2, n_parallel=3) as model:
        batch = BatchDecoder(model.pair, split=split)
        generations = [model.start(model.tokenize(p), lam=lam, **sampling) for p, lam in zip(prompts, lams, strict=True)]
        for generation in generations:
            batch.add(generation)
        while batch.active:
            batch.step()
        assert [g.text for g in generations] == wanted
        if split == "auto":
            assert model.pair.overlap.chosen is not None
            choice = batch.split_choices[3]
            assert {way: len(t) for way, t in choice.times.items()} == {False: TIMED, True: TIMED}
            assert choice.chosen is not None and WARM + 2 * TIMED + 1 < 32
        else:
            assert not batch.split_choices
    with pytest.raises(ValueError, match="split takes"):
        BatchDecoder(lm.pair, split="sometimes")


def test_ended_and_cancelled_sequences_free_their_cells_for_the_next(smollm2_gguf, q8_memdec, lm, legal_text,
                                                                     caplog):
    """Two sequences of 256 cells serve six requests of over 128 tokens (the first two cancelled mid-answer by
    their clients): each request reuses cells the one before it in that sequence held, or the context would
    overflow."""
    caplog.set_level(logging.INFO, logger="edge_memdec.server")
    model = MemoryDecoderLM(smollm2_gguf, q8_memdec, n_ctx=256, n_threads=1, n_parallel=2)
    server, thread = start_server(model)
    try:
        prompts = [legal_text[i * 700 : i * 700 + 720] for i in range(6)]
        leaving = []
        for prompt in prompts[:2]:
            sock = _send_raw(server, {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True})
            received = b""
            while received.count(b"data: ") < 2:  # the empty first chunk, then a first piece: it is decoding
                received += sock.recv(4096)
            leaving.append(sock)
        bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0} for p in prompts[2:]]
        with ThreadPoolExecutor(len(bodies)) as pool:
            pending = [pool.submit(post, server, "/v1/completions", body) for body in bodies]
            for sock in leaving:
                sock.close()
            replies = [p.result() for p in pending]
        for body, (status, reply) in zip(bodies, replies, strict=True):
            assert status == 200, reply
            assert reply["choices"] == expected(lm, TEXT, body)["choices"]
            assert 128 < reply["usage"]["total_tokens"] <= 256
        assert all(e.endswith("cancelled") for e in _wait_for_endings(caplog, 2))
        pair = model.pair
        for llama in pair.models:
            assert [llama.cells(s) for s in range(2)] == [len(t) for t in llama.seq_tokens]
            assert all(0 < len(t) <= 256 for t in llama.seq_tokens)
    finally:
        server.close()
        thread.join(timeout=10)
        model.close()


def test_props_count_the_slots(batched):
    conn = http.client.HTTPConnection("127.0.0.1", batched.port, timeout=60)
    conn.request("GET", "/props")
    props = json.loads(conn.getresponse().read())
    conn.close()
    assert props["total_slots"] == 4 and props["n_ctx"] == 512
