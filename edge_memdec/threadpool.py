"""A persistent ggml CPU thread pool shared by the base model and the memory decoder.

Without one, llama.cpp starts and joins its worker threads for every `llama_decode` call; llama.cpp's own CLI
tools keep a pool whose workers poll briefly for the next graph instead. Measured here (bench/decode.py): one
pool cuts a SmolLM2 decode step by ~1 ms (~10%). The two models of a pair run one after the other, so they share
one pool and never compete for cores.

llama-cpp-python does not bind ggml's thread-pool calls, so they are bound here with ctypes from the same
`ggml-cpu` library llama.cpp loaded. A build without that library (or with a differently named CPU backend)
simply runs without a pool: `CpuThreadPool.create` returns None.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import llama_cpp

# struct ggml_threadpool_params is ~530 bytes (a 512-entry cpumask, then scalars); ggml fills it itself via
# ggml_threadpool_params_init, so we only reserve generous room and never depend on its layout.
_PARAMS_BYTES = 4096


@functools.cache
def _ggml_cpu() -> ctypes.CDLL | None:
    """The ggml CPU backend library next to llama-cpp-python's libllama, or None."""
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    names = {"win32": "ggml-cpu.dll", "darwin": "libggml-cpu.dylib"}
    path = lib_dir / names.get(sys.platform, "libggml-cpu.so")
    if not path.is_file():
        return None
    try:
        lib = ctypes.CDLL(str(path))
        lib.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.ggml_threadpool_params_init.restype = None
        lib.ggml_threadpool_new.argtypes = [ctypes.c_void_p]
        lib.ggml_threadpool_new.restype = ctypes.c_void_p
        lib.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
        lib.ggml_threadpool_free.restype = None
        attach = llama_cpp.llama_cpp._lib.llama_attach_threadpool
        attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        attach.restype = None
        detach = llama_cpp.llama_cpp._lib.llama_detach_threadpool
        detach.argtypes = [ctypes.c_void_p]
        detach.restype = None
    except (OSError, AttributeError):
        return None
    return lib


class CpuThreadPool:
    """`n_threads` ggml workers (llama.cpp's default polling); attach it to contexts that never run at once."""

    def __init__(self, lib: ctypes.CDLL, handle: int, n_threads: int) -> None:
        self._lib, self._handle, self.n_threads = lib, handle, n_threads

    @classmethod
    def create(cls, n_threads: int) -> CpuThreadPool | None:
        lib = _ggml_cpu()
        if lib is None:
            return None
        params = ctypes.create_string_buffer(_PARAMS_BYTES)
        lib.ggml_threadpool_params_init(params, n_threads)
        handle = lib.ggml_threadpool_new(params)
        return cls(lib, handle, n_threads) if handle else None

    def attach(self, ctx: int) -> None:
        """Run this llama context's graphs (single tokens and batches) on the pool."""
        llama_cpp.llama_cpp._lib.llama_attach_threadpool(ctx, self._handle, self._handle)

    @staticmethod
    def detach(ctx: int) -> None:
        llama_cpp.llama_cpp._lib.llama_detach_threadpool(ctx)

    def free(self) -> None:
        """Stop and join the workers; every context using the pool must be detached or freed first."""
        if self._handle:
            self._lib.ggml_threadpool_free(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.free()
