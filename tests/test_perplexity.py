"""Perplexity: one pass for base, memory decoder and a lambda sweep; both protocols; the CLI's outputs."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from llama_cpp import Llama
from typer.testing import CliRunner

from edge_memdec import MemoryDecoderLM
from edge_memdec.cli import app

N_CTX = 128


@pytest.fixture(scope="module")
def pair_lm(smollm2_gguf, tiny_memdec_gguf):
    # flash_attn off like the reference `Llama` below: these tests compare protocols, not attention kernels.
    lm = MemoryDecoderLM(
        smollm2_gguf, tiny_memdec_gguf, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, flash_attn=False
    )
    yield lm
    lm.close()


def log_softmax64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_windows_longer_than_n_batch_are_scored_in_pieces(pair_lm, smollm2_gguf, tiny_memdec_gguf, legal_text):
    """A model opened with a small n_batch (the API's default) scores the same as one evaluating whole windows."""
    whole = pair_lm.perplexity(legal_text, n_ctx=N_CTX, stride=64, lambdas=[0.0, 0.5], max_windows=3)
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=N_CTX, n_batch=48, n_threads=2, flash_attn=False) as small:
        pieces = small.perplexity(legal_text, n_ctx=N_CTX, stride=64, lambdas=[0.0, 0.5], max_windows=3)
    assert pieces["tokens_scored"] == whole["tokens_scored"]
    for key in ("base", "memdec"):
        assert pieces[key]["ppl"] == pytest.approx(whole[key]["ppl"], rel=2e-3)
    assert pieces["mixed"][1]["ppl"] == pytest.approx(whole["mixed"][1]["ppl"], rel=2e-3)


def test_lambda_zero_is_the_base_and_one_is_the_memory_decoder(pair_lm, legal_text):
    report = pair_lm.perplexity(legal_text, n_ctx=N_CTX, stride=64, lambdas=[0.0, 0.5, 1.0], max_windows=4)
    mixed = {row["lambda"]: row["ppl"] for row in report["mixed"]}
    assert mixed[0.0] == pytest.approx(report["base"]["ppl"], rel=1e-9)
    assert mixed[1.0] == pytest.approx(report["memdec"]["ppl"], rel=1e-9)
    assert report["tokens_scored"] == (N_CTX - 1) + 3 * 64
    assert report["best_lambda"] in mixed
    assert min(mixed.values()) <= min(report["base"]["ppl"], report["memdec"]["ppl"]) + 1e-9


