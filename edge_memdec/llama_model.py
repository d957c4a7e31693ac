"""One GGUF model and its llama.cpp context, driven directly through llama.cpp's C API.

We own the `llama_batch` and read logits as zero-copy numpy views over llama.cpp's output buffer, so a decode
step allocates nothing vocab-sized in Python. Every GGUF is validated by our own parser before llama.cpp
opens it (a hostile or truncated file must give a one-sentence error, not a crash).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from edge_memdec import llama_log
from edge_memdec.errors import UserError
from edge_memdec.gguf_file import GGUFInfo, read_gguf
from edge_memdec.lora_file import LoraInfo, check_lora, lora_spec, read_lora
from edge_memdec.threadpool import CpuThreadPool

LoraSpecs = str | Path | Sequence[str | Path | tuple[str | Path, float]]  # one adapter or several
MAX_PARALLEL = 256  # most sequences in one context: llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h)
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def default_threads() -> int:
    """Threads per context: all physical-ish cores, as llama.cpp's CLI tools default to."""
    return max(1, os.cpu_count() or 1)


def lora_adapters(base: GGUFInfo, loras: LoraSpecs) -> list[tuple[LoraInfo, float]]:
    """Each adapter (see `lora_spec`) read and checked to fit `base`, with its scale."""
    adapters = []
    for path, scale in map(lora_spec, [loras] if isinstance(loras, str | Path) else loras):
        info = read_lora(path)
        check_lora(base, info)
        adapters.append((info, scale))
    return adapters


@dataclass
class ModelOptions:
    """How to open a GGUF in llama.cpp."""

    n_ctx: int = 2048  # context length in tokens (KV cells) of each sequence; 0 = the model's training context
    n_parallel: int = 1  # sequences decoded together (the server's --parallel); each has its own n_ctx cells
    n_batch: int = 512  # most tokens given to one llama_decode call
    n_ubatch: int | None = None  # tokens llama.cpp computes at once inside a call (llama.cpp's -ub); None = n_batch
    n_threads: int | None = None  # CPU threads for one-token decode steps; None = default_threads()
    n_threads_batch: int | None = None  # CPU threads for prompt batches; None = n_threads
    n_gpu_layers: int = 0  # layers offloaded to a GPU (-1 = all); ignored by a CPU-only build
    f32_kv: bool = False  # f32 KV cache (exact, for fidelity tests) instead of llama.cpp's default f16
    # None: llama.cpp decides (on for CPU): ~10% faster decode here, legal test PPL +0.13%; False for exact logits.
    # With n_parallel > 1 None means off: CPU flash attention picks its kernel by a micro-batch's rows and KV
    # cells, so a sequence's logits would depend on what it is batched with (batch.py)
    flash_attn: bool | None = None
    cpu_threadpool: bool = True  # one persistent ggml thread pool per model pair (False: a pool per decode call)
    log_llama: bool = False  # print llama.cpp's own log (loader, context) to stderr; errors reach ours anyway
    # LoRA adapters on this model: GGUF adapter paths, (path, scale) pairs or `--lora`'s "FILE[:SCALE]" strings
    lora: LoraSpecs = ()


# llama.cpp's own default, kept at import: the tests point llama-cpp-python's `llama_model_default_params` at
# `model_params` (so their reference `Llama` objects load as ours do), which must not then call itself.
_default_model_params = llama_cpp.llama_model_default_params


