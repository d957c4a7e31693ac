"""llama-server's own endpoints beside OpenAI's, in its field names: /tokenize, /detokenize and /props.

Tokens are the base model's (the memory decoder shares its vocabulary). Bodies are checked like OpenAI's:
an unknown field or a bad value is a 400 that names it.
"""

from __future__ import annotations

from typing import Any

from edge_memdec import defaults
from edge_memdec.api import MemoryDecoderLM
from edge_memdec.openai_api import ApiError, refuse_unknown

TOKENIZE_FIELDS = {"content", "add_special", "with_pieces"}
DETOKENIZE_FIELDS = {"tokens"}


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return value


def tokenize(body: dict, lm: MemoryDecoderLM) -> dict[str, Any]:
    """{"tokens": [ids]}, or with `with_pieces` [{"id", "piece"}] (a piece that is not whole UTF-8 is its bytes
    as a list of numbers, as llama-server gives it). Special-token text is read as the special token."""
    refuse_unknown(body, TOKENIZE_FIELDS)
    content = body.get("content")
    if not isinstance(content, str):
        raise ApiError(400, "'content' must be the text to tokenize, a string", param="content")
    model = lm.pair.base
    tokens = model.tokenize(content, add_bos=_flag(body, "add_special"), special=True)
    if not _flag(body, "with_pieces"):
        return {"tokens": tokens}
    pieces = []
    for token in tokens:
        raw = model.detokenize([token])
        try:
            piece: str | list[int] = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        pieces.append({"id": token, "piece": piece})
    return {"tokens": pieces}


def detokenize(body: dict, lm: MemoryDecoderLM) -> dict[str, str]:
    """{"content": text} of token ids (control tokens written as their text; broken UTF-8 as U+FFFD)."""
    refuse_unknown(body, DETOKENIZE_FIELDS)
    tokens = body.get("tokens")
    n_vocab = lm.pair.base.n_vocab
    if not isinstance(tokens, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens
    ):
        raise ApiError(400, f"'tokens' must be a list of token ids from 0 to {n_vocab - 1}", param="tokens")
    return {"content": lm.pair.base.detokenize(tokens).decode("utf-8", errors="replace")}


def _model_facts(model: Any) -> dict[str, Any]:
    info = model.info
    return {
        "path": str(model.path),
        "name": info.get("general.name", model.path.stem),
        "architecture": info.arch,
        "file_type": info.file_type,
        "n_params": info.n_params,
        "n_layers": info.n_layers,
        "n_vocab": info.n_vocab,
        "n_ctx_train": info.n_ctx_train,
    }


def props(lm: MemoryDecoderLM, model_id: str, max_tokens: int) -> dict[str, Any]:
    """What llama-server's /props says (default settings, slots, model path, chat template), plus the pair:
    both models, lambda and the decoder's memdec.* metadata."""
    pair = lm.pair
    params = {
        "max_tokens": max_tokens,
        "temperature": defaults.TEMPERATURE,
        "top_k": defaults.TOP_K,
        "top_p": defaults.TOP_P,
        "min_p": defaults.MIN_P,
        "repeat_penalty": defaults.REPEAT_PENALTY,
        "repeat_last_n": defaults.REPEAT_LAST_N,
        "presence_penalty": defaults.PRESENCE_PENALTY,
        "frequency_penalty": defaults.FREQUENCY_PENALTY,
        "lambda": round(lm.lam, 6),
        "lambda_gate": pair.gate.text() if pair.gate else None,  # each token's lambda: lambda * its gate factor
        "base_special_tokens": pair.base_special_tokens,
    }
    memdec = None
    if pair.memdec is not None:
        memdec = _model_facts(pair.memdec) | {"metadata": pair.memdec.info.memdec}
    return {
        "model_alias": model_id,
        "model_path": str(pair.base.path),
        "total_slots": pair.n_parallel,
        "default_generation_settings": {"n_ctx": pair.n_ctx, "params": params},
        "chat_template": pair.base.metadata("tokenizer.chat_template", ""),
        "lambda": round(lm.lam, 6),
        "n_ctx": pair.n_ctx,
        "models": {"base": _model_facts(pair.base), "memdec": memdec},
        # every memory decoder (the first is "memdec" above), by the name a request's lambda uses
        "memdecs": [
            {**_model_facts(model), "name": name, "lambda": round(lam, 6), "metadata": model.info.memdec}
            for name, model, lam in zip(pair.names, pair.memdecs, pair.lams, strict=True)
        ],
    }
