"""The `tokenizer.*` GGUF keys: copied verbatim from a base GGUF, or built from a BPE tokenizer.json.

llama.cpp tokenizes with its own code, chosen by `tokenizer.ggml.pre`; a wrong choice loads fine and silently
tokenizes differently, so the pre-tokenizer is recognised exactly or refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, SpecialVocab, TokenType

from edge_memdec.errors import UserError
from edge_memdec.gguf_file import GGUFInfo

TOKENIZER_PREFIX = "tokenizer."
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer_config.json "<name>_token" -> GGUF key of its id
SPECIAL_KEYS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}

Field = tuple[Any, GGUFValueType, GGUFValueType | None]  # value, GGUF type, array element type


@dataclass
class TokenizerKeys:
    """GGUF tokenizer keys ready to write, plus the token texts the model was trained for."""

    fields: dict[str, Field]
    tokens: list[str]  # before any padding to the embedding size

    def pad_to(self, n_rows: int, source: object) -> None:
        """Add unused "[PADi]" tokens so there is one token per embedding row, as llama.cpp requires."""
        n_tokens = len(self.tokens)
        if n_tokens > n_rows:
            raise UserError(
                f"the tokenizer from {source} has {n_tokens} tokens but the model's embedding has only "
                f"{n_rows} rows; use the tokenizer the model was trained with"
            )
        if n_tokens == n_rows:
            return
        pads = range(n_tokens, n_rows)
        for key, filler in (
            ("tokenizer.ggml.tokens", lambda i: f"[PAD{i}]"),
            ("tokenizer.ggml.token_type", lambda i: int(TokenType.UNUSED)),
            ("tokenizer.ggml.scores", lambda i: -1000.0),
        ):
            if key in self.fields:
                value, vtype, sub = self.fields[key]
                self.fields[key] = (list(value) + [filler(i) for i in pads], vtype, sub)


def tokenizer_from_gguf(base: GGUFInfo) -> TokenizerKeys:
    """Every `tokenizer.*` key of a base model with its GGUF type, so the pair matches by construction."""
    fields: dict[str, Field] = {}
    for key, value in base.metadata.items():
        if key.startswith(TOKENIZER_PREFIX):
            vtype, sub = base.value_types[key]
            fields[key] = (_raw(value), GGUFValueType(vtype), None if sub is None else GGUFValueType(sub))
    return TokenizerKeys(fields, list(base.tokens))


def _raw(value: Any) -> Any:
    """Strings as their original bytes (token texts need not be valid UTF-8), everything else unchanged."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, list) and value and isinstance(value[0], str):
        return [v.encode("utf-8", "surrogateescape") for v in value]
    return value


def tokenizer_from_folder(folder: Path) -> TokenizerKeys:
    """Tokenizer keys from tokenizer.json (byte-level BPE) and tokenizer_config.json of a checkpoint."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{folder} has no tokenizer.json; add it or pass --tokenizer-from BASE.gguf")
    spec = _json(path)
    if (folder / "tokenizer_config.json").is_file():
        _json(folder / "tokenizer_config.json")  # a broken one is one sentence here, not gguf's exception later
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(
            f"{path} is not a BPE tokenizer; only byte-level BPE converts, or pass --tokenizer-from BASE.gguf"
        )
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"), path)

    ids: dict[str, int] = dict(model["vocab"])
    special: set[str] = set()
    user_defined: set[str] = set()
    for added in spec.get("added_tokens") or []:
        ids[added["content"]] = added["id"]
        (special if added.get("special") else user_defined).add(added["content"])
    n_tokens = max(ids.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n_tokens)]
    types = [int(TokenType.UNUSED)] * n_tokens
    for text, i in ids.items():
        tokens[i] = text
        types[i] = int(
            TokenType.CONTROL
            if text in special
            else TokenType.USER_DEFINED
            if text in user_defined
            else TokenType.NORMAL
        )
    # gguf's own reader of the rest: merges (spaces inside a pair encoded as llama.cpp expects), the special
    # token ids, whether BOS is added, the chat template
    vocab = SpecialVocab(folder, load_merges=True, special_token_types=tuple(SPECIAL_KEYS), n_vocab=n_tokens)

    fields: dict[str, Field] = {
        "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING, None),
        "tokenizer.ggml.pre": (pre, GGUFValueType.STRING, None),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (list(vocab.merges), GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.add_bos_token": (bool(vocab.add_special_token.get("bos")), GGUFValueType.BOOL, None),
    }
    for name, key in SPECIAL_KEYS.items():
        token_id = vocab.special_token_ids.get(name)
        if token_id is not None:
            fields[f"tokenizer.ggml.{key}"] = (token_id, GGUFValueType.UINT32, None)
    template = _default_template(vocab.chat_template)
    if template:
        fields["tokenizer.chat_template"] = (template, GGUFValueType.STRING, None)
    return TokenizerKeys(fields, tokens)


def pre_tokenizer_name(pre: Any, path: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer ("gpt-2", "smollm" or "qwen2"); others fail."""
    if _is(pre, "ByteLevel") and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if _is(pre, "Sequence") else []
    if len(steps) == 2 and _is(steps[1], "ByteLevel") and not steps[1].get("add_prefix_space", False):
        first, byte_level_regex = steps[0], steps[1].get("use_regex", True)
        if _is(first, "Digits") and first.get("individual_digits") and byte_level_regex:
            return "smollm"
        if (
            _is(first, "Split")
            and (first.get("pattern") or {}).get("Regex") == QWEN2_SPLIT
            and str(first.get("behavior", "")).lower() == "isolated"
            and not first.get("invert")
            and not byte_level_regex
        ):
            return "qwen2"
    raise UserError(
        f"{path} has a pre-tokenizer llama.cpp would not reproduce (only GPT-2 byte-level, SmolLM2 and Qwen2 "
        "are recognised); pass --tokenizer-from BASE.gguf"
    )


def _is(node: Any, kind: str) -> bool:
    return isinstance(node, dict) and node.get("type") == kind


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(
            f"{path} is not valid JSON ({err.__class__.__name__}); re-save the tokenizer"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; re-save the tokenizer")
    return data


def _default_template(template: Any) -> str | None:
    """The chat template: the string, or the one named "default" of a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None
