"""A tiny base and real licence text through datastore -> kNN targets -> training -> GGUF -> pair -> perplexity,
plus exact resume after SIGKILL and 2-rank torchrun against 1 rank."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

from conftest import licence_folder, licence_text  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from edge_memdec.cli import app  # noqa: E402
from edge_memdec.lambda_gate import LambdaGate  # noqa: E402
from edge_memdec.train.export_gguf import export_memdec, memdec_facts  # noqa: E402

CLI = [sys.executable, "-m", "edge_memdec.cli"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_llama_ckpt, legal_text) -> dict[str, Path]:
    """Corpus split, datastore (64/32 windows) and k=8 targets made from the tiny base."""
    work = tmp_path_factory.mktemp("train")
    text = work / "legal.txt"
    text.write_text(legal_text, encoding="utf-8")
    split, ds = work / "split", work / "ds"
    invoke("corpus", "split", str(text), "--out", str(split))
    invoke(
        "datastore",
        "build",
        "--corpus",
        str(split),
        "--out",
        str(ds),
        "-m",
        str(tiny_llama_ckpt),
        "--n-ctx",
        "64",
        "--stride",
        "32",
        "--shard-windows",
        "4",
        "--threads",
        "1",
    )
    invoke("knn-targets", str(ds), "-k", "8", "--top", "4", "--chunk", "64", "--threads", "1")
    return {"split": split, "ds": ds, "work": work}


def train_args(stores, out: Path, base: Path, *extra: str) -> list[str]:
    return [
        "train",
        str(stores["ds"]),
        "--out",
        str(out),
        "-m",
        str(base),
        "--layers",
        "1",
        "--n-ctx",
        "32",
        "--stride",
        "32",
        "--batch-windows",
        "2",
        "--threads",
        "1",
        *extra,
    ]


def weights(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "hf" / "model.safetensors"))


def test_datastore_resumes_and_targets_are_complete(stores, tiny_llama_ckpt):
    ds = stores["ds"]
    keys = np.load(ds / "keys-00000.npy")
    assert keys.dtype == np.float16 and keys.shape[1] == 64
    ids = np.load(ds / "targets" / "knn-ids.npy")
    probs = np.load(ds / "targets" / "knn-probs.npy").astype(np.float32)
    assert ids.shape == probs.shape and ids.shape[1] == 4
    assert np.allclose(probs.sum(axis=1), 1.0, atol=2e-3)
    # a second build with the same inputs resumes (nothing to do) instead of starting over
    before = (ds / "keys-00000.npy").stat().st_mtime_ns
    invoke(
        "datastore",
        "build",
        "--corpus",
        str(stores["split"]),
        "--out",
        str(ds),
        "-m",
        str(tiny_llama_ckpt),
        "--n-ctx",
        "64",
        "--stride",
        "32",
        "--shard-windows",
        "4",
        "--threads",
        "1",
    )
    assert (ds / "keys-00000.npy").stat().st_mtime_ns == before


def test_train_export_pair_perplexity(stores, tiny_llama_ckpt, tiny_llama_gguf, legal_text, tmp_path):
    out, gguf = tmp_path / "run", tmp_path / "memdec.gguf"
    output = invoke(
        *train_args(
            stores,
            out,
            tiny_llama_ckpt,
            "--max-steps",
            "2",
            "--valid-corpus",
            str(stores["split"]),
            "--valid-tokens",
            "200",
            "--export",
            str(gguf),
            "--outtype",
            "f32",
            "--tokenizer-from",
            str(tiny_llama_gguf),
            "--domain",
            "legal",
        )
    )
    from edge_memdec.api import MemoryDecoderLM
    from edge_memdec.gguf_file import read_gguf

    info = read_gguf(gguf)
    assert info.memdec["domain"] == "legal"
    assert 0.0 < info.memdec["lambda"] < 1.0
    # the gate is fitted after training only against a GGUF base (llama.cpp scores the pair); said in one line
    assert "gate: not fitted" in output and LambdaGate.of_metadata(info.memdec) is None
    with MemoryDecoderLM(tiny_llama_gguf, gguf) as lm:
        report = lm.perplexity(legal_text[:2000], n_ctx=64, stride=32, lambdas=[0.3])
    assert math.isfinite(report["memdec"]["ppl"]) and math.isfinite(report["mixed"][0]["ppl"])


def test_runs_of_any_seed_validate_on_the_same_documents(stores, tiny_llama_ckpt, tmp_path):
    """--seed orders the training windows; the validation sample stays the one the recipe's report scores."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for f in sorted(licence_folder().glob("*.LICENSE"))[:500:5]:
        (docs / f"{f.stem}.txt").write_text(licence_text(f), encoding="utf-8")
    invoke("corpus", "split", str(docs), "--out", str(tmp_path / "split"))  # 5 validation documents
    valid = ["--max-steps", "1", "--valid-corpus", str(tmp_path / "split"), "--valid-tokens", "100"]
    runs = [tmp_path / f"seed-{seed}" for seed in (0, 3)]
    for run, seed in zip(runs, (0, 3), strict=True):
        invoke(*train_args(stores, run, tiny_llama_ckpt, *valid, "--seed", str(seed)))
    tokens = [np.load(run / "valid-base-logprobs.npz")["tokens"] for run in runs]
    assert len(tokens[0]) == 100 and np.array_equal(tokens[0], tokens[1])
    assert not np.array_equal(weights(runs[0])["model.norm.weight"], weights(runs[1])["model.norm.weight"])


