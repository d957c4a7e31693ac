"""The chat page `edge-memdec serve` answers at `/`: its files over plain HTTP, then the page itself in
headless Chromium against a real server (the real SmolLM2 base with the tiny memory decoder) on a loopback
port."""

from __future__ import annotations

import http.client
import json
import logging
import re
import shutil
import threading
import time

import pytest

from edge_memdec import MemoryDecoderLM
from edge_memdec.server import MemdecServer

MAX_TOKENS = 12  # per answer: enough to see it stream, short enough to keep the test quick
LOG_LAMBDA = re.compile(r": lambda (\d\.\d\d), ")  # the decode loop's line for each finished request


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


# ---- in a real browser ----


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's chromium and chromium-driver); skips, saying why, if either is missing."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
    )
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        missing = " and ".join(
            name for name, path in (("chromium", chromium), ("chromedriver", driver)) if not path
        )
        pytest.skip(f"{missing} not found: on Debian, apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    except Exception as err:  # a driver that does not match the browser, or a browser that cannot start here
        pytest.skip(f"headless Chromium did not start: {str(err).splitlines()[0]}")
    yield chrome
    chrome.quit()


def wait_for(check, what: str, timeout: float = 30.0):
    """check()'s first truthy value, polled until `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")


def set_field(chrome, element_id: str, value) -> None:
    """Set an input's value and fire the events a person's edit fires."""
    chrome.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "for (const kind of ['input', 'change']) e.dispatchEvent(new Event(kind, {bubbles: true}));",
        element_id,
        str(value),
    )


# Records, for the answer boxes present and to come, each moment their text grew (time, length): several
# moments before the end means the answer streamed in rather than arriving whole.
WATCH_GROWTH = """
window.growth = [];
new MutationObserver(() => {
  const boxes = document.querySelectorAll('.message.assistant .text');
  const last = boxes[boxes.length - 1];
  if (last) window.growth.push([performance.now(), last.textContent.length]);
}).observe(document.getElementById('transcript'), {childList: true, subtree: true, characterData: true});
"""


def ask(chrome, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = chrome.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def answers(chrome) -> list[dict]:
    """Every answer box: lane, lambda shown, state, text, and its token spans' data."""
    return chrome.execute_script(
        """return [...document.querySelectorAll('.message.assistant')].map(box => ({
          lane: box.dataset.lane, lambda: box.dataset.lambda, state: box.dataset.state,
          text: box.querySelector('.text').textContent,
          error: box.querySelector('.error')?.textContent ?? null,
          tokens: [...box.querySelectorAll('.tok')].map(t => ({
            text: t.textContent, tinted: t.classList.contains('up') || t.classList.contains('down'),
            changed: t.classList.contains('changed'), p_base: t.dataset.pBase, p_mix: t.dataset.pMix,
            title: t.title}))}))"""
    )


def finished(chrome, count: int) -> list[dict] | None:
    boxes = answers(chrome)
    done = len(boxes) == count and all(b["state"] in ("done", "failed") for b in boxes)
    return boxes if done and chrome.execute_script("return document.body.dataset.busy") == "false" else None


def lambdas_logged(caplog, count: int) -> list[str] | None:
    found = [m.group(1) for r in caplog.records if (m := LOG_LAMBDA.search(r.getMessage()))]
    return found if len(found) >= count else None


def test_chat_page_in_headless_chromium(browser, server, lm, caplog, tmp_path):
    from selenium.webdriver.common.by import By

    caplog.set_level(logging.INFO, logger="edge_memdec.server")
    chrome = browser
    chrome.get(f"http://127.0.0.1:{server.port}/")
    wait_for(lambda: chrome.execute_script("return document.body.dataset.ready"), "the page to read /props")
    assert chrome.find_element(By.ID, "lambda-value").text == f"{lm.lam:.2f}"
    set_field(chrome, "temperature", 0)
    set_field(chrome, "max_tokens", MAX_TOKENS)
    set_field(chrome, "lambda", 0.8)
    chrome.execute_script(WATCH_GROWTH)

    question = "What does a software licence allow?"
    ask(chrome, question)
    [first] = wait_for(lambda: finished(chrome, 1), "the first answer")
    assert first["error"] is None and first["lambda"] == "0.8"
    expected = lm.chat(
        [{"role": "user", "content": question}], lam=0.8, temperature=0.0, max_tokens=MAX_TOKENS
    )
    assert first["text"] == expected
    growth = chrome.execute_script("return window.growth")
    lengths = sorted({length for _, length in growth if 0 < length < len(expected)})
    assert len(lengths) >= 2, f"the answer arrived whole, not streamed: {growth}"
    tokens = first["tokens"]
    assert tokens and "".join(t["text"] for t in tokens) == expected
    assert all(0.0 <= float(t["p_base"]) <= 1.0 and 0.0 <= float(t["p_mix"]) <= 1.0 for t in tokens)
    assert any(t["tinted"] for t in tokens), "at lambda 0.8 the tiny decoder moves some token visibly"
    assert all("p base" in t["title"] for t in tokens)
    chrome.find_element(By.CSS_SELECTOR, ".tok[data-p-base]").click()
    info = chrome.find_element(By.ID, "token-info")
    assert info.is_displayed() and "p mixed" in info.text

    set_field(chrome, "lambda", 0.25)
    ask(chrome, "And what does it forbid?")
    second = wait_for(lambda: finished(chrome, 2), "the second answer")[1]
    assert second["error"] is None and second["lambda"] == "0.25"
    assert wait_for(lambda: lambdas_logged(caplog, 2), "the server's log of two requests") == ["0.80", "0.25"]

    chrome.find_element(By.ID, "side-by-side").click()
    ask(chrome, "Who may use it?")
    boxes = wait_for(lambda: finished(chrome, 4), "the side-by-side answers")
    off, on = boxes[2:]
    assert (off["lane"], off["lambda"], on["lane"], on["lambda"]) == ("off", "0", "on", "0.25")
    assert off["error"] is None and on["error"] is None and off["text"] and on["text"]
    assert not any(t["tinted"] or t["changed"] for t in off["tokens"]), "without the decoder nothing moves"
    logged = wait_for(lambda: lambdas_logged(caplog, 4), "the server's log of four requests")
    assert logged[2:] == ["0.00", "0.25"]
    layout = chrome.execute_script(
        "const [a, b] = document.querySelectorAll('.answers.side-by-side .message');"
        "return [a.getBoundingClientRect().left, b.getBoundingClientRect().left]"
    )
    assert layout[0] < layout[1], "the two answers stand side by side"

    shot = tmp_path / "chat.png"
    assert chrome.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_chat_page_without_a_decoder(browser, smollm2_gguf):
    """A base-only server: the decoder's controls are gone and requests carry no lambda (which would be a 400);
    a refused request shows the server's message as one line, and the next one is answered."""
    from selenium.webdriver.common.by import By

    with MemoryDecoderLM(smollm2_gguf, None, n_ctx=256, n_threads=1) as alone:
        srv, thread = start(alone, max_tokens=MAX_TOKENS)
        try:
            browser.get(f"http://127.0.0.1:{srv.port}/")
            wait_for(lambda: browser.execute_script("return document.body.dataset.ready"), "/props")
            assert not browser.find_element(By.ID, "decoder-controls").is_displayed()
            assert browser.find_element(By.ID, "no-decoder").is_displayed()
            set_field(browser, "top_p", 5)
            ask(browser, "Hello")
            [refused] = wait_for(lambda: finished(browser, 1), "the refusal")
            set_field(browser, "top_p", 1)
            set_field(browser, "temperature", 0)
            ask(browser, "Hello")
            box = wait_for(lambda: finished(browser, 2), "the answer")[1]
        finally:
            srv.close()
            thread.join(timeout=10)
    assert refused["state"] == "failed" and refused["text"] == ""
    assert refused["error"].startswith("error: 'top_p' must be")
    assert box["error"] is None and box["text"] and box["lambda"] is None
    assert not any(t["tinted"] or t["changed"] for t in box["tokens"])
