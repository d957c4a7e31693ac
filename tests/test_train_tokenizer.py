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
