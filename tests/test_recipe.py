"""`edge-memdec recipe` on a folder of .txt files, as a new user runs it: every stage with a tiny base, outputs only
under --work, named after the folder, no machine path inside the exported GGUF, and a rerun that resumes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("faiss")

from conftest import licence_folder, licence_text  # noqa: E402

from edge_memdec.gate_fit import GATES  # noqa: E402
from edge_memdec.gguf_file import read_gguf  # noqa: E402
from edge_memdec.lambda_gate import LambdaGate  # noqa: E402

CLI = [sys.executable, "-m", "edge_memdec.cli"]
N_DOCS = 40  # enough whole documents for a validation and a test document


def gguf_strings(path: Path) -> list[str]:
    """Every string value in a GGUF's metadata (arrays of strings included, the vocabulary aside)."""
    out = []
    for key, value in read_gguf(path).metadata.items():
        if key.startswith("tokenizer.ggml."):
            continue
        values = value if isinstance(value, list) else [value]
        out += [v for v in values if isinstance(v, str)]
    return out


@pytest.fixture(scope="module")
def mydocs(tmp_path_factory) -> Path:
    """A user's folder of plain-text documents: licence texts the tiny tokenizer was not trained on."""
    folder = tmp_path_factory.mktemp("user") / "mydocs"
    folder.mkdir()
    files = sorted(licence_folder().glob("*.LICENSE"))[5::10][:N_DOCS]
    for f in files:
        (folder / f"{f.stem}.txt").write_text(licence_text(f), encoding="utf-8")
    return folder


def test_recipe_on_a_folder_keeps_its_outputs_under_work(mydocs, tiny_llama_gguf, tmp_path):
    work = tmp_path / "w"
    beside = set(mydocs.parent.iterdir())
    args = [*CLI, "recipe", str(mydocs), "--work", str(work), "-m", str(tiny_llama_gguf)]
    args += ["--budget", "0.04", "--epochs", "1", "--threads", "1", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    assert json.loads(done.stdout) == report  # --json: stdout is the report alone, the stages' lines go to stderr
    assert set(mydocs.parent.iterdir()) == beside  # nothing written beside the corpus folder

    gguf = work / "mydocs-memdec-q8_0.gguf"
    meta = read_gguf(gguf).metadata
    assert meta["general.name"] == "mydocs-memdec" and meta["memdec.domain"] == "mydocs"
    for value in gguf_strings(gguf):
        assert str(tmp_path) not in value and str(mydocs) not in value, value

    # the report scores base, decoder, mixture and kNN-LM on the folder's own test documents, and general text
    assert report["test_tokens_scored"] > 100
    for row in (report["base"], report["memdec_alone"], report["base_plus_memdec"], report["knn_lm"]):
        assert row["ppl"] > 1
    assert report["general"]["base"]["ppl"] > 1
    assert 0 < report["memdec_lambda"] < 1
    assert (work / "mydocs-memdec-q8_0-lambda.png").is_file()
    assert set(report["stages"]) >= {"split", "datastore", "knn_targets", "train", "gate", "report"}
    # the gate stage scored the fixed lambda and every candidate gate; the GGUF recommends the winner (or none)
    gate = report["stages"]["gate"]
    assert len(gate["candidates"]) == len(GATES) + 1 and gate["candidates"][0]["gate"] is None
    assert all(row["valid"] > 0 and row["general"] > 0 for row in gate["candidates"])
    recommended = LambdaGate.of_metadata(read_gguf(gguf).memdec)
    assert gate["gate"] == (recommended.text() if recommended else None) == report["lambda_gate"]
    assert report["budget"]["epochs"] == 1 and json.loads((work / "run" / "train.json").read_text())["epochs"] == 1

    # a rerun resumes: every finished stage is skipped, the report is made again
    again = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((work / "stages.json").read_text())
    for name in ("split", "datastore", "knn_targets", "train", "gate"):
        assert stages[name] == report["stages"][name], name


def test_recipe_refuses_zero_epochs_in_one_sentence(mydocs, tmp_path):
    args = [*CLI, "recipe", str(mydocs), "--work", str(tmp_path / "w"), "--epochs", "0"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip() == "error: --epochs must be at least 1, got 0"
    assert not (tmp_path / "w").exists()
