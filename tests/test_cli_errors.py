"""Bad input to `chat` and `perplexity`: one line on stderr, exit status 1, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, smollm2_gguf, legal_text):
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("just some text, not a model\n")
    (d / "latin1.txt").write_bytes("Licence fran\xe7aise".encode("latin-1") * 50)
    (d / "short.txt").write_text("Too short.")
    (d / "legal.txt").write_text(legal_text)
    with open(smollm2_gguf, "rb") as src:
        (d / "truncated.gguf").write_bytes(src.read(4096))
    return d


@pytest.mark.parametrize(
    "args, needle",
    [
        (["chat", "-m", "{d}/missing.gguf", "--no-memdec", "-p", "hi"], "does not exist"),
        (["chat", "-m", "{d}/notes.txt", "--no-memdec", "-p", "hi"], "GGUF"),
        (["chat", "-m", "{d}/truncated.gguf", "--no-memdec", "-p", "hi"], "truncated.gguf"),
        (["chat", "--memdec", "{mem}", "--lambda", "1.5", "-p", "hi"], "lambda"),
        (["chat", "--memdec", "{mem}", "-p", "   "], "prompt is empty"),
        (["chat", "--memdec", "{llama}", "-p", "hi"], "token"),
        (["perplexity", "--memdec", "{mem}", "-f", "{d}/missing.txt"], "does not exist"),
        (["perplexity", "--memdec", "{mem}", "-f", "{d}/latin1.txt"], "not UTF-8"),
        (["perplexity", "--memdec", "{mem}", "-f", "{d}/short.txt", "-c", "64"], "tokens"),
        (
            ["perplexity", "--memdec", "{mem}", "-f", "{d}/legal.txt", "--protocol", "nope", "-c", "64"],
            "protocol",
        ),
        (["perplexity", "--memdec", "{mem}", "-f", "{d}/legal.txt", "--lambda-sweep", "0,x"], "lambda-sweep"),
        (["perplexity", "--memdec", "{mem}", "-f", "{d}/legal.txt", "-c", "100000"], "context"),
    ],
)
def test_bad_input_gets_one_sentence(args, needle, bad_files, tiny_memdec_gguf, tiny_llama_gguf):
    filled = [a.format(d=bad_files, mem=tiny_memdec_gguf, llama=tiny_llama_gguf) for a in args]
    assert_one_line_error(run_cli(*filled), needle)


def test_failed_run_leaves_no_json_behind(bad_files, tiny_memdec_gguf):
    out = bad_files / "report.json"
    proc = run_cli(
        "perplexity",
        "--memdec",
        str(tiny_memdec_gguf),
        "-f",
        str(bad_files / "short.txt"),
        "-c",
        "64",
        "--json",
        str(out),
    )
    assert_one_line_error(proc, "tokens")
    assert not out.exists()
