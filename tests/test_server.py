"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP, over the real SmolLM2 base
paired with the tiny memory decoder. Greedy answers through the server must equal the Python API's."""

from __future__ import annotations

import http.client
import json
import logging
import math
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import serving

from edge_memdec import MemoryDecoderLM
from edge_memdec.server import MAX_BODY_BYTES, MAX_QUEUED, MemdecServer

CHAT = [{"role": "user", "content": "What does a software licence allow?"}]
PROMPT = "The licensee shall"
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def lm(smollm2_gguf, tiny_memdec_gguf):
    model = MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(lm):
    with serving(lm, max_tokens=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)


def raw_request(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, json.loads(data)


def test_chat_completion_equals_the_python_api(client, server, lm):
    expected = lm.chat(CHAT, max_tokens=12, lam=0.6, **GREEDY)
    reply = client.chat.completions.create(
        model=server.model_id, messages=CHAT, max_tokens=12, extra_body={"lambda": 0.6}, **GREEDY
    )
    assert reply.object == "chat.completion"
    assert reply.model == server.model_id
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(lm.chat_format.tokens(CHAT))
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_joins_to_the_same_answer(client, lm):
    expected = lm.chat(CHAT, max_tokens=10, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            messages=CHAT,
            model=client.models.list().data[0].id,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == expected
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_text_completion_streamed_and_not_equals_generate(client, server, lm):
    expected = lm.generate(PROMPT, max_tokens=8, **GREEDY)
    reply = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(lm.tokenize(PROMPT))
    chunks = list(
        client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, stream=True, **GREEDY)
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_and_lambda_per_request(client, server, lm):
    full = lm.generate(PROMPT, max_tokens=10, **GREEDY)
    stop = full.split()[2]
    reply = client.completions.create(
        model=server.model_id, prompt=PROMPT, max_tokens=10, stop=[stop], **GREEDY
    )
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    answers = {}
    for lam in (0.0, 1.0):
        expected = lm.generate(PROMPT, max_tokens=6, lam=lam, **GREEDY)
        reply = client.completions.create(
            model=server.model_id, prompt=PROMPT, max_tokens=6, extra_body={"lambda": lam}, **GREEDY
        )
        answers[lam] = reply.choices[0].text
        assert answers[lam] == expected
    assert answers[0.0] != answers[1.0]


def test_a_burst_of_connections_waits_for_the_accept_loop(lm):
    """Clients that connect while the server is not accepting (busy, or not yet serving) wait in the kernel's
    queue, MAX_QUEUED of them at least, instead of being refused or reset, and are then answered."""
    server = MemdecServer(lm, port=0, max_tokens=4)
    socks = []
    try:
        for _ in range(MAX_QUEUED):
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for sock in socks:
            sock.settimeout(60)
            assert sock.recv(64).startswith(b"HTTP/1.")
    finally:
        for sock in socks:
            sock.close()
        server.close()


def test_32_concurrent_clients_all_answered_correctly(client, server, lm):
    prompts = [
        "The licensee shall",
        "Permission is hereby granted",
        "THE SOFTWARE IS PROVIDED",
        "Redistribution",
    ]
    questions = [[{"role": "user", "content": q}] for q in ("What is a patent?", "Define warranty.")]
    expected_text = {p: lm.generate(p, max_tokens=6, **GREEDY) for p in prompts}
    expected_chat = {q[0]["content"]: lm.chat(q, max_tokens=6, **GREEDY) for q in questions}

    def one_client(i: int) -> tuple[str, str, int]:
        stream = i % 2 == 1
        if i % 3 == 0:
            q = questions[i % len(questions)]
            want = expected_chat[q[0]["content"]]
            reply = client.chat.completions.create(
                model=server.model_id, messages=q, max_tokens=6, stream=stream, **GREEDY
            )
            if stream:
                return "".join(c.choices[0].delta.content or "" for c in reply if c.choices), want, -1
            return reply.choices[0].message.content, want, reply.usage.completion_tokens
        p = prompts[i % len(prompts)]
        reply = client.completions.create(
            model=server.model_id, prompt=p, max_tokens=6, stream=stream, **GREEDY
        )
        if stream:
            return "".join(c.choices[0].text for c in reply), expected_text[p], -1
        return reply.choices[0].text, expected_text[p], reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one_client, range(32)))
    seconds = time.perf_counter() - start
    assert len(results) == 32
    for got, want, _ in results:
        assert got == want
    n_tokens = sum(len(lm.tokenize(got, add_bos=False)) for got, _, _ in results)
    print(
        f"\n32 concurrent clients: {seconds:.2f} s, ~{n_tokens} answer tokens, {n_tokens / seconds:.1f} tok/s"
    )
    assert raw_request(server, "GET", "/health") == (200, {"status": "ok", "queued": 0})


