"""The entropy gate on lambda: the kernels against numpy, greedy decoding and perplexity against independent
computations from llama.cpp's logits, the GGUF's recommended gate, and bad gates as one-line errors."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from llama_cpp import Llama
from test_runtime import next_token_rows

from edge_memdec import MemoryDecoderLM
from edge_memdec.kernels import gate_factors, gated_lambda, row_entropies
from edge_memdec.lambda_gate import LambdaGate

PROMPT = "The licensee shall"
N_CTX = 96


def log_softmax64(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def entropy64(rows: np.ndarray) -> np.ndarray:
    logp = log_softmax64(rows)
    return -(np.exp(logp) * logp).sum(axis=-1)


def ref_factor(h_base, h_mem, slope: float, offset: float, base_slope: float | None = None):
    base_slope = slope if base_slope is None else base_slope
    return 1.0 / (1.0 + np.exp(-(base_slope * h_base - slope * h_mem + offset)))


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_gated_lambda_is_lambda_times_the_sigmoid_of_the_entropy_gap(scale):
    rng = np.random.default_rng(7)
    base = (rng.standard_normal(5000) * scale).astype(np.float32)
    mem = (rng.standard_normal(4990) * scale * 0.7).astype(np.float32)  # fewer ids: the shared ones count
    h_base, h_mem = entropy64(base[:4990]), entropy64(mem)
    for slope, offset, base_slope in ((1.0, 0.0, None), (2.5, -1.0, None), (0.0, 0.3, None), (1.5, 1.0, 0.25),
                                      (1.0, 2.0, 0.0)):  # fmt: skip
        want = 0.8 * ref_factor(h_base, h_mem, slope, offset, base_slope)
        got = gated_lambda(base, mem, 0.8, slope, offset, base_slope)
        assert got == pytest.approx(want, rel=2e-4)  # H: float32 exps
    rows_b, rows_m = np.stack([base[:4990], mem]), np.stack([mem, base[:4990]])
    assert row_entropies(rows_b) == pytest.approx(entropy64(rows_b), rel=1e-5, abs=1e-6)
    factors = gate_factors(rows_b, rows_m, 1.0, 0.5)
    assert factors == pytest.approx(ref_factor(np.array([h_base, h_mem]), np.array([h_mem, h_base]), 1.0, 0.5), rel=2e-4)
    factors = gate_factors(rows_b, rows_m, 1.5, 1.0, base_slope=0.25)
    want = ref_factor(np.array([h_base, h_mem]), np.array([h_mem, h_base]), 1.5, 1.0, 0.25)
    assert factors == pytest.approx(want, rel=2e-4)


def test_gate_ends_are_exact():
    rng = np.random.default_rng(8)
    base, mem = rng.standard_normal(300).astype(np.float32), rng.standard_normal(300).astype(np.float32)
    assert gated_lambda(base, mem, 0.9, 1.0, -1000.0) == 0.0
    assert gated_lambda(base, mem, 0.0, 1.0, 5.0) == 0.0
    assert gated_lambda(base, mem, 0.9, 0.0, 50.0) == 0.9


def test_gate_text_parsing():
    assert LambdaGate.parse("1,0") == LambdaGate(1.0, 0.0)
    assert LambdaGate.parse(" 2 , -1.5 ") == LambdaGate(2.0, -1.5)
    assert LambdaGate.parse("off") is None
    assert LambdaGate(1.5, -2.0).text() == "1.5,-2"
    assert LambdaGate.parse("1.5,1,0.25") == LambdaGate(1.5, 1.0, 0.25)
    assert LambdaGate.parse("1.5,1,0.25").text() == "1.5,1,0.25"
    assert LambdaGate.parse("1,0,1") == LambdaGate(1.0, 0.0)  # equal slopes: the entropy-gap gate, one spelling
    assert LambdaGate.parse("1,0,1").text() == "1,0"
    assert LambdaGate(2.0, 0.0, 0.0).base_weight == 0.0 and LambdaGate(2.0, 0.0).base_weight == 2.0
    gate = LambdaGate(1.5, 1.0, 0.25)
    facts = {f"lambda_gate.{k}": v for k, v in gate.metadata()["lambda_gate"].items()}
    assert LambdaGate.of_metadata(facts) == gate
    assert "base_slope" not in LambdaGate(1.0, 0.0).metadata()["lambda_gate"]


@pytest.fixture(scope="module")
def gated_lm(smollm2_gguf, tiny_memdec_gguf):
    # the tiny random decoder is far less sure than SmolLM2 (H_mem ~ log V): offset 5 puts the factor mid-range;
    # exact attention like the reference (flash attention's f16 moves the base's entropy by up to ~0.3 nats)
    model = MemoryDecoderLM(
        smollm2_gguf, tiny_memdec_gguf, lam=0.6, lambda_gate="0.8,5", n_ctx=256, n_threads=2, flash_attn=False
    )
    yield model
    model.close()


@pytest.mark.parametrize("gate", [None, "0.6,5,0.3"])  # None: the pair's 0.8,5; then a base slope of its own
def test_greedy_gated_generation_is_argmax_of_an_independent_gated_mixture(
    gated_lm, smollm2_gguf, tiny_memdec_gguf, gate
):
    tokens = gated_lm.tokenize(PROMPT)
    request = {} if gate is None else {"lambda_gate": gate}
    generation = gated_lm.start(tokens, max_tokens=6, temperature=0.0, explain=1, **request)
    slope, offset, base_slope = (0.8, 5.0, None) if gate is None else (0.6, 5.0, 0.3)
    generation.run()
    assert len(generation.tokens) == 6
    base = Llama(str(smollm2_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    mem = Llama(str(tiny_memdec_gguf), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    context, lams = list(tokens), []
    for token in generation.tokens:
        row_base, row_mem = next_token_rows(base, mem, context)
        lb, lm = log_softmax64(row_base), log_softmax64(row_mem)
        lam = 0.6 * ref_factor(entropy64(row_base), entropy64(row_mem), slope, offset, base_slope)
        lams.append(lam)
        assert token == int(np.argmax(np.logaddexp(np.log1p(-lam) + lb, np.log(lam) + lm)))
        context.append(token)
    assert 0.02 < min(lams) and max(lams) < 0.58  # the gate moved lambda: a test of the gate, not of 0 or 0.6
    # each token's trace carries the lambda it was mixed with
    assert [t.lam for t in generation.traces] == pytest.approx(lams, rel=1e-3)


def test_gated_perplexity_equals_an_independent_computation(gated_lm, smollm2_gguf, tiny_memdec_gguf, legal_text):
    report = gated_lm.perplexity(legal_text, n_ctx=N_CTX, stride=48, lambdas=[0.0, 0.6, 1.0], max_windows=2)
    assert report["lambda_gate"] == "0.8,5"
    tokens = gated_lm.tokenize(legal_text, add_bos=False)
    windows = ((0, 1), (48, N_CTX))  # (first token, first target): each window scores what none before did
    rows = {}
    for name, path in (("base", smollm2_gguf), ("mem", tiny_memdec_gguf)):
        ref = Llama(str(path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, verbose=False, n_threads=2)
        rows[name] = []
        for begin, _ in windows:
            ref.reset()
            ref.eval(tokens[begin : begin + N_CTX])
            rows[name].append(np.array(ref.scores[:N_CTX]))
    nll = []
    for w, (begin, first_target) in enumerate(windows):
        n = min(rows["base"][w].shape[1], rows["mem"][w].shape[1])
        rb, rm = rows["base"][w][:, :n], rows["mem"][w][:, :n]
        lb, lm = log_softmax64(rb), log_softmax64(rm)
        lam = 0.6 * ref_factor(entropy64(rb), entropy64(rm), 0.8, 5.0)
        mix = np.logaddexp(np.log1p(-lam)[:, None] + lb, np.log(lam)[:, None] + lm)
        for target in range(first_target, begin + N_CTX):
            nll.append(-mix[target - 1 - begin, tokens[target]])
    assert report["tokens_scored"] == len(nll)
    mixed = {row["lambda"]: row["ppl"] for row in report["mixed"]}
    assert mixed[0.6] == pytest.approx(math.exp(np.mean(nll)), rel=1e-3)
    assert mixed[0.0] == pytest.approx(report["base"]["ppl"], rel=1e-9)  # lambda 0: the base whatever the gate


def test_gate_fits_arithmetic_on_position_scores_is_the_pairs_perplexity(smollm2_gguf, tiny_memdec_gguf, legal_text):
    """gate_fit scores a gate from per-position rows (NLLs and entropies) instead of running the pair again: its
    PPL at a gate (one with a base slope of its own), fixed and at lambda 0 must be what the pair's own perplexity
    pass reports on the same windows."""
    from edge_memdec.gate_fit import gated_ppl, position_scores

    text = legal_text[:3000]
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lam=0.6, lambda_gate="0.6,5,0.3", n_ctx=256, n_threads=2,
                         flash_attn=False) as lm:  # fmt: skip
        scores = position_scores(lm.pair, text)  # the pair's 256-token context: 256/128 windows
        report = lm.perplexity(text, n_ctx=256, stride=128, lambdas=[0.0, 0.6])
    assert report["tokens_scored"] == len(scores) and report["lambda_gate"] == "0.6,5,0.3"
    mixed = {row["lambda"]: row["ppl"] for row in report["mixed"]}
    assert gated_ppl(scores, 0.6, LambdaGate(0.6, 5.0, 0.3)) == pytest.approx(mixed[0.6], rel=1e-4)
    assert gated_ppl(scores, 0.6, LambdaGate(0.6, 5.0)) != pytest.approx(mixed[0.6], rel=1e-3)  # the base slope counts
    assert gated_ppl(scores, 0.0, None) == pytest.approx(report["base"]["ppl"], rel=1e-4)
    assert gated_ppl(scores, 1.0, None) == pytest.approx(report["memdec"]["ppl"], rel=1e-4)


def test_a_gate_of_one_half_halves_lambda(gated_lm, smollm2_gguf, tiny_memdec_gguf, legal_text):
    """slope 0, offset 0: every token's factor is 1/2, so the gated 0.6 is the fixed 0.3 exactly."""
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lambda_gate="0,0", n_ctx=256, n_threads=2) as half:
        gated = half.perplexity(legal_text, n_ctx=N_CTX, lambdas=[0.6], max_windows=2)
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, lambda_gate="off", n_ctx=256, n_threads=2) as fixed:
        plain = fixed.perplexity(legal_text, n_ctx=N_CTX, lambdas=[0.3], max_windows=2)
    assert gated["mixed"][0]["ppl"] == pytest.approx(plain["mixed"][0]["ppl"], rel=1e-9)
    assert plain["lambda_gate"] is None


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_memdec.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_converted_decoder_recommends_its_gate_and_the_cli_can_turn_it_off(
    tmp_path, tiny_memdec_ckpt, smollm2_gguf, legal_text
):
    out = tmp_path / "gated.gguf"
    made = cli("convert", str(tiny_memdec_ckpt), "-o", str(out), "--outtype", "f32", "--tokenizer-from",
               str(smollm2_gguf), "--lambda", "0.7", "--lambda-gate", "0.8,5")  # fmt: skip
    assert made.returncode == 0, made.stderr
    with MemoryDecoderLM(smollm2_gguf, out, n_ctx=128) as lm:
        assert lm.pair.gate == LambdaGate(0.8, 5.0) and lm.lam == pytest.approx(0.7)
    with MemoryDecoderLM(smollm2_gguf, out, lambda_gate=None, n_ctx=128) as lm:
        assert lm.pair.gate is None
    text = tmp_path / "legal.txt"
    text.write_text(legal_text)
    base = ["perplexity", "-f", str(text), "-m", str(smollm2_gguf), "--memdec", str(out), "-c", "64", "--chunks", "1"]
    gated, plain = cli(*base), cli(*base, "--lambda-gate", "off")
    assert gated.returncode == 0 and plain.returncode == 0, gated.stderr + plain.stderr
    assert "lambda gate 0.8,5" in gated.stdout and "lambda gate" not in plain.stdout
    assert gated.stdout.splitlines()[-1] != plain.stdout.splitlines()[-1]  # the gated mixture scores differently


