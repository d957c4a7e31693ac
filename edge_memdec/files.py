"""Files the user gives and files we write: every output appears under its final name only when complete.

One temp-name scheme for all of them: `.NAME.PID.part` beside `NAME` (a quantized convert adds `.f32`). A write
that fails (a full disk, a file-size limit, no permission) removes its temp file and becomes one UserError; a
killed process leaves its temp behind, and the next write of the same name (or `remove_stale_temps` over the
folder) deletes the temps whose process is gone.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edge_memdec.errors import UserError

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.part(?:\..+)?$")


def write_error(path: str | Path, err: OSError) -> UserError:
    """The one sentence for a failed write of `path` (numpy's OSErrors carry no strerror, hence `or err`)."""
    return UserError(
        f"writing {path} failed ({err.strerror or err}); check the free disk space and the folder's permissions"
    )


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs: temp files named after a dead writer's pid are stale and may go."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path(final: Path) -> Path:
    """This process's temp name for `final`: `.NAME.PID.part` in the same folder (so os.replace is atomic)."""
    return final.with_name(f".{final.name}.{os.getpid()}.part")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(folder: str | Path, name: str | None = None) -> None:
    """Delete the temps (files or folders) that killed runs left in `folder`, only those of `name` if given;
    temps of live processes stay."""
    pattern = f".{glob.escape(name)}.*.part*" if name else ".*.part*"
    for temp in Path(folder).glob(pattern):
        match = _TEMP.match(temp.name)
        if match and (name is None or match["name"] == name) and not process_alive(int(match["pid"])):
            _remove(temp)


def output_folder(path: str | Path, what: str) -> Path:
    """`path` made (with its parents) for a resumable stage's files, with the temps killed runs left there swept;
    one sentence naming `what` (e.g. "datastore") when it cannot be made."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the {what} folder {path} ({err.strerror or err})") from None
    remove_stale_temps(path)
    return path


@contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """A temp path beside `final` to write; renamed onto `final` when the block ends, removed on any error or
    Ctrl-C. An OSError in the block becomes the one-sentence UserError naming `final`."""
    final = Path(final)
    remove_stale_temps(final.parent, final.name)
    temp = temp_path(final)
    try:
        yield temp
        os.replace(temp, final)
    except OSError as err:
        raise write_error(final, err) from None
    finally:
        temp.unlink(missing_ok=True)


def write_atomic(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call `write(temp)` for a temp file beside `path`, then rename it onto `path`; returns `path`."""
    with atomic_path(path) as temp:
        write(temp)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: object, indent: int | None = 1) -> Path:
    """Write `data` as JSON (UTF-8, a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(data, indent=indent) + "\n")


def write_npy_atomic(path: str | Path, array: np.ndarray) -> Path:
    """np.save `array` to `path` atomically (through a file object: np.save would append .npy to the temp)."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            np.save(f, array)

    return write_atomic(path, write)


def write_npz_atomic(path: str | Path, **arrays: object) -> Path:
    """np.savez `arrays` to `path` atomically (through a file object: np.savez would append .npz to the temp)."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            np.savez(f, **arrays)

    return write_atomic(path, write)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A fresh temp folder beside `final` to fill; when the block ends it replaces `final` (the old folder is
    moved aside first, then removed), so `final` is never half written. Removed on any error or Ctrl-C."""
    final = Path(final)
    remove_stale_temps(final.parent, final.name)
    temp = temp_path(final)
    old = temp.with_name(temp.name + ".old")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        yield temp
        if final.exists():
            os.replace(final, old)
        os.replace(temp, final)
    except OSError as err:
        raise write_error(final, err) from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def check_output_path(path: str | Path, suffix: str = "") -> Path:
    """Refuse, before any work is done, an output path that cannot be written: a folder, or a missing folder.

    `suffix` (e.g. ".gguf") is named in the advice for a folder."""
    path = Path(path)
    if path.is_dir():
        ending = f" ending in {suffix}" if suffix else ""
        raise UserError(f"the output {path} is a folder; give a file name{ending}")
    if not path.parent.is_dir():
        raise UserError(f"the output folder {path.parent} does not exist; create it first")
    return path


def read_text_file(path: str | Path) -> str:
    """The file's text; rejects missing files, folders, binary data and text that is not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    try:
        with open(path, "rb") as f:  # the head first: a huge binary file is refused without reading it all
            head = f.read(65536)
            if b"\x00" in head:
                raise UserError(f"{path} looks binary (it has NUL bytes); give a UTF-8 text file")
            data = head + f.read()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8"
        ) from None
