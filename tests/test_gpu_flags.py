"""GPU offload flags reach llama.cpp: -ngl for the base and --memdec-ngl for the memory decoder.

No GPU here, so we record the `n_gpu_layers` that llama.cpp's model loader receives (a wrapper that records the
argument and then calls the real loader: both models still load for real) through the Python API, `chat` and
`serve`. A CPU-only llama.cpp ignores the value; a CUDA or Metal build offloads that many layers.
"""

from __future__ import annotations

import selectors
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import llama_cpp
import pytest
from typer.testing import CliRunner

from edge_memdec import MemoryDecoderLM
from edge_memdec.cli import app

RECORDING_LAUNCHER = """
import signal
import sys
import llama_cpp

# Ctrl-C as a user's shell delivers it, whatever signal state the test runner's process passed down
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
signal.signal(signal.SIGINT, signal.default_int_handler)

real_load = llama_cpp.llama_model_load_from_file

def recording_load(path, params):
    print(f"n_gpu_layers={params.n_gpu_layers} {path.decode()}", file=sys.stderr, flush=True)
    return real_load(path, params)

llama_cpp.llama_model_load_from_file = recording_load
from edge_memdec.cli import main
sys.argv = ["edge-memdec", *sys.argv[1:]]
main()
"""


@pytest.fixture
def loads(monkeypatch) -> list[tuple[int, str]]:
    """(n_gpu_layers, GGUF file name) of every model llama.cpp loads during the test."""
    seen: list[tuple[int, str]] = []
    real_load = llama_cpp.llama_model_load_from_file

    def recording_load(path: bytes, params):
        seen.append((params.n_gpu_layers, path.decode().rsplit("/", 1)[-1]))
        return real_load(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", recording_load)
    return seen


def test_api_passes_both_layer_counts(loads, smollm2_gguf, tiny_memdec_gguf):
    with MemoryDecoderLM(
        smollm2_gguf, tiny_memdec_gguf, n_ctx=64, n_threads=1, n_gpu_layers=12, memdec_gpu_layers=2
    ):
        pass
    assert loads == [(12, smollm2_gguf.name), (2, tiny_memdec_gguf.name)]


@pytest.mark.parametrize(
    ("flags", "expected"), [(["-ngl", "7", "--memdec-ngl", "3"], (7, 3)), (["-ngl", "-1"], (-1, -1))]
)
def test_chat_passes_ngl_and_memdec_ngl(loads, smollm2_gguf, tiny_memdec_gguf, flags, expected):
    args = ["chat", "-m", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf), "-p", "Hi", "-n", "1"]
    result = CliRunner().invoke(app, [*args, "-c", "64", "-t", "1", *flags])
    assert result.exit_code == 0, result.output
    assert [n for n, _ in loads] == list(expected)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stderr_until(proc: subprocess.Popen, words: str, seconds: float) -> list[str]:
    lines: list[str] = []
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if words in line:
                return lines
    raise AssertionError(f"the server did not print {words!r}; stderr: {''.join(lines)}")


def test_serve_passes_ngl_and_memdec_ngl(smollm2_gguf, tiny_memdec_gguf):
    port = _free_port()
    args = ["serve", "-m", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf), "--port", str(port)]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RECORDING_LAUNCHER,
            *args,
            "-c",
            "64",
            "-t",
            "1",
            "-ngl",
            "5",
            "--memdec-ngl",
            "0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _stderr_until(proc, "serving", seconds=120)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)  # reads stderr while waiting: a full pipe never blocks the server
        assert proc.returncode == 0, err[-2000:]
        assert "stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recorded = [line.split()[0] for line in lines if line.startswith("n_gpu_layers=")]
    assert recorded == ["n_gpu_layers=5", "n_gpu_layers=0"]
