"""Reading a user's text file: UTF-8 or a clear error, never a traceback."""

from __future__ import annotations

from pathlib import Path

from edge_memdec.errors import UserError


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