@functools.cache
def cpu_has_amx() -> bool:
    """Whether llama.cpp's CPU backend was built for, and runs on, a CPU with AMX tile instructions."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def model_params() -> llama_cpp.llama_model_params:
    """llama.cpp's default model parameters, less its extra CPU weight buffers where the CPU has AMX: there
    llama.cpp repacks Q4/Q8 weights for its AMX matrix kernel, which crashes the first decode on some such CPUs
    (virtualized Xeons here; llama.cpp issue 20824), so weights stay in plain CPU buffers."""
    params = _default_model_params()
    if cpu_has_amx():
        params.use_extra_bufts = False
    return params


def context_params(options: ModelOptions, name: str, n_ctx_train: int) -> llama_cpp.llama_context_params:
    """llama.cpp's context parameters for `options` (n_ctx cells for each of n_parallel sequences), or one
    sentence for an option the model `name`, trained on n_ctx_train tokens, cannot take."""
    n_ctx = options.n_ctx or n_ctx_train
    if n_ctx > n_ctx_train:
        raise UserError(
            f"context size {n_ctx} is larger than {name}'s training context {n_ctx_train}; "
            f"pass -c {n_ctx_train} or less"
        )
    if not 1 <= options.n_parallel <= MAX_PARALLEL:
        raise UserError(f"--parallel must be from 1 to {MAX_PARALLEL} sequences, got {options.n_parallel}")
    if options.n_ubatch is not None and options.n_ubatch < 1:
        raise UserError(f"-ub/--ubatch-size must be at least 1, got {options.n_ubatch}")
    n_threads = options.n_threads or default_threads()
    cparams = llama_cpp.llama_context_default_params()
    # llama.cpp splits n_ctx evenly among the sequences' streams (rounding each up to 256 cells)
    cparams.n_ctx = n_ctx * options.n_parallel
    cparams.n_batch = min(options.n_batch, cparams.n_ctx)
    cparams.n_ubatch = min(options.n_ubatch or options.n_batch, cparams.n_batch)
    cparams.n_seq_max = options.n_parallel
    cparams.kv_unified = False
    cparams.n_threads = n_threads
    cparams.n_threads_batch = options.n_threads_batch or n_threads
    cparams.no_perf = True
    cparams.embeddings = False
    flash_attn = options.flash_attn
    if flash_attn is None and options.n_parallel > 1:
        flash_attn = False
    if flash_attn is not None:
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
    if options.f32_kv:
        cparams.type_k = llama_cpp.GGML_TYPE_F32
        cparams.type_v = llama_cpp.GGML_TYPE_F32
    return cparams


class LlamaModel:
    """A GGUF model with one llama.cpp context and a batch we fill ourselves.

    The context holds `n_parallel` sequences (ids 0..n_parallel-1), each in its own KV stream of `n_ctx` cells
    (llama.cpp's `kv_unified = false`: a sequence never waits for, or evicts, another's cells); `eval`,
    `rewind` and `tokens` are sequence 0's, what chat and the Python API use. `seq_tokens[s]` lists the tokens
    sequence s holds, so a caller can reuse a common prefix; `n_past` counts sequence 0's.
    """

    def __init__(
        self,
        path: str | Path,
        options: ModelOptions | None = None,
        info: GGUFInfo | None = None,
        eval_callback=None,
        eval_callback_data: ctypes.c_void_p | None = None,
    ):
        """`eval_callback`: a `ggml_backend_sched_eval_callback` the context calls for every graph tensor (the
        shared trunk's capture of a hidden state, trunk.py), called with `eval_callback_data`; the caller keeps
        both alive while the context lives."""
        options = options or ModelOptions()
        self.path = Path(path)
        self.info = info if info is not None else read_gguf(self.path)
        self.options = options
        self.loras = lora_adapters(self.info, options.lora)  # checked before llama.cpp opens anything
        llama_log.show(options.log_llama)
        _init_backend()

        mparams = model_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        llama_log.clear_errors()
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise UserError(
                llama_log.explain(
                    f"llama.cpp could not load {self.path}; check that it is a complete GGUF model file"
                )
            )
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(self._model)

        cparams = context_params(options, self.path.name, self.n_ctx_train)
        self._eval_callback = eval_callback
        if eval_callback is not None:
            cparams.cb_eval = eval_callback
            cparams.cb_eval_user_data = eval_callback_data
        llama_log.clear_errors()
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            self._model = None
            raise UserError(
                llama_log.explain(
                    f"llama.cpp could not create a context for {self.path}; try a smaller -c/--ctx-size"
                )
            )
        self._apply_loras()
        self.n_ctx: int = llama_cpp.llama_n_ctx_seq(self._ctx)  # cells of each sequence
        self.n_parallel: int = llama_cpp.llama_n_seq_max(self._ctx)
        self.n_batch: int = cparams.n_batch
        self.n_ubatch: int = cparams.n_ubatch
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._embd_batch = None  # made by the first eval_rows
        self.n_embd: int = llama_cpp.llama_model_n_embd(self._model)
        self.bos: int = llama_cpp.llama_vocab_bos(self._vocab)
        self.eos: int = llama_cpp.llama_vocab_eos(self._vocab)
        self.add_bos: bool = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self.seq_tokens: list[list[int]] = [[] for _ in range(self.n_parallel)]
        self._piece_buf = ctypes.create_string_buffer(256)

    def _apply_loras(self) -> None:
        """Load the checked adapters into llama.cpp and set them on the context (freed with the model)."""
        if not self.loras:
            return
        handles = (llama_cpp.llama_adapter_lora_p_ctypes * len(self.loras))()
        scales = (ctypes.c_float * len(self.loras))()
        for i, (lora, scale) in enumerate(self.loras):
            handle = llama_cpp.llama_adapter_lora_init(self._model, str(lora.path).encode())
            if not handle:
                self.close()
                raise UserError(f"llama.cpp could not load the LoRA adapter {lora.path}; re-export it")
            handles[i], scales[i] = handle, scale
        if llama_cpp.llama_set_adapters_lora(self._ctx, handles, len(self.loras), scales) != 0:
            self.close()
            raise UserError(f"llama.cpp could not apply the LoRA adapters to {self.path.name}")

    @property
    def tokens(self) -> list[int]:
        """The tokens sequence 0 holds."""
        return self.seq_tokens[0]

    @property
    def n_past(self) -> int:
        return len(self.seq_tokens[0])

    # ---- vocabulary ----

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`; `add_bos=None` follows the model's own add-BOS setting."""
        data = text.encode("utf-8")
        add = self.add_bos if add_bos is None else add_bos
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add, special)
        if n < 0:
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap, add, special)
        return list(buf[:n])

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes one token stands for (control tokens render as b"" unless `special`)."""
        n = llama_cpp.llama_token_to_piece(
            self._vocab, token, self._piece_buf, len(self._piece_buf), 0, special
        )
        if n < 0:
            self._piece_buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece_buf, -n, 0, special)
        return self._piece_buf.raw[:n]

    def detokenize(self, tokens: Sequence[int], special: bool = True) -> bytes:
        """The bytes of `tokens` joined as llama.cpp joins them (control tokens as their text when `special`).
        Safe beside a running decode: it uses a buffer of its own, unlike `piece`."""
        ids = (llama_cpp.llama_token * max(1, len(tokens)))(*tokens)
        cap = 8 * len(tokens) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = llama_cpp.llama_detokenize(self._vocab, ids, len(tokens), buf, cap, False, special)
            if n >= 0:
                return buf.raw[:n]
            cap = -n
        raise RuntimeError(f"llama_detokenize wanted {cap} bytes twice")

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        """End of generation: EOS, EOT and the other end tokens llama.cpp knows for this vocabulary."""
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @functools.cached_property
    def eog_ids(self) -> np.ndarray:
        """Ids of every end-of-generation token (int64), for masking them out."""
        return np.array([t for t in range(self.n_vocab) if self.is_eog(t)], np.int64)

    @functools.cached_property
    def special_ids(self) -> np.ndarray:
        """Ids of the control and end-of-generation tokens (chat template markers, EOS, ...), sorted int64."""
        ids = [
            t
            for t in range(self.n_vocab)
            if llama_cpp.llama_vocab_is_control(self._vocab, t) or llama_cpp.llama_vocab_is_eog(self._vocab, t)
        ]
        return np.array(ids, np.int64)

    def metadata(self, key: str, default: object = None) -> object:
        return self.info.get(key, default)

    # ---- evaluation ----

    def rewind(self, n_keep: int, seq: int = 0) -> None:
        """Drop sequence `seq`'s cached tokens from position `n_keep` on (0 frees all its cells)."""
        cached = self.seq_tokens[seq]
        if n_keep >= len(cached):
            return
        if n_keep <= 0 and self.n_parallel == 1:
            llama_cpp.llama_memory_clear(self._memory, True)
        elif not llama_cpp.llama_memory_seq_rm(self._memory, seq, max(n_keep, 0), -1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)  # a whole sequence always goes
            n_keep = 0
        del cached[max(n_keep, 0) :]

    def clear(self, seq: int) -> None:
        """Free every cell of sequence `seq`, whatever our record of it says (after a failed llama_decode)."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
        self.seq_tokens[seq].clear()

    def cells(self, seq: int) -> int:
        """KV cells sequence `seq` holds in llama.cpp's cache (its largest position + 1; 0 when empty)."""
        return llama_cpp.llama_memory_seq_pos_max(self._memory, seq) + 1

    def eval(self, tokens: Sequence[int], logits: Sequence[bool] | None = None) -> int:
        """Append `tokens` to the cache (positions n_past...), asking logits only for the flagged rows.

        `logits` defaults to the last token only. Returns the number of rows with logits, readable with
        `logits_rows()` (all of them, in order) or `last_logits()`. Tokens beyond n_batch go in several calls;
        only the final call's rows are readable afterwards, so flag rows in the last n_batch tokens only.
        """
        return self._decode(tokens, logits, None)

    def eval_rows(
        self, rows: np.ndarray, tokens: Sequence[int], logits: Sequence[bool] | None = None
    ) -> int:
        """As `eval`, but the model's input is `rows` (float32 [len(tokens), n_embd], e.g. another model's hidden
        state) instead of the token embeddings; `tokens` only keeps the cache's token list in step."""
        if rows.shape != (len(tokens), self.n_embd):
            raise ValueError(f"rows of shape {rows.shape} for {len(tokens)} tokens of width {self.n_embd}")
        return self._decode(tokens, logits, self._rows_input(rows))

    def _rows_input(self, rows: np.ndarray) -> np.ndarray:
        """`rows` as the float32 C array an embedding batch copies from (the batch made on first use)."""
        if self._embd_batch is None:
            self._embd_batch = llama_cpp.llama_batch_init(self.n_batch, self.n_embd, 1)
        return np.ascontiguousarray(rows, dtype=np.float32)

    def eval_seqs(
        self,
        seqs: Sequence[int],
        tokens: Sequence[Sequence[int]],
        logits: Sequence[bool],
        rows: np.ndarray | None = None,
    ) -> list[int]:
        """One llama_decode for several sequences: `tokens[i]` appended to sequence `seqs[i]` (distinct ids), at
        its next positions, logits asked for its last token when `logits[i]`. With `rows` (float32 [all the
        tokens, n_embd], in the same order) the input is those rows instead of the token embeddings.

        Returns, per entry, the batch index of its last token, for `logits_at`. All the tokens together must
        fit in one batch (n_batch).
        """
        n = sum(len(t) for t in tokens)
        if n > self.n_batch:
            raise ValueError(f"{n} tokens do not fit in one batch of {self.n_batch}")
        if rows is not None and rows.shape != (n, self.n_embd):
            raise ValueError(f"rows of shape {rows.shape} for {n} tokens of width {self.n_embd}")
        for seq, chunk in zip(seqs, tokens, strict=True):
            if len(self.seq_tokens[seq]) + len(chunk) > self.n_ctx:
                raise UserError(
                    f"the context of sequence {seq} is full ({len(self.seq_tokens[seq]) + len(chunk)} tokens > "
                    f"{self.n_ctx}); pass a larger -c/--ctx-size"
                )
        b = self._batch
        if rows is not None:
            rows = self._rows_input(rows)
            b = self._embd_batch
            ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
        j, last = 0, []
        for seq, chunk, want in zip(seqs, tokens, logits, strict=True):
            start = len(self.seq_tokens[seq])
            for k, tok in enumerate(chunk):
                if rows is None:
                    b.token[j] = tok
                b.pos[j] = start + k
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq
                b.logits[j] = want and k == len(chunk) - 1
                j += 1
            last.append(j - 1)
        b.n_tokens = j
        self._run(b)
        for seq, chunk in zip(seqs, tokens, strict=True):
            self.seq_tokens[seq].extend(chunk)
        return last

    def _run(self, batch: llama_cpp.llama_batch) -> None:
        llama_log.clear_errors()
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(llama_log.explain(f"llama_decode failed with status {status} on {self.path.name}"))

    def _decode(self, tokens: Sequence[int], logits: Sequence[bool] | None, rows: np.ndarray | None) -> int:
        n = len(tokens)
        if n == 0:
            return 0
        if self.n_past + n > self.n_ctx:
            raise UserError(
                f"the context is full ({self.n_past + n} tokens > {self.n_ctx}); start a new session or pass a "
                "larger -c/--ctx-size"
            )
        flags = logits if logits is not None else [False] * (n - 1) + [True]
        n_out = 0
        for start in range(0, n, self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            b = self._batch if rows is None else self._embd_batch
            if rows is not None:
                part = rows[start : start + len(chunk)]
                ctypes.memmove(b.embd, part.ctypes.data, part.nbytes)
            n_out = 0
            for j, tok in enumerate(chunk):
                if rows is None:
                    b.token[j] = tok
                b.pos[j] = self.n_past + j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = 0
                want = bool(flags[start + j])
                b.logits[j] = want
                n_out += want
            b.n_tokens = len(chunk)
            self._run(b)
            self.tokens.extend(chunk)
        return n_out

    def last_logits(self) -> np.ndarray:
        """Logits of the last evaluated row that asked for them: float32 view [n_vocab], valid until next eval."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits_at(self, i: int) -> np.ndarray:
        """Logits of batch index `i` of the last eval_seqs: float32 view [n_vocab], valid until the next eval."""
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def logits_rows(self, n_rows: int) -> np.ndarray:
        """All rows that asked for logits in the last eval call: float32 view [n_rows, n_vocab]."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.n_vocab))

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        llama_cpp.llama_set_n_threads(self._ctx, n_threads, n_threads_batch or n_threads)

    @property
    def n_threads(self) -> int:
        """CPU threads of one-token steps."""
        return llama_cpp.llama_n_threads(self._ctx)

    @property
    def n_threads_batch(self) -> int:
        """CPU threads of prompt batches."""
        return llama_cpp.llama_n_threads_batch(self._ctx)

    def use_threadpool(self, pool: CpuThreadPool) -> None:
        """Run this context on `pool` (kept alive by this model until it is closed)."""
        pool.attach(self._ctx)
        self._threadpool = pool

    def leave_threadpool(self) -> None:
        """Compute without the pool again (llama.cpp's own threads for each graph)."""
        if getattr(self, "_threadpool", None) is not None:
            self._threadpool.detach(self._ctx)
            self._threadpool = None

    def close(self) -> None:
        """Free the context, batch and model (also done at garbage collection)."""
        if getattr(self, "_ctx", None):
            self.leave_threadpool()
            llama_cpp.llama_batch_free(self._batch)
            if self._embd_batch is not None:
                llama_cpp.llama_batch_free(self._embd_batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        self.close()