def test_models_and_health(client, server, lm):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_id]
    assert models[0].meta["lambda"] == pytest.approx(lm.lam)
    assert client.models.retrieve(server.model_id).id == server.model_id
    assert raw_request(server, "GET", "/health")[0] == 200


def test_any_model_name_is_this_pair_as_with_llama_server(client, server, lm):
    expected = lm.generate(PROMPT, max_tokens=4, **GREEDY)
    for name in ("default", "gpt-4o"):
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=4, **GREEDY)
        assert reply.choices[0].text == expected and reply.model == name
    assert client.models.retrieve("default").id == server.model_id


def test_alias_names_the_model_in_the_list(lm):
    aliased = MemdecServer(lm, port=0, model_id="legal-pair")
    try:
        assert [m["id"] for m in aliased.models_list()["data"]] == ["legal-pair"]
    finally:
        aliased.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/v1/chat/completions", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/completions", b"[1, 2]", 400, "JSON object"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "not valid JSON"),
        (
            "POST",
            "/v1/completions",
            b'{"prompt": "x", "temperature": "hot"}',
            400,
            "'temperature' must be a number",
        ),
        ("POST", "/v1/completions", b'{"prompt": "x", "top_p": 0}', 400, "top-p"),
        ("POST", "/v1/completions", b'{"prompt": "x", "lambda": 1.5}', 400, "'lambda' must be at most 1"),
        ("POST", "/v1/completions", b'{"prompt": ""}', 400, "prompt is empty"),
        ("POST", "/v1/completions", b'{"prompt": [1, 99999999]}', 400, "token ids"),
        ("POST", "/v1/completions", b'{"prompt": "x", "n": 3}', 400, "n=1"),
        ("POST", "/v1/completions", b'{"prompt": "x", "stop": 7}', 400, "'stop'"),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        ("POST", "/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}',
            400,
            "at least 1",
        ),
        ("POST", "/v1/nothing", b"{}", 404, "there is no /v1/nothing"),
        ("GET", "/v1/chat/completions", None, 405, "takes POST"),
        ("DELETE", "/health", None, 405, "takes GET"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(server, method, path, body, status, words):
    got_status, reply = raw_request(server, method, path, body, {"Content-Type": "application/json"})
    assert got_status == status
    assert words in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error"


CHAT_BODY = {"messages": CHAT, "max_tokens": 1}


@pytest.mark.parametrize(
    ("path", "body", "field", "words"),
    [
        ("/v1/completions", {"prompt": "x", "bogus": 1}, "bogus", "unknown field 'bogus'"),
        ("/v1/chat/completions", {**CHAT_BODY, "prompt": "x"}, "prompt", "unknown field 'prompt'"),
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "from 0 to 20"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs", "an integer"),
        ("/v1/chat/completions", {**CHAT_BODY, "top_logprobs": 3}, "top_logprobs", "needs 'logprobs': true"),
        ("/v1/chat/completions", {**CHAT_BODY, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "from 0"),
        ("/v1/chat/completions", {**CHAT_BODY, "logprobs": 1}, "logprobs", "true or false"),
        ("/v1/chat/completions", {**CHAT_BODY, "tools": [{"type": "function"}]}, "tools", "tools"),
        ("/v1/chat/completions", {**CHAT_BODY, "tool_choice": "auto"}, "tool_choice", "tools"),
        ("/v1/completions", {"prompt": "x", "suffix": "end"}, "suffix", "suffix"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of", "best_of=1"),
        ("/v1/chat/completions", {**CHAT_BODY, "response_format": {"type": "json_object"}}, "response_format",
         "response_format"),
        ("/v1/chat/completions", {**CHAT_BODY, "reasoning_effort": "high"}, "reasoning_effort", "reason"),
        ("/v1/chat/completions", {**CHAT_BODY, "modalities": ["text", "audio"]}, "modalities", "text"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "token ids from 0 to 49151"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"49152": 1}}, "logit_bias", "token ids from 0"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 300}}, "logit_bias", "from -100 to 100"),
        ("/v1/completions", {"prompt": "x", "logit_bias": [5, 1]}, "logit_bias", "must be an object"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty", "at most 2.0"),
        ("/v1/completions", {"prompt": "x", "frequency_penalty": "hi"}, "frequency_penalty", "a number"),
        ("/v1/completions", {"prompt": "x", "repeat_penalty": 0}, "repeat_penalty", "above 0"),
        ("/v1/completions", {"prompt": "x", "repeat_last_n": -2}, "repeat_last_n", "at least -1"),
        ("/v1/completions", {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos", "true or false"),
        ("/v1/completions", {"prompt": "x", "base_special_tokens": 1}, "base_special_tokens", "true or false"),
        ("/v1/completions", {"prompt": "x", "model": 7}, "model", "'model' must be a string"),
        ("/tokenize", {"content": 5}, "content", "'content' must be"),
        ("/tokenize", {"content": "x", "with_pieces": 1}, "with_pieces", "true or false"),
        ("/tokenize", {"text": "x"}, "text", "unknown field 'text'"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens", "token ids from 0 to 49151"),
        ("/detokenize", {"tokens": "1 2"}, "tokens", "list of token ids"),
    ],
)  # fmt: skip
def test_fields_we_do_not_honour_are_400s_that_name_them(server, path, body, field, words):
    status, reply = raw_request(server, "POST", path, json.dumps(body).encode())
    assert status == 400, reply
    assert reply["error"]["param"] == field and words in reply["error"]["message"], reply


def test_openai_fields_at_their_off_values_and_hosting_fields_are_accepted(server):
    body = {"prompt": "x", "max_tokens": 1, "n": 1, "logprobs": 0, "echo": False, "best_of": 1, "tools": [],
            "user": "u", "store": False, "metadata": {"a": "b"}, "service_tier": "auto", "stream_options": None,
            "response_format": {"type": "text"}, "cache_prompt": True}  # fmt: skip
    status, reply = raw_request(server, "POST", "/v1/completions", json.dumps(body).encode())
    assert status == 200, reply


def test_penalties_and_logit_bias_are_honoured(client, server, lm):
    plain = lm.generate(PROMPT, max_tokens=12, **GREEDY)
    banned = lm.tokenize(plain, add_bos=False)[0]
    settings = dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={banned: -100.0})
    expected = lm.generate(PROMPT, max_tokens=12, repeat_penalty=1.3, repeat_last_n=32, **settings, **GREEDY)
    reply = client.completions.create(
        model=server.model_id, prompt=PROMPT, max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5,
        logit_bias={str(banned): -100}, extra_body={"repeat_penalty": 1.3, "repeat_last_n": 32}, **GREEDY,
    )  # fmt: skip
    assert reply.choices[0].text == expected != plain


def test_tokenize_and_detokenize_as_llama_server(server, lm):
    text = "The licensee shall pay 5 € to the 🦙 — <|im_end|>"
    status, reply = raw_request(server, "POST", "/tokenize", json.dumps({"content": text}).encode())
    assert status == 200 and reply["tokens"] == lm.tokenize(text, add_bos=False)
    special = lm.pair.base.tokenize(text, add_bos=True, special=True)
    body = json.dumps({"content": text, "add_special": True}).encode()
    assert raw_request(server, "POST", "/tokenize", body)[1]["tokens"] == special
    body = json.dumps({"content": text, "with_pieces": True}).encode()
    pieces = raw_request(server, "POST", "/tokenize", body)[1]["tokens"]
    assert [p["id"] for p in pieces] == lm.tokenize(text, add_bos=False)
    joined = b"".join(p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces)
    assert joined.decode() == text and any(isinstance(p["piece"], list) for p in pieces)  # the llama splits
    body = json.dumps({"tokens": lm.tokenize(text, add_bos=False)}).encode()
    assert raw_request(server, "POST", "/detokenize", body) == (200, {"content": text})


def test_props_describe_the_pair(server, lm):
    status, props = raw_request(server, "GET", "/props")
    assert status == 200 and props["total_slots"] == 1
    assert props["lambda"] == pytest.approx(lm.lam) and props["n_ctx"] == lm.pair.n_ctx
    assert props["default_generation_settings"]["params"]["max_tokens"] == server.max_tokens
    assert props["models"]["base"]["n_vocab"] == 49152 and props["models"]["base"]["architecture"] == "llama"
    memdec = props["models"]["memdec"]["metadata"]
    assert memdec["lambda"] == pytest.approx(0.3) and memdec["domain"] == "legal" and "vocab_fingerprint" in memdec
    assert "<|im_start|>" in props["chat_template"]


def raw_text(server, path: str, headers: dict | None = None) -> tuple[int, str, str]:
    """(status, Content-Type, body text) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    return response.status, response.getheader("Content-Type"), data


def metric(text: str, name: str, absent: float | None = None) -> float:
    """The value of series `name`; `absent` when it is not there (a labelled counter appears with its first
    count), else the lookup fails."""
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    if not values and absent is not None:
        return absent
    return float(values[0])


def test_metrics_count_tokens_and_requests(client, server):
    before = raw_text(server, "/metrics")[2]
    reply = client.completions.create(model=server.model_id, prompt="Redistribution of", max_tokens=5, **GREEDY)
    status, kind, after = raw_text(server, "/metrics")
    assert status == 200 and kind.startswith("text/plain; version=0.0.4")
    grown = metric(after, "llamacpp:tokens_predicted_total") - metric(before, "llamacpp:tokens_predicted_total")
    assert grown == reply.usage.completion_tokens == 5
    assert metric(after, "llamacpp:prompt_tokens_total") > metric(before, "llamacpp:prompt_tokens_total")
    assert metric(after, "llamacpp:predicted_tokens_seconds") > 0
    assert metric(after, "llamacpp:requests_deferred") == 0
    route = 'edge_memdec:requests_total{route="/v1/completions",status="200"}'
    assert metric(after, route) == metric(before, route, absent=0) + 1
    assert "# TYPE llamacpp:prompt_tokens_total counter" in after


def test_warm_up_decodes_on_the_decode_loop_and_counts_no_tokens(lm, monkeypatch):
    """llama.cpp's OpenMP build keeps a team of workers per thread that decodes: every decode of a server,
    its warm-up included, happens on the decode loop's one thread (a second team cost a third of the rate on 2 cores)."""
    srv = MemdecServer(lm, port=0)
    threads, real_eval = set(), lm.pair.eval

    def eval_seen(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(lm.pair, "eval", eval_seen)
    try:
        srv.warm_up()
        assert threads == {"decode-loop"}
        assert metric(srv.metrics.render(0, 0), "llamacpp:tokens_predicted_total") == 0
    finally:
        srv.close()


@pytest.fixture(scope="module")
def keyed(lm):
    srv = MemdecServer(lm, port=0, max_tokens=8, api_key="s3cret-key")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.close()
    thread.join(timeout=10)


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "needs an API key"),
        ({"Authorization": "Bearer wrong"}, "not valid"),
        ({"Authorization": "Bearer s3cret-ke"}, "not valid"),
        ({"Authorization": "Basic s3cret-key"}, "needs an API key"),
    ],
)
def test_api_key_is_required_everywhere_but_health(keyed, headers, words):
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/nope")):
        status, reply = raw_request(keyed, method, path, b'{"prompt": "x"}', headers)
        assert status == 401 and reply["error"]["type"] == "authentication_error" and words in reply["error"]["message"]
    assert raw_request(keyed, "GET", "/health", None, headers)[0] == 200


