"""The `llm` plugin through llm's own Python API (skipped where the `llm` package is not installed)."""

from __future__ import annotations

import pytest

from edge_memdec import MemoryDecoderLM

llm = pytest.importorskip("llm")

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a sublicense?"},
]


@pytest.fixture
def model(monkeypatch, tmp_path, smollm2_gguf, tiny_memdec_gguf):
    from edge_memdec import llm_plugin

    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))  # llm keeps its own files there, not in ~

    monkeypatch.setenv("EDGE_MEMDEC_BASE", str(smollm2_gguf))
    monkeypatch.setenv("EDGE_MEMDEC_MEMDEC", str(tiny_memdec_gguf))
    if not any(p is llm_plugin for p in llm.plugins.pm.get_plugins()):
        llm.plugins.pm.register(llm_plugin, name="edge_memdec")  # what the entry point does when installed
    return llm.get_model(llm_plugin.MODEL_ID)


def test_greedy_answer_and_conversation_equal_the_python_api(model, smollm2_gguf, tiny_memdec_gguf):
    response = model.prompt(
        MESSAGES[1]["content"], system=MESSAGES[0]["content"], temperature=0, max_tokens=10, lam=0.5
    )
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=1) as lm:
        assert response.text() == lm.chat(MESSAGES, max_tokens=10, temperature=0.0, lam=0.5)
        assert response.usage().output == 10
        conversation = model.conversation()
        first = conversation.prompt("Name one licence.", temperature=0, max_tokens=6).text()
        second = conversation.prompt("Why?", temperature=0, max_tokens=6).text()
        history = [
            {"role": "user", "content": "Name one licence."},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "Why?"},
        ]
        assert second == lm.chat(history, max_tokens=6, temperature=0.0)


def test_penalty_options_reach_the_decode_loop(model, smollm2_gguf, tiny_memdec_gguf):
    options = dict(repeat_penalty=1.5, repeat_last_n=16, presence_penalty=0.4, frequency_penalty=0.3)
    response = model.prompt(MESSAGES[1]["content"], system=MESSAGES[0]["content"], temperature=0, max_tokens=12,
                            **options)  # fmt: skip
    with MemoryDecoderLM(smollm2_gguf, tiny_memdec_gguf, n_ctx=512, n_threads=1) as lm:
        assert response.text() == lm.chat(MESSAGES, max_tokens=12, temperature=0.0, **options)
        assert response.text() != lm.chat(MESSAGES, max_tokens=12, temperature=0.0)


def test_bad_option_and_missing_file_are_clear_errors(model, monkeypatch):
    with pytest.raises(ValueError, match="lambda"):
        model.prompt("Hi", **{"lambda": 2.0}).text()
    with pytest.raises(ValueError, match="repeat_penalty"):
        model.prompt("Hi", repeat_penalty=0).text()
    monkeypatch.setenv("EDGE_MEMDEC_MEMDEC", "missing-memdec.gguf")
    with pytest.raises(llm.ModelError, match="missing-memdec.gguf"):
        model.prompt("Hi", max_tokens=2).text()