def test_paper_protocol_equals_an_independent_sliding_window_computation(pair_lm, smollm2_gguf, legal_text):
    report = pair_lm.perplexity(legal_text, n_ctx=N_CTX, stride=64, lambdas=[0.0], max_windows=3)
    ref = Llama(str(smollm2_gguf), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False, n_threads=2)
    tokens = ref.tokenize(legal_text.encode(), add_bos=False)
    nll = []
    for begin, first_target in ((0, 1), (64, N_CTX), (128, N_CTX + 64)):
        window = tokens[begin : begin + N_CTX]
        ref.reset()
        ref.eval(window)
        logp = log_softmax64(np.array(ref.scores[: len(window)]))
        for target in range(first_target, begin + N_CTX):
            nll.append(-logp[target - 1 - begin, tokens[target]])
    assert report["tokens_scored"] == len(nll)
    assert report["base"]["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4)


def test_llama_protocol_equals_an_independent_computation_from_raw_logits(smollm2_gguf, legal_text):
    with MemoryDecoderLM(smollm2_gguf, None, n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, flash_attn=False) as lm:
        report = lm.perplexity(legal_text, protocol="llama", n_ctx=N_CTX, max_windows=3)
    ref = Llama(str(smollm2_gguf), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False, n_threads=2)
    tokens = ref.tokenize(
        legal_text.encode(), add_bos=ref.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    )
    first = N_CTX // 2
    nll = []
    for chunk in range(3):
        window = tokens[chunk * N_CTX : (chunk + 1) * N_CTX]
        ref.reset()
        ref.eval(window)
        logp = log_softmax64(np.array(ref.scores[:N_CTX]))
        nll += [-logp[j, window[j + 1]] for j in range(first, N_CTX - 1)]
    nll = np.array(nll)
    ppl = math.exp(nll.mean())
    stderr = math.sqrt((np.mean(nll**2) - nll.mean() ** 2) / (len(nll) - 1)) * ppl
    assert report["tokens_scored"] == 3 * (N_CTX - 1 - first)
    assert report["base"]["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert report["base"]["stderr"] == pytest.approx(stderr, rel=1e-3)


def test_cli_llama_protocol_prints_running_lines_and_final_estimate(
    smollm2_gguf, tiny_memdec_gguf, tmp_path, legal_text
):
    text = tmp_path / "legal.txt"
    text.write_text(legal_text, encoding="utf-8")
    result = CliRunner().invoke(
        app,
        [
            "perplexity",
            "-m",
            str(smollm2_gguf),
            "--memdec",
            str(tiny_memdec_gguf),
            "-f",
            str(text),
            "--protocol",
            "llama",
            "-c",
            str(N_CTX),
            "--chunks",
            "2",
            "-t",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},", result.stdout)
    assert re.search(r"Final estimate: PPL = \d+\.\d{4} \+/- \d+\.\d{5}", result.output)


def test_cli_llama_protocol_takes_llama_perplexitys_defaults(smollm2_gguf, tmp_path, legal_text):
    """--protocol llama alone means llama-perplexity's -c 512 -fa auto -ub 512; the paper protocol keeps its
    exact attention. Flash attention moves the number, so the defaults must agree for the numbers to."""
    text = tmp_path / "legal.txt"
    text.write_text(legal_text, encoding="utf-8")

    def report(*flags: str) -> dict:
        out = tmp_path / "report.json"
        args = ["perplexity", "-m", str(smollm2_gguf), "--no-memdec", "-f", str(text), "--chunks", "2", "-t", "2"]
        result = CliRunner().invoke(app, [*args, *flags, "--json", str(out)])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    llama = report("--protocol", "llama")
    assert (llama["n_ctx"], llama["flash_attn"], llama["n_ubatch"]) == (512, "auto", 512)
    assert report("--protocol", "llama", "-c", "512", "-fa", "auto", "-ub", "512")["base"] == llama["base"]
    exact = report("--protocol", "llama", "-fa", "off")
    assert exact["flash_attn"] == "off" and exact["base"]["ppl"] != llama["base"]["ppl"]
    paper = report("--chunks", "1")
    assert (paper["n_ctx"], paper["flash_attn"], paper["n_ubatch"]) == (1024, "off", 1024)


def test_cli_json_and_plot(smollm2_gguf, tiny_memdec_gguf, tmp_path, legal_text):
    text = tmp_path / "legal.txt"
    text.write_text(legal_text, encoding="utf-8")
    out_json, out_png = tmp_path / "report.json", tmp_path / "lambda.png"
    result = CliRunner().invoke(
        app,
        [
            "perplexity",
            "-m",
            str(smollm2_gguf),
            "--memdec",
            str(tiny_memdec_gguf),
            "-f",
            str(text),
            "-c",
            str(N_CTX),
            "--stride",
            "64",
            "--chunks",
            "2",
            "--lambda-sweep",
            "0,0.25,0.5,1",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "-t",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out_json.read_text())
    for key in (
        "protocol",
        "n_ctx",
        "stride",
        "tokens_scored",
        "base",
        "memdec",
        "mixed",
        "best_lambda",
        "seconds",
    ):
        assert key in report
    assert [row["lambda"] for row in report["mixed"]] == [0.0, 0.25, 0.5, 1.0]
    assert report["protocol"] == "paper" and report["n_ctx"] == N_CTX and report["stride"] == 64
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.part*"))


def test_an_interrupted_run_resumes_from_its_state_file_to_the_same_report(pair_lm, legal_text, tmp_path):
    """--state: the sums saved after every window carry an interrupted run on to the uninterrupted numbers, and
    the file goes when the run completes."""
    from edge_memdec.perplexity import perplexity

    args = dict(protocol="paper", n_ctx=N_CTX, stride=64, lambdas=[0.0, 0.5], max_windows=4, progress=False)
    whole = perplexity(pair_lm.pair, legal_text, **args)
    state = tmp_path / "state.json"

    def stop_in_the_second_window(i: int, acc) -> None:
        if i == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        perplexity(pair_lm.pair, legal_text, **args, on_window=stop_in_the_second_window, state_path=state)
    assert json.loads(state.read_text())["next_window"] == 1  # the first window's sums, saved
    resumed = perplexity(pair_lm.pair, legal_text, **args, state_path=state)
    assert not state.exists()
    assert resumed["tokens_scored"] == whole["tokens_scored"]
    for key in ("base", "memdec", "selected"):
        assert resumed[key]["ppl"] == pytest.approx(whole[key]["ppl"], rel=1e-12)
    assert [r["ppl"] for r in resumed["mixed"]] == pytest.approx([r["ppl"] for r in whole["mixed"]], rel=1e-12)
