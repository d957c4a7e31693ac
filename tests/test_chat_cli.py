"""`edge-memdec chat` as a user runs it: one-shot, interactive over stdin, and Ctrl-C stopping one answer."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from edge_memdec.cli import app


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
    # the banner, the two answers' figures and /reset's note
    assert proc.stderr.strip().splitlines()[2] == "[conversation cleared]"
    assert len(proc.stderr.strip().splitlines()) == 4


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


def _chat(args: list[str], stdin: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_memdec.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=240, env=env)  # fmt: skip


def test_chat_commands_change_the_next_answer_and_bad_ones_are_one_line(smollm2_gguf, tiny_memdec_gguf):
    from edge_memdec import MemoryDecoderLM

    question = "What is copyleft?"
    lines = ["/lambda 2", "/memdec maybe", "/nope", "/explain on", "/memdec off", question, "/memdec on",
             "/lambda 0.9", "/reset", question, "/explain off", "/system Answer in French.", "/reset",
             "//lambda is a word", "/exit", "never read"]  # fmt: skip
    proc = _chat(chat_args(smollm2_gguf, tiny_memdec_gguf, "-n", "8", "--temp", "0"), "\n".join(lines) + "\n")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 3
    assert "lambda must be between 0 and 1, got 2.0" in errors[0] and "on or off" in errors[1]
    assert "unknown command /nope; /help lists the commands" in errors[2]
    out = [re.sub(r"^(> )+", "", line) for line in proc.stdout.split("\n")]  # input()'s prompts
    first = out.index("token\tp_base\tp_mem\tp_mix\tlambda\trank_base\trank_mix\tchanged\ttop_base\ttop_mix")
    second = out.index(out[first], first + 1)  # the two explained answers' tables
    rows_off = [[float(x) for x in row.split("\t")[1:4]] for row in out[first + 1 : first + 9]]
    rows_09 = [[float(x) for x in row.split("\t")[1:4]] for row in out[second + 1 : second + 9]]
    assert all(p_mix == p_base for p_base, _, p_mix in rows_off)  # /memdec off: lambda 0
    assert all(abs(p_mix - (0.1 * p_base + 0.9 * p_mem)) < 2e-3 for p_base, p_mem, p_mix in rows_09)
    assert any(p_mix < 0.5 * p_base for p_base, _, p_mix in rows_09)
    messages = [{"role": "user", "content": question}]
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=2) as lm:
        off = lm.chat(messages, max_tokens=8, temperature=0.0, lam=0.0)
        slash = lm.chat([{"role": "system", "content": "Answer in French."},
                         {"role": "user", "content": "/lambda is a word"}], max_tokens=8, temperature=0.0)  # fmt: skip
    assert out[first - 1] == off and out[second + 10] == slash


def test_explain_piped_prints_a_table_and_a_summary(smollm2_gguf, tiny_memdec_gguf):
    proc = _chat(chat_args(smollm2_gguf, tiny_memdec_gguf, "-p", "What is a licence?", "-n", "10", "--temp", "0",
                           "--explain", "--lambda", "0.7"), "")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    answer, header, *rows, summary, _ = proc.stdout.split("\n")
    assert "\x1b[" not in proc.stdout
    assert header.startswith("token\tp_base\tp_mem\tp_mix") and len(rows) == 10
    assert "".join(eval(row.split("\t")[0]) for row in rows) == answer  # tokens are Python literals
    changed = sum(row.split("\t")[7] == "yes" for row in rows)
    assert {row.split("\t")[4] for row in rows} == {"0.700"}  # each token's lambda: fixed without a gate
    assert summary.startswith(f"[explain: 10 tokens; the memory decoder changed the top token {changed} times")


@pytest.mark.parametrize("no_color", [False, True])
def test_explain_on_a_terminal_tints_tokens(smollm2_gguf, tiny_memdec_gguf, no_color):
    import os
    import pty

    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | ({"NO_COLOR": "1"} if no_color else {})
    args = chat_args(smollm2_gguf, tiny_memdec_gguf, "-p", "What is a licence?", "-n", "10", "--temp", "0",
                     "--explain", "--lambda", "0.9")  # fmt: skip
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edge_memdec.cli", *args], stdout=follower,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        output += data
    os.close(leader)
    assert proc.wait(timeout=240) == 0
    text = output.decode("utf-8", errors="replace")
    assert ("\x1b[" in text) != no_color  # at lambda 0.9 the tiny decoder moves every token
    assert "[explain: 10 tokens" in text and "token\tp_base" not in text
