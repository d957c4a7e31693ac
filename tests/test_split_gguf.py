"""Split GGUFs (llama.cpp's NAME-00001-of-0000N.gguf): `convert --split-max-size` writes them, every command
reads them from the first part, and a missing or wrong part is one sentence."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.gguf_file import read_gguf

MAX = 4_000_000  # bytes per part: the tiny decoder's q8_0 file (~5 MB with SmolLM2's tokenizer) needs 2+ parts
TEXT = "The licensee may copy and distribute the Program, provided that the notice stays intact. " * 8


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tiny_memdec_ckpt, smollm2_gguf):
    """The tiny decoder as one q8_0 file and as split parts of at most MAX bytes."""
    folder = tmp_path_factory.mktemp("split")
    common = ["--outtype", "q8_0", "--tokenizer-from", smollm2_gguf, "--lambda", "0.3"]
    whole = run_cli("convert", tiny_memdec_ckpt, "-o", folder / "whole.gguf", *common)
    assert whole.returncode == 0, whole.stderr
    (folder / "parts").mkdir()
    proc = run_cli(
        "convert", tiny_memdec_ckpt, "-o", folder / "parts" / "memdec.gguf", *common, "--split-max-size", "4M"
    )
    assert proc.returncode == 0, proc.stderr
    parts = sorted((folder / "parts").iterdir())
    return {"whole": folder / "whole.gguf", "parts": parts, "stdout": proc.stdout}


def test_split_parts_follow_llama_cpp_naming_and_size(converted):
    parts = converted["parts"]
    n = len(parts)
    assert n >= 2
    assert [p.name for p in parts] == [f"memdec-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert all(p.stat().st_size <= MAX for p in parts)
    assert converted["stdout"].strip() == f"wrote {parts[0]}"
    whole, split = read_gguf(converted["whole"]), read_gguf(parts[0])
    assert [(t.name, t.shape, t.dtype) for t in split.tensors] == [
        (t.name, t.shape, t.dtype) for t in whole.tensors
    ]
    for a, b in zip(whole.tensors, split.tensors, strict=True):
        assert np.array_equal(whole.tensor_bytes(a), split.tensor_bytes(b)), a.name
    assert split.memdec["lambda"] == pytest.approx(0.3) and split.files == tuple(parts)


def test_inspect_names_the_parts(converted):
    proc = run_cli("inspect", converted["parts"][0])
    assert proc.returncode == 0, proc.stderr
    assert f"split in {len(converted['parts'])} parts of at most" in proc.stdout


def test_the_pair_scores_the_same_from_split_parts(converted, smollm2_gguf):
    """llama.cpp loads the set from its first part: the same tensors give the same perplexity."""
    results = []
    for memdec in (converted["whole"], converted["parts"][0]):
        with MemoryDecoderLM(smollm2_gguf, memdec, n_ctx=128, n_threads=1) as lm:
            results.append(lm.perplexity(TEXT, n_ctx=128, stride=64, lambdas=[0.3]))
    assert results[0]["memdec"]["ppl"] == results[1]["memdec"]["ppl"]
    assert results[0]["mixed"][0]["ppl"] == results[1]["mixed"][0]["ppl"]


def test_a_missing_or_wrong_part_is_one_sentence(converted, tmp_path):
    parts = converted["parts"]
    n = len(parts)
    folder = tmp_path / "copy"
    folder.mkdir()
    for p in parts[:-1]:
        shutil.copy(p, folder / p.name)
    missing = run_cli("inspect", folder / parts[0].name)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1, missing.stderr
    assert f"{parts[-1].name} is not beside it" in missing.stderr
    second = run_cli("inspect", parts[1])
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert f"give its first part, {parts[0].name}" in second.stderr
    renamed = tmp_path / "memdec.gguf"
    shutil.copy(parts[0], renamed)
    proc = run_cli("inspect", renamed)
    assert proc.returncode == 1 and f"is not named NAME-00001-of-{n:05d}.gguf" in proc.stderr


@pytest.mark.parametrize("size", ["0", "ten", "-5M"])
def test_bad_split_size_is_one_sentence_and_writes_nothing(size, tiny_memdec_ckpt, tmp_path):
    proc = run_cli("convert", tiny_memdec_ckpt, "-o", tmp_path / "m.gguf", "--split-max-size", size)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--split-max-size must be a size such as 95M" in proc.stderr
    assert list(tmp_path.iterdir()) == []