@pytest.mark.parametrize(
    "gate, needle",
    [("1", "the lambda gate takes SLOPE,OFFSET"), ("a,b", "the lambda gate takes SLOPE,OFFSET"),
     ("1,2,3,4", "the lambda gate takes SLOPE,OFFSET"), ("1,inf", "must be a finite number"),
     ("1,0,nan", "base slope must be a finite number")],
)  # fmt: skip
def test_bad_gates_are_one_line_errors(gate, needle):
    proc = cli("chat", "-p", "hi", "-n", "1", "--lambda-gate", gate)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_a_gate_needs_one_memory_decoder(smollm2_gguf):
    proc = cli("chat", "-p", "hi", "-n", "1", "-m", str(smollm2_gguf), "--no-memdec", "--lambda-gate", "1,0")
    assert proc.returncode == 1 and "exactly one memory decoder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_request_can_set_or_turn_off_the_gate(gated_lm):
    """A factor of 0 is the base alone, a factor of 1 the fixed lambda; a request's "off" is the fixed lambda."""
    messages = [{"role": "user", "content": "What is a licence?"}]
    ask = dict(max_tokens=8, temperature=0.0)
    base = gated_lm.chat(messages, lam=0.0, **ask)
    fixed = gated_lm.chat(messages, lambda_gate="off", **ask)
    assert gated_lm.chat(messages, lambda_gate="0,-1000", **ask) == base
    assert gated_lm.chat(messages, lambda_gate="0,1000", **ask) == fixed
    generation = gated_lm.start(gated_lm.tokenize("The licensee shall"), max_tokens=3, temperature=0.0,
                                lambda_gate="0,0", explain=1)  # fmt: skip
    generation.run()
    assert [t.lam for t in generation.traces] == pytest.approx([0.3] * 3)  # 0.6 * sigmoid(0)


