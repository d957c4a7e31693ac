"""A GPT-2 pair, as the paper's GPT-2 memory decoders run: a tiny GPT-2 base and a tiny GPT-2 memory decoder, both
converted by us, pass the pair check, chat (raw completion: GPT-2 has no chat template) and score."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from llama_cpp import Llama
from test_perplexity import log_softmax64
from test_runtime import reference_mixture
from typer.testing import CliRunner

from edge_memdec import MemoryDecoderLM
from edge_memdec.cli import app
from edge_memdec.gguf_file import read_gguf
from edge_memdec.pair_check import pair_problems

N_CTX = 128
PROMPT = "The licensee shall"


def test_the_two_gpt2_files_pair(tiny_gpt2_gguf, tiny_gpt2_memdec_gguf):
    assert pair_problems(read_gguf(tiny_gpt2_gguf), read_gguf(tiny_gpt2_memdec_gguf)) == []


def test_api_generates_the_argmax_of_an_independent_mixture(tiny_gpt2_gguf, tiny_gpt2_memdec_gguf):
    with MemoryDecoderLM(tiny_gpt2_gguf, tiny_gpt2_memdec_gguf, n_ctx=N_CTX, n_threads=2) as lm:
        assert lm.lam == pytest.approx(0.3)  # from the decoder's memdec.lambda
        tokens = lm.tokenize(PROMPT)
        generation = lm.start(tokens, max_tokens=6, temperature=0.0, lam=0.5)
        generation.run()
    assert len(generation.tokens) == 6
    base = Llama(str(tiny_gpt2_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    mem = Llama(str(tiny_gpt2_memdec_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    context = list(tokens)
    for token in generation.tokens:
        assert token == int(np.argmax(reference_mixture(base, mem, context, 0.5)))
        context.append(token)


def test_chat_raw_completes_and_a_template_is_asked_for(tiny_gpt2_gguf, tiny_gpt2_memdec_gguf):
    args = ["chat", "-m", str(tiny_gpt2_gguf), "--memdec", str(tiny_gpt2_memdec_gguf), "-t", "2"]
    greedy = ["-p", PROMPT, "-n", "8", "--temp", "0", "-c", str(N_CTX)]
    runner = CliRunner()
    first, second = (
        runner.invoke(app, [*args, "--raw", *greedy]),
        runner.invoke(app, [*args, "--raw", *greedy]),
    )
    assert first.exit_code == 0, first.output
    assert first.output.strip() and first.output == second.output
    for extra, message in [
        (greedy, f"{tiny_gpt2_gguf.name} has no chat template; use --raw for plain completion"),
        (
            ["--raw", "-p", PROMPT],
            f"context size 4096 is larger than {tiny_gpt2_gguf.name}'s training context 512",
        ),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "edge_memdec.cli", *args, *extra],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1, proc.stderr


def test_perplexity_cli_equals_an_independent_mixture(
    tiny_gpt2_gguf, tiny_gpt2_memdec_gguf, tmp_path, legal_text
):
    text, report_path = tmp_path / "legal.txt", tmp_path / "report.json"
    text.write_text(legal_text, encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "perplexity", "-m", str(tiny_gpt2_gguf), "--memdec", str(tiny_gpt2_memdec_gguf), "-f", str(text),
            "-c", str(N_CTX), "--stride", "64", "--chunks", "2", "--lambda-sweep", "0,0.5,1",
            "--json", str(report_path), "-t", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Final estimate: PPL = " in result.output
    report = json.loads(report_path.read_text())

    logps = []
    for path in (tiny_gpt2_gguf, tiny_gpt2_memdec_gguf):
        ref = Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False, n_threads=2)
        tokens = ref.tokenize(legal_text.encode(), add_bos=False)
        rows = []
        for begin, first_target in ((0, 1), (64, N_CTX)):  # the paper protocol's first two windows
            ref.reset()
            ref.eval(tokens[begin : begin + N_CTX])
            logp = log_softmax64(np.array(ref.scores[:N_CTX]))
            rows += [logp[t - 1 - begin, tokens[t]] for t in range(first_target, begin + N_CTX)]
        logps.append(np.array(rows))
        ref.close()
    base, mem = logps
    mixed = np.logaddexp(np.log(0.5) + base, np.log(0.5) + mem)
    assert report["tokens_scored"] == len(base) == N_CTX - 1 + 64
    assert report["base"]["ppl"] == pytest.approx(math.exp(-base.mean()), rel=1e-4)
    assert report["memdec"]["ppl"] == pytest.approx(math.exp(-mem.mean()), rel=1e-4)
    assert {row["lambda"]: row["ppl"] for row in report["mixed"]}[0.5] == pytest.approx(
        math.exp(-mixed.mean()), rel=1e-4
    )
