"""llama.cpp's own log (loader, context and backend messages): silent unless asked for, errors kept.

llama.cpp logs through one process-wide callback. Ours prints every message to stderr when `show(True)` was
called (the CLI's --log-llama or -vv) and otherwise prints nothing, but keeps the error messages since the
last `clear_errors()`, so a failed load or decode can say in one sentence what llama.cpp reported.
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading

import llama_cpp

_LEVEL_ERROR = 4  # enum ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last)
_LEVEL_CONT = 5
# a function name before a message: "llama_model_load: ", "check_tensor_dims: "
_FUNCTION_PREFIX = re.compile(r"\b[A-Za-z0-9]*_[A-Za-z0-9_]*: ")
_MAX_ERRORS = 8  # error messages kept between clear_errors() calls

_lock = threading.Lock()
_shown = False
_errors: list[str] = []
_last_level = 0


def _on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    message = text.decode("utf-8", errors="replace")
    if _shown:
        print(message, end="", file=sys.stderr, flush=True)
    with _lock:
        if level == _LEVEL_CONT and _last_level == _LEVEL_ERROR and _errors:
            _errors[-1] += message
        elif level == _LEVEL_ERROR and len(_errors) < _MAX_ERRORS:
            _errors.append(message)
        if level != _LEVEL_CONT:
            _last_level = level


_callback = llama_cpp.llama_log_callback(_on_log)  # kept referenced: llama.cpp holds only the C pointer
llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def show(enabled: bool) -> None:
    """Print llama.cpp's log to stderr from now on (True), or keep it silent (False, the default)."""
    global _shown
    _shown = enabled


def clear_errors() -> None:
    """Forget the error messages seen so far (call before the llama.cpp call whose failure you explain)."""
    with _lock:
        _errors.clear()


def last_error() -> str | None:
    """llama.cpp's first error message since clear_errors(), on one line without its function names."""
    with _lock:
        if not _errors:
            return None
        first = _errors[0]
    return " ".join(_FUNCTION_PREFIX.sub("", first).split())


def explain(sentence: str) -> str:
    """`sentence` with llama.cpp's error, if it logged one, in parentheses after its first clause."""
    error = last_error()
    if error is None:
        return sentence
    head, sep, tail = sentence.partition("; ")
    return f"{head} ({error.rstrip('.')}){sep}{tail}"
