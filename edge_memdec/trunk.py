"""The shared trunk: a memory decoder whose lower blocks are its base's own runs only its upper blocks.

A decoder trained with `--frozen-blocks F` and exported with the base's bytes for its frozen tensors computes,
in blocks 0..F-1, exactly what the base computes there. Beside that base the pair need not compute them twice:
the base's context hands the residual stream entering block F to us (llama.cpp's scheduler callback, `cb_eval`,
on the tensor `l_out-{F-1}`), and a top-only copy of the decoder (its blocks F.. renumbered from 0, with its
embedding, final norm and head; written once into the cache folder) takes those rows as input embeddings
(`llama_batch.embd`). Same tensors, same kernels: the decoder's logits come out as the full decoder's.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from edge_memdec.gguf_file import GGUFInfo, read_gguf
from edge_memdec.llama_model import LlamaModel, ModelOptions
from edge_memdec.paths import cache_dir


def top_model_path(memdec: GGUFInfo, first: int) -> Path:
    """The decoder's blocks `first`.. as their own GGUF in the cache folder, written on first use."""
    from edge_memdec.convert.rewrite import write_top_blocks

    files = memdec.files
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = hashlib.sha256(f"{stamp}|{first}".encode()).hexdigest()[:16]
    path = cache_dir("trunk") / f"{files[0].stem}-top{first}-{key}.gguf"
    if not path.is_file():
        write_top_blocks(memdec, first, path)
    return path


class _Ggml:
    """The two ggml functions the capture calls (libggml-base, shipped inside llama-cpp-python)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        self.get_name = lib.ggml_get_name
        self.get_name.restype, self.get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.nbytes = lib.ggml_nbytes
        self.nbytes.restype, self.nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        self.tensor_get = lib.ggml_backend_tensor_get
        self.tensor_get.restype = None
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]


class HiddenCapture:
    """Collects the residual stream entering block `first` from every llama_decode of the base's context.

    `callback` goes into the base's context parameters; `take(n)` returns (and forgets) the rows of the last n
    tokens decoded, float32 [n, n_embd]."""

    def __init__(self, first: int, n_embd: int) -> None:
        self.first, self.n_embd = first, n_embd
        self._name = f"l_out-{first - 1}".encode()
        self._ggml = _Ggml()
        self._rows: list[np.ndarray] = []
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)

    def _on_tensor(self, tensor: int, ask: bool, user_data: int) -> bool:
        if self._ggml.get_name(tensor) != self._name:
            return False
        if not ask:  # computed: copy it out (ggml_backend_tensor_get reads a GPU buffer too)
            n_bytes = self._ggml.nbytes(tensor)
            rows = np.empty(n_bytes // 4, np.float32)
            self._ggml.tensor_get(tensor, rows.ctypes.data, 0, n_bytes)
            self._rows.append(rows.reshape(-1, self.n_embd))
        return True

    def clear(self) -> None:
        self._rows.clear()

    def take(self, n: int) -> np.ndarray:
        rows = np.concatenate(self._rows) if len(self._rows) != 1 else self._rows[0]
        self._rows.clear()
        if rows.shape[0] != n:
            raise RuntimeError(f"the base handed {rows.shape[0]} hidden rows for {n} tokens")
        return rows


class TopDecoder(LlamaModel):
    """The memory decoder run from its block `capture.first` on, on the rows the base's capture collects: what
    `ModelPair` and the decode loop use as `pair.memdec` (same methods as a LlamaModel of the whole decoder)."""

    def __init__(self, memdec: GGUFInfo, capture: HiddenCapture, options: ModelOptions) -> None:
        top = top_model_path(memdec, capture.first)
        super().__init__(top, options, info=read_gguf(top))
        self.path, self.info, self.capture = memdec.path, memdec, capture

    def eval(self, tokens: Sequence[int], logits: Sequence[bool] | None = None) -> int:
        """Append `tokens` (just decoded by the base) through the base's hidden rows for them."""
        return self.eval_rows(self.capture.take(len(tokens)), tokens, logits)
