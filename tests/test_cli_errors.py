"""Bad input to `chat` and `perplexity`: one line on stderr, exit status 1, no traceback, nothing written."""

from __future__ import annotations

import struct
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


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """Empty, binary, huge (a 3 GiB sparse file), folder-instead-of-file and no-such-folder inputs."""
    d = tmp_path_factory.mktemp("odd")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"abc\x00def" * 100)
    with open(d / "huge.bin", "wb") as f:
        f.truncate(3 << 30)  # sparse: takes no disk space; must be refused without being read whole
    (d / "folder").mkdir()
    (d / "notes.gguf").write_text("just some text, not a model\n")
    return d


PPL = ["perplexity", "--memdec", "{mem}", "-f", "{d}/legal.txt", "-c", "64"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["perplexity", "--memdec", "{mem}", "-f", "{o}/empty.txt"], "text is empty"),
        (["perplexity", "--memdec", "{mem}", "-f", "{o}/binary.txt"], "looks binary"),
        (["perplexity", "--memdec", "{mem}", "-f", "{o}/huge.bin"], "looks binary"),
        (["perplexity", "--memdec", "{mem}", "-f", "{mem}"], "looks binary"),  # a GGUF as text
        (["perplexity", "--memdec", "{mem}", "-f", "{o}/folder"], "is not a file"),
        (["perplexity", "-m", "{d}/legal.txt", "--no-memdec", "-f", "{d}/legal.txt"], "not a GGUF file"),
        (["perplexity", "-m", "{o}/huge.bin", "--no-memdec", "-f", "{d}/legal.txt"], "not a GGUF file"),
        (["perplexity", "--memdec", "{o}/notes.gguf", "-f", "{d}/legal.txt"], "not a GGUF file"),
        (["perplexity", "--memdec", "{llama}", "-f", "{d}/legal.txt"], "does not fit the base model"),
        ([*PPL, "--lambda", "1.5"], "lambda must be between 0 and 1"),
        ([*PPL, "--lambda-sweep", "0,2"], "lambda must be between 0 and 1"),
        ([*PPL, "--lambda-sweep", ","], "needs at least one lambda"),
        ([*PPL, "-c", "1"], "-c must be at least 2"),
        ([*PPL, "--stride", "0"], "--stride must be between 1 and -c"),
        ([*PPL, "--chunks", "0"], "--chunks must be at least 1"),
        ([*PPL, "--json", "{o}/no-such-folder/report.json"], "does not exist"),
        ([*PPL, "--json", "{o}/folder"], "is a folder"),
        ([*PPL, "--plot", "{o}/lambda.png", "--no-memdec"], "needs a memory decoder"),
        ([*PPL, "--state", "{d}/legal.txt"], "not a perplexity progress file"),
        ([*PPL, "--knn", "{o}/folder"], "not a datastore folder"),
        ([*PPL, "--knn", "{o}/folder", "--knn-lambda", "2"], "lambda must be between 0 and 1"),
        ([*PPL, "--knn", "{o}/folder", "-k", "0"], "-k must be at least 1"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "-c", "100000"], "training context 8192"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "--top-p", "2"], "top-p"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "-n", "0"], "max tokens"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "--repeat-penalty", "0"], "repeat penalty must be above 0"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "--repeat-last-n", "-5"], "repeat-last-n must be -1"),
        (["chat", "--memdec", "{o}/folder", "-p", "hi"], "is not a file"),
        (["serve", "--memdec", "{mem}", "--port", "99999"], "--port must be between 0 and 65535"),
        (["chat", "--memdec", "{mem}", "-p", "hi", "-fa", "maybe"], "--flash-attn must be on, off or auto"),
        ([*PPL, "--flash-attn", "yes"], "--flash-attn must be on, off or auto"),
        (["inspect", "{o}/huge.bin"], "not a GGUF file"),
        (["inspect", "{o}/folder"], "is not a file"),
        (["knn-targets", "{o}/folder"], "not a datastore folder"),
        (["knn-targets", "{o}/missing"], "not a datastore folder"),
        (["datastore", "trim", "{o}/folder"], "not a datastore folder"),
        (
            ["datastore", "build", "--corpus", "{d}/legal.txt", "-o", "{o}/ds", "-m", "{o}/notes.gguf"],
            "not a GGUF",
        ),
        (["datastore", "build", "--corpus", "{d}/legal.txt", "-o", "{o}/ds", "--stride", "0"], "--stride"),
    ],
)
def test_more_bad_input_gets_one_sentence(
    args, needle, bad_files, odd_files, tiny_memdec_gguf, tiny_llama_gguf
):
    filled = [a.format(d=bad_files, o=odd_files, mem=tiny_memdec_gguf, llama=tiny_llama_gguf) for a in args]
    proc = run_cli(*filled)
    assert_one_line_error(proc, needle)
    assert sorted(p.name for p in odd_files.iterdir()) == [
        "binary.txt",
        "empty.txt",
        "folder",
        "huge.bin",
        "notes.gguf",
    ]


def test_datastore_build_refuses_a_window_longer_than_the_base_context(bad_files, tiny_llama_ckpt, tmp_path):
    out = tmp_path / "ds"
    proc = run_cli(
        "datastore", "build", "--corpus", str(bad_files / "legal.txt"), "-o", str(out), "-m", str(tiny_llama_ckpt),
        "--n-ctx", "4096",
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after transformers' own "Loading weights" bar
    assert last == "error: --n-ctx 4096 is longer than the base model's context of 2048 tokens; lower it"
    assert not out.exists()


def test_a_model_llama_cpp_refuses_gets_its_reason_in_one_sentence(tiny_llama_gguf, tmp_path):
    """A GGUF our reader accepts but llama.cpp does not (one tensor's two dimensions swapped): llama.cpp's own
    error reaches the one line, and none of its log is printed."""
    data = bytearray(tiny_llama_gguf.read_bytes())
    name = b"blk.0.ffn_down.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    assert struct.unpack_from("<I", data, at) == (2,)
    rows, cols = struct.unpack_from("<2Q", data, at + 4)
    struct.pack_into("<2Q", data, at + 4, cols, rows)
    swapped = tmp_path / "swapped.gguf"
    swapped.write_bytes(bytes(data))
    proc = run_cli("chat", "-m", str(swapped), "--no-memdec", "-p", "hi")
    assert_one_line_error(proc, f"tensor 'blk.0.ffn_down.weight' has wrong shape; expected {rows}, {cols}")
    assert "llama.cpp could not load" in proc.stderr
