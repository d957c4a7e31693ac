"""`edge-memdec inspect` and the pair checks behind it, on the real SmolLM2 base and tiny converted models."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edge_memdec.errors import UserError
from edge_memdec.gguf_file import read_gguf
from edge_memdec.pair_check import check_pair, pair_problems


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_memdec.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_inspect_describes_the_real_base_model(smollm2_gguf):
    proc = run_cli("inspect", smollm2_gguf)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "llama, 30 layers, hidden 576, 9 heads (3 kv), trained context 8192" in out
    assert "134.5M (134,515,008)" in out
    assert "Q4_1" in out and "93.8 MiB" in out
    assert "gpt2 (pre smollm), 49,152 tokens, bos 1 '<|im_start|>', eos 2 '<|im_end|>'" in out
    assert "has a chat template" in out
    assert "not a memory decoder" in out


def test_inspect_shows_memdec_metadata_and_a_compatible_pair(tiny_memdec_gguf, smollm2_gguf):
    proc = run_cli("inspect", tiny_memdec_gguf, "--base", smollm2_gguf)
    assert proc.returncode == 0, proc.stderr
    assert "lambda 0.3, domain legal, base_model SmolLM2-135M-Instruct, vocab_fingerprint" in proc.stdout
    assert f"compatible with {smollm2_gguf.name}" in proc.stdout
    assert "NOT" not in proc.stdout


def test_inspect_names_the_failed_checks_of_an_incompatible_pair(tiny_llama_gguf, smollm2_gguf):
    proc = run_cli("inspect", tiny_llama_gguf, "--base", smollm2_gguf)
    assert proc.returncode == 0, proc.stderr
    assert f"NOT compatible with {smollm2_gguf.name}" in proc.stdout
    assert "the BOS token ids differ (base 1, memory decoder 0)" in proc.stdout
    assert (
        "the vocabulary sizes differ by more than 128 tokens (base 49152, memory decoder 512)" in proc.stdout
    )
    assert "the text of token 5 differs" in proc.stdout


@pytest.mark.parametrize("content", [b"", b"plain text, not a model\n", b"GGUF\x03\x00\x00\x00"])
def test_inspect_of_a_bad_file_is_one_line(content, tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    proc = run_cli("inspect", path)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and str(path) in proc.stderr


def test_pair_of_memdec_and_base_is_compatible(tiny_memdec_gguf, smollm2_gguf):
    base, memdec = read_gguf(smollm2_gguf), read_gguf(tiny_memdec_gguf)
    assert pair_problems(base, memdec) == []
    check_pair(base, memdec)


def test_each_pair_check_is_reported(tiny_memdec_gguf, smollm2_gguf):
    base, memdec = read_gguf(smollm2_gguf), read_gguf(tiny_memdec_gguf)
    memdec.metadata["tokenizer.ggml.model"] = "llama"
    memdec.metadata["tokenizer.ggml.eos_token_id"] = 0
    memdec.metadata["tokenizer.ggml.tokens"] = [*base.tokens[:700], "Ġchanged", *base.tokens[701:]]
    assert pair_problems(base, memdec) == [
        "the tokenizer types differ (base gpt2, memory decoder llama)",
        "the EOS token ids differ (base 2, memory decoder 0)",
        f"the text of token 700 differs (base {ascii(base.tokens[700])}, memory decoder {ascii('Ġchanged')})",
    ]
    with pytest.raises(UserError, match="tokenizer types differ"):
        check_pair(base, memdec)


def test_padded_vocabulary_within_128_tokens_still_pairs(tiny_memdec_gguf, smollm2_gguf):
    base, memdec = read_gguf(smollm2_gguf), read_gguf(tiny_memdec_gguf)
    memdec.metadata["tokenizer.ggml.tokens"] = base.tokens + [f"[PAD{i}]" for i in range(128)]
    assert pair_problems(base, memdec) == []
    memdec.metadata["tokenizer.ggml.tokens"] = base.tokens + [f"[PAD{i}]" for i in range(129)]
    assert "vocabulary sizes differ" in pair_problems(base, memdec)[0]
