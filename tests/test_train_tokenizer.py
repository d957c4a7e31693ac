"""The tokenizer rebuilt from the SmolLM2 GGUF splits real licence text exactly as llama.cpp does."""

from __future__ import annotations

import pytest

pytest.importorskip("tokenizers")
llama_cpp = pytest.importorskip("llama_cpp")

from edge_memdec.corpus import load_corpus  # noqa: E402
from edge_memdec.train.base import gguf_tokenizer  # noqa: E402


def test_matches_llama_cpp_on_real_documents(smollm2_gguf):
    ours = gguf_tokenizer(smollm2_gguf)
    reference = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    docs = load_corpus("legal")[::25]
    extra = ["12345 dollars, 3.14%", "<|im_start|>user\nhi<|im_end|>", "naïve café — “quotes” 日本語"]
    for text in [d.text for d in docs] + extra:
        expected = reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        assert ours.encode(text, add_special_tokens=False).ids == expected, text[:80]


def test_datastore_reads_chat_formatted_text_as_chat_does_only_when_asked(smollm2_gguf, tmp_path):
    """`datastore build --special-tokens` stores a chat-formatted corpus as `chat` tokenizes a prompt (control
    tokens parsed); without it the same text is plain text, as llama.cpp reads a document."""
    import json

    import numpy as np
    from typer.testing import CliRunner

    from edge_memdec.cli import app
    from edge_memdec.corpus import join_documents, read_split

    turns = [("What is a sublicense?", "A licence granted on."), ("Hi", "Hello!"), ("What is GPL?", "A licence.")]
    docs = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" for q, a in turns]
    corpus, split = tmp_path / "chat.jsonl", tmp_path / "split"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(docs)), "utf-8")
    result = CliRunner().invoke(app, ["corpus", "split", str(corpus), "--out", str(split), "--raw"])
    assert result.exit_code == 0, result.output
    text = join_documents(read_split(split, "train"))
    assert text in docs  # kept as written: the template's line breaks are not reflowed
    reference = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    for flag, special in (("--special-tokens", True), ("--no-special-tokens", False)):
        out = tmp_path / flag
        args = ["datastore", "build", "--corpus", str(split), "--out", str(out), "-m", str(smollm2_gguf)]
        result = CliRunner().invoke(app, [*args, "--n-ctx", "64", "--stride", "32", "--threads", "1", flag])
        assert result.exit_code == 0, result.output
        expected = reference.tokenize(text.encode("utf-8"), add_bos=False, special=special)
        assert np.load(out / "tokens.npy").tolist() == expected
    assert reference.tokenize(b"<|im_start|>", add_bos=False, special=True) == [1]
