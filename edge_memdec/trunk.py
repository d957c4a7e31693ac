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
import os
import time
from collections.abc import Sequence
from pathlib import Path

import llama_cpp
import numpy as np

from edge_memdec.gguf_file import GGUFInfo, read_gguf
from edge_memdec.llama_model import LlamaModel, ModelOptions
from edge_memdec.paths import cache_dir

KEEP_TOPS = 4  # top-only GGUFs kept in the cache folder, most recently used (a pruned one is rebuilt in seconds)
IDLE_S = 600  # one unused for less than this (s) is never pruned: another process may be about to open it


def top_model_path(memdec: GGUFInfo, first: int) -> Path:
    """The decoder's blocks `first`.. as their own GGUF in the cache folder, written on first use.

    Its name carries a key of the decoder's files (path, size, mtime), so a rebuilt decoder gets a new one; the
    folder keeps the KEEP_TOPS most recently used and removes older ones, so it does not grow with every rebuild."""
    from edge_memdec.convert.rewrite import write_top_blocks

    files = memdec.files
    stamp = "|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = hashlib.sha256(f"{stamp}|{first}".encode()).hexdigest()[:16]
    path = cache_dir("trunk") / f"{files[0].stem}-top{first}-{key}.gguf"
    if path.is_file():
        os.utime(path)  # its mtime says when it was last used
    else:
        write_top_blocks(memdec, first, path)
        prune_tops(path.parent)  # the folder grows only here
    return path


def prune_tops(folder: Path) -> None:
    """Remove the top-only GGUFs in `folder` beyond the KEEP_TOPS most recently used, unless used in the last
    IDLE_S seconds. Best effort: one that cannot be removed (open elsewhere, on Windows) stays."""
    tops = []
    for entry in folder.glob("*-top*-*.gguf"):
        try:
            tops.append((entry.stat().st_mtime, entry))
        except OSError:
            continue
    tops.sort(reverse=True)
    now = time.time()
    for mtime, entry in tops[KEEP_TOPS:]:
        if now - mtime > IDLE_S:
            try:
                entry.unlink(missing_ok=True)
            except OSError:
                pass


class HiddenCapture:
    """Collects the residual stream entering block `first` from every llama_decode of the base's context.

    `callback` and `user_data` go into the base's context parameters (a numba C callback, kernels/capture.py,
    so llama.cpp's ~940 questions per decoded token cost no Python call); `reserve` sizes the row buffer before
    the first decode; `take(n)` returns (and forgets) the rows of the last n tokens decoded, float32 [n, n_embd]."""

    def __init__(self, first: int, n_embd: int) -> None:
        from edge_memdec.kernels import capture  # numba: imported only when a trunk is shared

        self.first, self.n_embd = first, n_embd
        self._kernel = capture
        self._rows = np.empty((0, n_embd), np.float32)
        lib = capture.ggml_library(Path(llama_cpp.__file__).parent / "lib")
        self._state = capture.capture_state(lib, f"l_out-{first - 1}".encode(), self._rows)
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(capture.capture_callback.address)
        self.user_data = ctypes.c_void_p(self._state.ctypes.data)

    def reserve(self, max_rows: int) -> None:
        """Room for `max_rows` rows between two takes (the most one eval or eval_seqs decodes); pending rows are
        dropped. Untouched pages of the buffer cost no memory."""
        k = self._kernel
        self._rows = np.empty((max_rows, self.n_embd), np.float32)
        self._state[k.BUFFER], self._state[k.CAPACITY] = self._rows.ctypes.data, self._rows.nbytes
        self._state[k.USED] = 0

    def clear(self) -> None:
        self._state[self._kernel.USED] = 0

    def take(self, n: int) -> np.ndarray:
        k = self._kernel
        if self._state[k.OVERFLOW]:
            raise RuntimeError(f"the base decoded more than {len(self._rows)} tokens between two takes")
        got = int(self._state[k.USED]) // (4 * self.n_embd)
        self._state[k.USED] = 0
        if got != n:
            raise RuntimeError(f"the base handed {got} hidden rows for {n} tokens")
        return self._rows[:n].copy()


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

    def eval_seqs(
        self,
        seqs: Sequence[int],
        tokens: Sequence[Sequence[int]],
        logits: Sequence[bool],
        rows: np.ndarray | None = None,
    ) -> list[int]:
        """As LlamaModel.eval_seqs, on the base's hidden rows for the same call.

        The capture holds the rows in llama.cpp's micro-batch order. That is the call's own order when the call
        is one sequence's piece, or one token per sequence (llama.cpp's equal split takes the sequences in the
        order they come); other shapes (the batched server never makes them) are refused."""
        if len(tokens) > 1 and any(len(t) != 1 for t in tokens):
            raise ValueError("a shared trunk decodes several sequences together only one token per sequence")
        if rows is None:
            rows = self.capture.take(sum(len(t) for t in tokens))
        return super().eval_seqs(seqs, tokens, logits, rows)
