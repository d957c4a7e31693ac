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
        raise UserError(f"could not write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work is done, an output path that cannot be written: a folder, or a missing folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"the output {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise UserError(f"the output folder {path.parent} does not exist; create it first")
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs: temp files named after a dead writer's pid are stale and may go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