def test_the_server_takes_a_requests_gate_and_refuses_a_bad_one(gated_lm):
    import json
    import urllib.error
    import urllib.request

    from conftest import serving

    def post(body: dict):
        request = urllib.request.Request(srv.url + "/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    body = {"messages": [{"role": "user", "content": "What is a licence?"}], "max_tokens": 6, "temperature": 0}
    with serving(gated_lm) as srv:
        status, answer = post(body | {"lambda_gate": "0,-1000"})
        assert status == 200
        assert answer["choices"][0]["message"]["content"] == gated_lm.chat(body["messages"], lam=0.0, max_tokens=6,
                                                                           temperature=0.0)  # fmt: skip
        status, error = post(body | {"lambda_gate": "sharp"})
        assert status == 400 and error["error"]["param"] == "lambda_gate"


def test_the_chat_gate_command(smollm2_gguf, tiny_memdec_gguf):
    lines = ["/gate 0,-1000", "What is a licence?", "/gate sharp", "/gate off", "What is a licence?", "/exit"]
    proc = subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", "chat", "-m", str(smollm2_gguf), "--memdec", str(tiny_memdec_gguf),
         "-n", "6", "--temp", "0", "-c", "256", "-v"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "[lambda gate 0,-1000]" in proc.stderr and "[lambda gate off]" in proc.stderr
    assert "the lambda gate takes SLOPE,OFFSET" in proc.stderr  # the bad one: one line, the chat goes on
    assert "gated 0,-1000]" in proc.stderr  # -v names the gate the answer ran with
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=256, n_threads=2) as lm:
        base = lm.chat([{"role": "user", "content": "What is a licence?"}], max_tokens=6, temperature=0.0, lam=0.0)
    assert base in proc.stdout  # factor 0: the base's answer