def test_api_key_through_the_openai_client(keyed, lm):
    good = openai.OpenAI(base_url=keyed.url, api_key="s3cret-key", max_retries=0, timeout=120)
    reply = good.completions.create(model="any", prompt=PROMPT, max_tokens=3, **GREEDY)
    assert reply.choices[0].text == lm.generate(PROMPT, max_tokens=3, **GREEDY)
    bad = openai.OpenAI(base_url=keyed.url, api_key="guess", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_prompt_longer_than_the_context_is_400(client, server):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_id, prompt="word " * 600, max_tokens=2)
    assert "context" in info.value.message


def test_oversize_body_is_413_and_the_server_lives_on(server):
    body = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    status, reply = raw_request(server, "POST", "/v1/completions", body)
    assert status == 413
    assert str(MAX_BODY_BYTES) in reply["error"]["message"]
    assert raw_request(server, "GET", "/health")[0] == 200


def _send_raw(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def _wait_for_endings(caplog, n: int, seconds: float = 60) -> list[str]:
    """The first `n` log lines saying how a generation ended early (cancelled mid-way, or dropped unstarted)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        endings = [r.getMessage() for r in caplog.records if r.getMessage().endswith(("cancelled", "waited"))]
        if len(endings) >= n:
            return endings
        time.sleep(0.05)
    raise AssertionError(f"expected {n} cancelled generations, the log has: {caplog.text}")


def test_clients_that_disconnect_cancel_their_generation(server, caplog):
    caplog.set_level(logging.INFO, logger="edge_memdec.server")
    streaming = _send_raw(server, {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True})
    received = b""
    while b"data: " not in received:
        received += streaming.recv(4096)
    queued = _send_raw(server, {"prompt": "Redistribution", "max_tokens": 64, "temperature": 0})
    time.sleep(0.1)
    queued.close()
    streaming.close()
    for ending in _wait_for_endings(caplog, 2):
        if ending.endswith("cancelled"):
            assert int(ending.split(" tokens at ")[0].rsplit(" ", 1)[1]) < 64
    assert raw_request(server, "GET", "/health")[0] == 200


def test_a_full_queue_answers_503(lm):
    small = MemdecServer(lm, port=0, max_tokens=64, max_queued=1)
    thread = threading.Thread(target=small.serve_forever, daemon=True)
    thread.start()
    try:
        running = _send_raw(small, {"prompt": PROMPT, "max_tokens": 64, "temperature": 0, "stream": True})
        received = b""
        while b'"text": "' not in received:
            received += running.recv(4096)
        waiting = _send_raw(small, {"prompt": PROMPT, "max_tokens": 4})
        deadline = time.monotonic() + 30
        while raw_request(small, "GET", "/health")[1]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, reply = raw_request(small, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode())
        assert status == 503
        assert reply["error"]["type"] == "server_error" and "busy" in reply["error"]["message"]
        running.close()
        waiting.close()
    finally:
        small.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--lambda", "2"], "lambda must be between 0 and 1"),
        (["-n", "0"], "at least 1 token"),
        (["--api-key", " "], "API key must be printable"),
        (["--parallel", "0"], "--parallel must be from 1 to 256"),
        (None, "cannot listen"),
    ],
)
def test_serve_command_errors_are_one_line(smollm2_gguf, tiny_memdec_gguf, extra, words):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = ["serve", "-m", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf), "-c", "64", "-t", "1"]
        args += extra if extra is not None else ["--port", str(busy.getsockname()[1])]
        proc = subprocess.run(
            [sys.executable, "-m", "edge_memdec.cli", *args], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and words in proc.stderr and "Traceback" not in proc.stderr


def test_chat_logprobs_report_the_mixture_and_the_memdec_extension(client, server, lm):
    explained = lm.start(lm.chat_format.tokens(CHAT), max_tokens=10, explain=2, **GREEDY)
    explained.run()
    reply = client.chat.completions.create(
        model=server.model_id, messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=2, **GREEDY
    )
    content = reply.choices[0].logprobs.content
    assert "".join(e.token for e in content) == reply.choices[0].message.content == explained.text
    for entry, trace in zip(content, explained.traces, strict=True):
        assert entry.bytes == list(trace.piece) and entry.logprob == pytest.approx(trace.logprob_mix)
        assert [a.token for a in entry.top_logprobs] == [a.text for a in trace.top_mix[:2]]
        ext = entry.model_extra["memdec"]
        assert ext["p_base"] == pytest.approx(trace.p_base) and ext["p_mem"] == pytest.approx(trace.p_mem)
        assert ext["p_mix"] == pytest.approx(math.exp(entry.logprob)) and ext["changed"] == trace.changed
        assert ext["rank_mix"] == 1 and len(ext["top_base"]) == len(ext["top_mem"]) == 2
    plain = client.chat.completions.create(model=server.model_id, messages=CHAT, max_tokens=4, **GREEDY)
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_belong_to_their_chunks(client, server):
    stream = client.chat.completions.create(
        model=server.model_id, messages=CHAT, max_tokens=12, logprobs=True, stream=True, **GREEDY
    )
    text, tokens = "", []
    for chunk in stream:
        choice = chunk.choices[0]
        if choice.delta.content:
            entries = choice.logprobs.content
            assert entries and all(e.top_logprobs == [] for e in entries)
            assert bytes(b for e in entries for b in e.bytes).decode("utf-8", errors="replace") == choice.delta.content
            text += choice.delta.content
            tokens += entries
    assert text and len(tokens) >= 1


def test_completion_logprobs_in_the_legacy_shape(client, server):
    reply = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, logprobs=3, **GREEDY)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    assert all(len(top) == 3 and max(top.values()) == lp for top, lp in zip(logprobs.top_logprobs,
                                                                            logprobs.token_logprobs, strict=True))
    assert len(logprobs.model_extra["memdec"]) == len(logprobs.tokens)


def test_base_special_tokens_per_request(client, server, lm):
    prompt = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\nHello!"
    extra = {"lambda": 1.0}
    mixed = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=6,
                                      extra_body=extra | {"base_special_tokens": False}, **GREEDY)  # fmt: skip
    kept = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=6, extra_body=extra, **GREEDY)
    assert mixed.choices[0].finish_reason == "length" and mixed.usage.completion_tokens == 6
    assert kept.choices[0].finish_reason == "stop" and kept.usage.completion_tokens == 0  # the default keeps it
    status, props = raw_request(server, "GET", "/props")
    assert status == 200 and props["default_generation_settings"]["params"]["base_special_tokens"] is True
