"""README's picture of the chat page: a real `serve` (SmolLM2 + the shipped legal memory decoder unless told
otherwise) on a loopback port, one question answered side by side in headless Chromium, saved as a small PNG.

    python docs/screenshot_web.py [-m BASE.gguf] [--memdec MEM.gguf] [--lambda L] [-o docs/web-chat.png]

Needs selenium and Chromium with its driver (Debian: apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import io
import shutil
import threading
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from edge_memdec import MemoryDecoderLM
from edge_memdec.files import write_atomic
from edge_memdec.paths import default_base_gguf, default_memdec_gguf
from edge_memdec.server import MemdecServer

QUESTION = "What does the Apache License 2.0 say about patents?"
WINDOW = (1280, 820)  # CSS pixels, at device scale 1
COLOURS = 96  # the PNG's palette: the page's flat colours fit, and the file stays well under 150 KB
ANSWER_SECONDS = 300.0


def chromium() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def set_field(chrome: webdriver.Chrome, element_id: str, value: object) -> None:
    chrome.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "for (const kind of ['input', 'change']) e.dispatchEvent(new Event(kind, {bubbles: true}));",
        element_id,
        str(value),
    )


def shoot(url: str, lam: float | None, max_tokens: int) -> bytes:
    """The page's PNG after one side-by-side answer, with the details open of the token the decoder moved most
    in the second half of the answer with the decoder (below it the popup hides less of the answer)."""
    chrome = chromium()
    try:
        chrome.get(url)
        end = time.monotonic() + 30
        while not chrome.execute_script("return document.body.dataset.ready") and time.monotonic() < end:
            time.sleep(0.1)
        set_field(chrome, "temperature", 0)
        set_field(chrome, "max_tokens", max_tokens)
        if lam is not None:
            set_field(chrome, "lambda", lam)
        chrome.find_element(By.ID, "side-by-side").click()
        prompt = chrome.find_element(By.ID, "prompt")
        prompt.send_keys(QUESTION)
        prompt.send_keys(Keys.ENTER)
        end = time.monotonic() + ANSWER_SECONDS
        time.sleep(0.5)
        while chrome.execute_script("return document.body.dataset.busy") != "false":
            if time.monotonic() > end:
                raise TimeoutError(f"no answer within {ANSWER_SECONDS:.0f} s")
            time.sleep(0.2)
        chrome.execute_script(
            "const tokens = [...document.querySelectorAll('.answers .message:last-child .tok[data-p-base]')];"
            "const moved = (t) => Math.abs(t.dataset.pMix - t.dataset.pBase);"
            "tokens.slice(tokens.length / 2).sort((a, b) => moved(b) - moved(a))[0]?.click();"
        )
        return chrome.get_screenshot_as_png()
    finally:
        chrome.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", type=Path, default=None, help="base GGUF (default: SmolLM2)")
    parser.add_argument(
        "--memdec", type=Path, default=None, help="memory decoder GGUF (default: the shipped one)"
    )
    parser.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=None,
        help="the right answer's lambda (default: the decoder's)",
    )
    parser.add_argument("-n", "--max-tokens", type=int, default=56)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).parent / "web-chat.png")
    args = parser.parse_args()
    lm = MemoryDecoderLM(args.model or default_base_gguf(), args.memdec or default_memdec_gguf(), n_ctx=1024)
    server = MemdecServer(lm, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        server.warm_up()
        thread.start()
        png = shoot(f"http://127.0.0.1:{server.port}/", args.lam, args.max_tokens)
    finally:
        server.close()
        lm.close()
    image = Image.open(io.BytesIO(png)).convert("RGB").quantize(COLOURS, dither=Image.Dither.NONE)
    write_atomic(args.output, lambda path: image.save(path, "PNG", optimize=True))
    print(f"{args.output}: {image.width}x{image.height}, {args.output.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
