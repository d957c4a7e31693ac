"""The `memdec.*` GGUF metadata that marks a file as a memory decoder, and how its values are typed.

A memory decoder is an ordinary llama/qwen2/gpt2 GGUF plus these keys; llama.cpp ignores them, the runtime reads
them to pick a default lambda and to check the base model's tokenizer before pairing.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

from gguf import GGUFValueType

from edge_memdec.defaults import check_lambda
from edge_memdec.errors import UserError

PREFIX = "memdec."
LAMBDA = "memdec.lambda"  # f32: recommended interpolation weight of the memory decoder, in [0, 1]
VOCAB_FINGERPRINT = "memdec.vocab_fingerprint"  # str: sha256 hex of "\n".join(token texts)
DOMAIN = "memdec.domain"  # str: e.g. "legal"
BASE_MODEL = "memdec.base_model"  # str: the base model the kNN targets came from
TRAIN_PREFIX = (
    "memdec.train."  # optional training facts: tokens, steps, epochs, knn_k, knn_temperature, beta...
)


def vocab_fingerprint(tokens: Sequence[str]) -> str:
    """sha256 hex of the token texts joined by newlines: equal fingerprints mean identical vocabularies."""
    return hashlib.sha256("\n".join(tokens).encode("utf-8", "surrogateescape")).hexdigest()


def memdec_fields(memdec: Mapping[str, object] | None) -> dict[str, tuple[object, GGUFValueType]]:
    """GGUF key -> (value, type) for user-given memory-decoder facts.

    Keys are given without the prefix: "lambda", "domain", "base_model", and training facts either as
    "train.<name>" or nested under "train". Floats are stored as f32, integers as int64, text as strings.
    """
    fields: dict[str, tuple[object, GGUFValueType]] = {}
    for name, value in _flatten(memdec or {}):
        if value is None:
            continue
        key = PREFIX + name
        if isinstance(value, bool):
            fields[key] = (value, GGUFValueType.BOOL)
        elif isinstance(value, int):
            fields[key] = (value, GGUFValueType.INT64)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise UserError(f"the memory-decoder value {name} is {value}; give a finite number")
            fields[key] = (value, GGUFValueType.FLOAT32)
        elif isinstance(value, str):
            fields[key] = (value, GGUFValueType.STRING)
        else:
            raise UserError(
                f"the memory-decoder value {name} has type {type(value).__name__}; use a number or text"
            )
    if LAMBDA in fields:
        fields[LAMBDA] = (check_lambda(fields[LAMBDA][0]), GGUFValueType.FLOAT32)
    if VOCAB_FINGERPRINT in fields:
        raise UserError("memdec.vocab_fingerprint is computed from the tokenizer; do not pass it")
    return fields


def _flatten(values: Mapping[str, object], prefix: str = "") -> list[tuple[str, object]]:
    flat = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            flat += _flatten(value, f"{prefix}{name}.")
        else:
            flat.append((prefix + name, value))
    return flat
