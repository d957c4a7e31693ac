"""The shared trunk's capture as a C callback: llama.cpp's scheduler asks it about every graph node of the base.

`ggml_backend_sched` calls its eval callback once per node with `ask=True` (~940 nodes per decoded token for
SmolLM2-135M) and once more, with `ask=False`, after computing a node it was told to watch. A Python callback
pays ~0.45 ms per token for the asking alone (8% of the 135M base's 5.3 ms decode step, 2 threads); this one is
machine code: it compares the node's name in place and copies the watched tensor's rows into a buffer.

Everything it needs travels in `state` (int64 [STATE_LEN], its address is the callback's user data): the
offset of `name` inside `struct ggml_tensor`, the name to watch, the two ggml functions it calls (their
addresses) and the row buffer. No Python object is touched, so no GIL is needed and the code caches like the
other kernels.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, types
from numba.extending import intrinsic

NAME_OFFSET, NAME_LEN, NBYTES_FN, TENSOR_GET_FN, BUFFER, CAPACITY, USED, OVERFLOW, CALLS = range(9)
NAME = 16  # state[NAME : NAME + NAME_LEN + 1]: the watched name's bytes and its terminating 0, one per slot
GGML_MAX_NAME = 64  # char name[GGML_MAX_NAME] in struct ggml_tensor
STATE_LEN = NAME + GGML_MAX_NAME


@intrinsic
def _pointer(typingctx, address):
    """An integer address as a void pointer."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(address), codegen


@intrinsic
def _call_nbytes(typingctx, function, tensor):
    """`size_t ggml_nbytes(const struct ggml_tensor *)` called through its address."""

    def codegen(context, builder, signature, args):
        fn_type = ir.FunctionType(ir.IntType(64), [ir.IntType(8).as_pointer()])
        fn = builder.inttoptr(args[0], fn_type.as_pointer())
        return builder.call(fn, [builder.inttoptr(args[1], ir.IntType(8).as_pointer())])

    return types.int64(function, tensor), codegen


@intrinsic
def _call_tensor_get(typingctx, function, tensor, data, offset, size):
    """`void ggml_backend_tensor_get(const struct ggml_tensor *, void * data, size_t offset, size_t size)`."""

    def codegen(context, builder, signature, args):
        ptr = ir.IntType(8).as_pointer()
        fn_type = ir.FunctionType(ir.VoidType(), [ptr, ptr, ir.IntType(64), ir.IntType(64)])
        fn = builder.inttoptr(args[0], fn_type.as_pointer())
        builder.call(fn, [builder.inttoptr(args[1], ptr), builder.inttoptr(args[2], ptr), args[3], args[4]])
        return context.get_dummy_value()

    return types.none(function, tensor, data, offset, size), codegen


@cfunc(types.boolean(types.int64, types.boolean, types.voidptr), cache=True, nopython=True)
def capture_callback(tensor, ask, user_data):
    """llama.cpp's `ggml_backend_sched_eval_callback`: True for the watched node; after it is computed, its
    bytes are appended to the buffer (or OVERFLOW is set when they do not fit, and nothing is written)."""
    state = carray(user_data, STATE_LEN, dtype=np.int64)
    name = carray(_pointer(tensor + state[NAME_OFFSET]), GGML_MAX_NAME, dtype=np.uint8)
    for i in range(state[NAME_LEN] + 1):
        if name[i] != state[NAME + i]:
            return False
    if ask:
        return True
    size = _call_nbytes(state[NBYTES_FN], tensor)
    used = state[USED]
    if used + size > state[CAPACITY]:
        state[OVERFLOW] = 1
        return True
    _call_tensor_get(state[TENSOR_GET_FN], tensor, state[BUFFER] + used, 0, size)
    state[USED] = used + size
    state[CALLS] += 1
    return True


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def ggml_library(lib_dir: Path) -> ctypes.CDLL:
    """libggml-base from llama-cpp-python's own lib folder, with the signatures the capture uses."""
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_init.restype, lib.ggml_init.argtypes = ctypes.c_void_p, [_InitParams]
    lib.ggml_new_tensor_1d.restype = ctypes.c_void_p
    lib.ggml_new_tensor_1d.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    lib.ggml_free.restype, lib.ggml_free.argtypes = None, [ctypes.c_void_p]
    return lib


def name_offset(lib: ctypes.CDLL) -> int:
    """Bytes from the start of `struct ggml_tensor` to its `name`, read off a tensor this ggml makes (so the
    struct's layout is never assumed)."""
    ctx = lib.ggml_init(_InitParams(1 << 16, None, True))
    if not ctx:
        raise RuntimeError("ggml_init failed")
    try:
        tensor = lib.ggml_new_tensor_1d(ctx, 0, 1)  # GGML_TYPE_F32
        return lib.ggml_get_name(tensor) - tensor
    finally:
        lib.ggml_free(ctx)


def capture_state(lib: ctypes.CDLL, name: bytes, buffer: np.ndarray) -> np.ndarray:
    """A fresh `state` watching tensor `name` and copying into `buffer` (any contiguous array; kept alive by
    the caller)."""
    if len(name) >= GGML_MAX_NAME:
        raise ValueError(f"a ggml tensor name has at most {GGML_MAX_NAME - 1} bytes")
    state = np.zeros(STATE_LEN, np.int64)
    state[NAME_OFFSET] = name_offset(lib)
    state[NAME_LEN] = len(name)
    state[NAME : NAME + len(name)] = np.frombuffer(name, np.uint8)
    state[NBYTES_FN] = ctypes.cast(lib.ggml_nbytes, ctypes.c_void_p).value
    state[TENSOR_GET_FN] = ctypes.cast(lib.ggml_backend_tensor_get, ctypes.c_void_p).value
    state[BUFFER] = buffer.ctypes.data
    state[CAPACITY] = buffer.nbytes
    return state
