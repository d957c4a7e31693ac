"""`edge-memdec chat` as a user runs it: one-shot, interactive over stdin, and Ctrl-C stopping one answer."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from cli import app


def chat_args(smollm2_gguf, tiny_memdec_gguf, *extra: str) -> list[str]:
    return [
        "chat",
        "-m",
        str(smollm2_gguf),
        "--memdec",
        str(tiny_memdec_gguf),
        "-c",
        "512",
        "-t",
        "2",
        *extra,
    ]


def test_one_shot_greedy_answer_is_deterministic(smollm2_gguf, tiny_memdec_gguf):
    runner = CliRunner()
    args = chat_args(smollm2_gguf, tiny_memdec_gguf, "-p", "What is a licence?", "-n", "12", "--temp", "0")
    first = runner.invoke(app, args)
    second = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.strip()
    assert first.output == second.output


def test_penalties_reach_the_decode_loop(smollm2_gguf, tiny_memdec_gguf):
    from edge_memdec import MemoryDecoderLM

    penalties = ["--repeat-penalty", "1.5", "--repeat-last-n", "16", "--presence-penalty", "0.4",
                 "--frequency-penalty", "0.3"]  # fmt: skip
    args = chat_args(smollm2_gguf, tiny_memdec_gguf, "-p", "What is a licence?", "-n", "16", "--temp", "0")
    plain, penalised = (CliRunner().invoke(app, args + extra) for extra in ([], penalties))
    assert plain.exit_code == 0 and penalised.exit_code == 0, penalised.output
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=2) as lm:
        want = lm.chat([{"role": "user", "content": "What is a licence?"}], max_tokens=16, temperature=0.0,
                       repeat_penalty=1.5, repeat_last_n=16, presence_penalty=0.4, frequency_penalty=0.3)  # fmt: skip
    assert penalised.output == want + "\n" != plain.output


def test_raw_completion_and_no_memdec(smollm2_gguf):
    result = CliRunner().invoke(
        app,
        [
            "chat",
            "-m",
            str(smollm2_gguf),
            "--no-memdec",
            "--raw",
            "-p",
            "The MIT License",
            "-n",
            "8",
            "--temp",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip()


def test_interactive_session_reads_turns_until_eof(smollm2_gguf, tiny_memdec_gguf):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_memdec.cli",
            *chat_args(smollm2_gguf, tiny_memdec_gguf, "-n", "6", "--temp", "0", "--verbose"),
        ],
        input="Hello there\n/reset\nWhat is copyleft?\n",
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("tok/s") == 2
    assert "Traceback" not in proc.stderr
    assert "llama_" not in proc.stderr  # -v is our figures only, none of llama.cpp's log
    assert len(proc.stderr.strip().splitlines()) == 3  # the banner and the two answers' figures


@pytest.mark.parametrize("flag", ["-vv", "--log-llama"])
def test_llama_cpp_log_only_when_asked_for(smollm2_gguf, flag):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", "chat", "-m", str(smollm2_gguf), "--no-memdec", "-c", "64",
         "-t", "2", "-p", "Hi", "-n", "1", "--temp", "0", flag],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "llama_model_loader: loaded meta data" in proc.stderr
    assert ("tok/s" in proc.stderr) == (flag == "-vv")


def test_ctrl_c_stops_the_answer_but_not_the_session(smollm2_gguf, tiny_memdec_gguf):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_memdec.cli",
            *chat_args(
                smollm2_gguf,
                tiny_memdec_gguf,
                "-n",
                "4000",
                "-c",
                "8192",
                "--temp",
                "1",
                "--min-p",
                "0",
                "--top-k",
                "0",
                "--seed",
                "1",  # a seeded draw: an unseeded one could sample end-of-text before Ctrl-C arrives
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdin.write("Write a very long story about licences.\n")
    proc.stdin.flush()
    proc.stdout.read(20)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate("/exit\n", timeout=120)
    assert proc.returncode == 0, err
    assert "[stopped]" in err
    assert "Traceback" not in err