def test_train_export_recommends_the_gate_asked_for(stores, tiny_llama_ckpt, tiny_llama_gguf, tmp_path):
    """`train --lambda-gate SLOPE,OFFSET` writes that gate into the export; a bad value stops before training."""
    from edge_memdec.errors import UserError
    from edge_memdec.gguf_file import read_gguf

    gguf = tmp_path / "memdec.gguf"
    export = ["--export", str(gguf), "--outtype", "f32", "--tokenizer-from", str(tiny_llama_gguf)]
    invoke(*train_args(stores, tmp_path / "run", tiny_llama_ckpt, "--max-steps", "1", *export, "--lambda-gate", "0.5,1"))
    assert LambdaGate.of_metadata(read_gguf(gguf).memdec) == LambdaGate(0.5, 1.0)
    # a release recommends a lambda chosen with its gate (recipes/legal_ship.py --lambda), not the run's own
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    again = export_memdec(tmp_path / "run", tmp_path / "lam.gguf", "f32", tiny_llama_gguf, "legal", summary,
                          lambda_gate=LambdaGate(2.0, -1.0), lam=0.95)  # fmt: skip
    assert read_gguf(again).memdec["lambda"] == pytest.approx(0.95)
    run_lambda = memdec_facts(summary, "legal", "base")["lambda"]  # what the export recommends by default
    assert run_lambda != pytest.approx(0.95) and read_gguf(gguf).memdec["lambda"] == pytest.approx(run_lambda)
    assert LambdaGate.of_metadata(read_gguf(again).memdec) == LambdaGate(2.0, -1.0)
    bad = tmp_path / "bad"
    result = CliRunner().invoke(app, train_args(stores, bad, tiny_llama_ckpt, *export, "--lambda-gate", "strong"))
    assert isinstance(result.exception, UserError) and "SLOPE,OFFSET" in str(result.exception)
    assert not bad.exists()


def test_warmup_raises_the_learning_rate_then_decays_it(stores, tiny_llama_ckpt, tmp_path):
    """--warmup-steps N: the lr after each step climbs lr/N, 2lr/N, ... to the peak, then falls linearly to 0 at the
    last step; without it the decay starts at once; a negative count is one sentence before any work."""
    from edge_memdec.errors import UserError

    runs = {w: tmp_path / f"warmup-{w}" for w in (0, 3)}
    for w, run in runs.items():
        invoke(*train_args(stores, run, tiny_llama_ckpt, "--max-steps", "6", "--lr", "1e-3", "--warmup-steps", str(w)))
    lrs = {w: [r["lr"] for r in json.loads((run / "train.json").read_text())["history"]] for w, run in runs.items()}
    # the lr recorded after step s is the one step s+1 uses
    np.testing.assert_allclose(lrs[3], [2e-3 / 3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3, 0.0], atol=1e-12)
    np.testing.assert_allclose(lrs[0], [1e-3 * (6 - s) / 6 for s in range(1, 7)], atol=1e-12)
    bad = tmp_path / "bad"
    result = CliRunner().invoke(app, train_args(stores, bad, tiny_llama_ckpt, "--warmup-steps", "-1"))
    assert isinstance(result.exception, UserError) and "--warmup-steps" in str(result.exception)
    assert not bad.exists()


def test_resume_after_sigkill_equals_uninterrupted(stores, tiny_llama_ckpt, tmp_path):
    steps = ["--epochs", "50", "--max-steps", "60", "--checkpoint-every", "1", "--warmup-steps", "7"]
    straight = tmp_path / "straight"
    subprocess.run([*CLI, *train_args(stores, straight, tiny_llama_ckpt, *steps)], check=True)
    killed = tmp_path / "killed"
    child = subprocess.Popen([*CLI, *train_args(stores, killed, tiny_llama_ckpt, *steps)])
    checkpoint = killed / "checkpoint.pt"
    deadline = time.time() + 600
    while not checkpoint.is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    step = torch.load(checkpoint, weights_only=False)["step"]
    assert step < 60, "the run finished before it could be killed"
    shutil.rmtree(killed / "hf", ignore_errors=True)
    subprocess.run([*CLI, *train_args(stores, killed, tiny_llama_ckpt, *steps, "--resume")], check=True)
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_two_ranks_match_one(stores, tiny_llama_ckpt, tmp_path):
    steps = ["--max-steps", "3", "--batch-windows", "4"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([*CLI, *train_args(stores, one, tiny_llama_ckpt, *steps)], check=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    subprocess.run(
        [*torchrun, "-m", "edge_memdec.cli", *train_args(stores, two, tiny_llama_ckpt, *steps)], check=True
    )
    a, b = weights(one), weights(two)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-5, err_msg=name)
    # Each rank reports its own share: together they trained every position once, and the 2-rank run
    # spent a measurable part of its steps in the all-reduce (the 1-rank run none).
    ranks_one = json.loads((one / "train.json").read_text())["ranks"]
    ranks_two = json.loads((two / "train.json").read_text())["ranks"]
    assert len(ranks_one) == 1 and ranks_one[0]["all_reduce_s"] == 0.0
    assert len(ranks_two) == 2
    trained = json.loads((two / "train.json").read_text())["positions_trained"]
    assert sum(r["positions"] for r in ranks_two) == trained
    assert all(r["steps"] == 3 and r["all_reduce_s"] > 0 and 0 < r["all_reduce_share"] < 1 for r in ranks_two)
