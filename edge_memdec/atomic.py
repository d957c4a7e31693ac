"""Write a file so that it is either absent or complete under its final name."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edge_memdec.errors import UserError


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp_path)` for a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"could not write {path}: {err.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
