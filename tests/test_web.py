"""The chat page `edge-memdec serve` answers at `/`: its files over plain HTTP from a real server (the real
SmolLM2 base with the tiny memory decoder) on a loopback port."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from edge_memdec import MemoryDecoderLM
from edge_memdec.server import MemdecServer


@pytest.fixture(scope="module")
def lm(smollm2_gguf, tiny_memdec_gguf):
    model = MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=1)
    yield model
    model.close()


def start(lm, **options) -> tuple[MemdecServer, threading.Thread]:
    srv = MemdecServer(lm, port=0, **options)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    return srv, thread


@pytest.fixture(scope="module")
def server(lm):
    srv, thread = start(lm, max_tokens=64)
    srv.warm_up()
    yield srv
    srv.close()
    thread.join(timeout=10)


def get(server, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of one plain HTTP request; the path goes out exactly as given."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request(method, path, headers=headers or {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, response.getheader("Content-Type", ""), body


def test_page_and_its_files_come_with_their_types(server):
    status, kind, body = get(server, "/")
    assert (status, kind) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert 'src="ui/app.js"' in page and 'href="ui/style.css"' in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere: works offline
    for path, expected in (("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")):
        status, kind, body = get(server, path)
        assert status == 200 and kind == f"{expected}; charset=utf-8" and body
        assert b"http://" not in body and b"https://" not in body


@pytest.mark.parametrize(
    "path",
    [
        "/ui/nothing.js",
        "/ui/__init__.py",  # in the page's folder, but not a page file
        "/ui/../server.py",
        "/ui/..%2fserver.py",
        "/ui/%2e%2e/server.py",
        "/ui//etc/passwd",
        "/ui/" + "a" * 5000,
    ],
)
def test_unknown_page_files_and_traversal_are_404_json(server, path):
    status, kind, body = get(server, path)
    assert (status, kind) == (404, "application/json")
    assert json.loads(body)["error"]["code"] == "not_found"
    assert get(server, "/health")[0] == 200


def test_page_takes_only_get(server):
    for path in ("/", "/ui/app.js"):
        status, kind, body = get(server, path, method="POST")
        assert (status, kind) == (405, "application/json") and "GET" in json.loads(body)["error"]["message"]


def test_page_is_public_when_the_api_is_keyed(lm):
    srv, thread = start(lm, api_key="s3cret")
    try:
        assert get(srv, "/")[0] == 200 and get(srv, "/ui/app.js")[0] == 200
        assert get(srv, "/props")[0] == 401
        assert get(srv, "/props", headers={"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        srv.close()
        thread.join(timeout=10)
