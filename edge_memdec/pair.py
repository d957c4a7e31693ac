"""A base model and its memory decoder, opened side by side with their KV caches kept in step."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from edge_memdec.defaults import (
    BASE_SPECIAL_TOKENS,
    DEFAULT_LAMBDA,
    LAMBDA_SUM_SLACK,
    check_lambdas,
    is_lambda,
    lambda_total,
)
from edge_memdec.errors import UserError
from edge_memdec.gguf_file import read_gguf
from edge_memdec.lambda_gate import FROM_GGUF, LambdaGate, resolve_gate
from edge_memdec.llama_model import LlamaModel, ModelOptions, default_threads
from edge_memdec.overlap import AUTO, OverlapChoice
from edge_memdec.pair_check import check_pair, shared_blocks
from edge_memdec.threadpool import CpuThreadPool
from edge_memdec.trunk import HiddenCapture, TopDecoder

T = TypeVar("T")

logger = logging.getLogger(__name__)

# a request's memory-decoder weights: None (the pair's), one number, one per decoder, or {decoder name: lambda}
SPLIT_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")  # llama.cpp's gguf-split part names: NAME-00001-of-00003
Lambdas = float | Sequence[float] | Mapping[str, float] | None


def recommended_lambda(memdec_path: Path, default: float = DEFAULT_LAMBDA) -> float:
    """The memory decoder's own `memdec.lambda`, or `default` when its GGUF carries none."""
    value = read_gguf(memdec_path).memdec.get("lambda")
    return default if value is None else float(value)


def _decoder_paths(memdec: str | Path | Sequence[str | Path] | None) -> list[Path]:
    if memdec is None:
        return []
    if isinstance(memdec, str | Path):
        return [Path(memdec)]
    return [Path(path) for path in memdec]


def decoder_names(paths: Sequence[Path]) -> tuple[str, ...]:
    """Each memory decoder's name, by which a server request sets its lambda: its file name without the
    extension (a split GGUF's without the part suffix), a repeated name numbered from its second use
    (legal, legal-2)."""
    names: list[str] = []
    for path in paths:
        stem = SPLIT_SUFFIX.sub("", path.stem)
        name, k = stem, 1
        while name in names:
            k += 1
            name = f"{stem}-{k}"
        names.append(name)
    return tuple(names)


class ModelPair:
    """Base model + optional memory decoders, evaluated on the same tokens.

    With several memory decoders the next-token distribution is p = sum_i lambda_i p_i + (1 - sum_i lambda_i)
    p_base (`lams`, one per decoder, in the order given; `names` are their file names without extension, a
    repeated one numbered). `lam` is their sum, the weight of the memory side as a whole. With a `gate`
    (lambda_gate.py; by default the one a single decoder's GGUF recommends) each token's weight is lam times a
    factor set by the two models' entropies, computed by the decode step and the perplexity scorer.

    One-token steps run the models one after the other with every thread, or at once in two threads with half
    the threads each (ctypes releases the GIL): `overlap` True / False fixes which, "auto" (the default) times
    both on the pair's first steps and keeps the faster (edge_memdec/overlap.py; the same logits either way).
    Prompt batches always run one model after the other; an `eval_seqs` call of one sequence and one token is
    such a step too (the batched server with one client), and batches of several sequences overlap only with
    `overlap=True`. `lock` serialises users of the pair: a
    llama.cpp context is not safe to drive from two threads at once.

    When a single decoder's lower blocks are the base's own (a decoder trained with `--frozen-blocks`, exported
    with the base's bytes for them), `shared_trunk` runs only its upper blocks, on the base's hidden state
    (trunk.py); `self.shared` is then the number of blocks computed once (0: the whole decoder runs; always 0
    with several decoders).

    With `options.n_parallel` N > 1 both contexts hold N sequences of `n_ctx` cells each, which `eval_seqs`
    decodes together (the server's batched decoding), shared trunk included (see TopDecoder.eval_seqs).
    """

    def __init__(
        self,
        base_path: str | Path,
        memdec_path: str | Path | Sequence[str | Path] | None = None,
        lam: Lambdas = None,
        options: ModelOptions | None = None,
        memdec_gpu_layers: int | None = None,
        overlap: bool | str = AUTO,
        skip_blas_probe: bool = False,
        shared_trunk: bool = True,
        base_special_tokens: bool = BASE_SPECIAL_TOKENS,
        lambda_gate: LambdaGate | str | None = FROM_GGUF,
    ) -> None:
        options = options or ModelOptions()
        # numba and the kernels' cached machine code load (~0.5 s, mostly Python) while llama.cpp maps the
        # weights (C, GIL released): measured, start-up of `chat -p hi -n 1` drops by about that much.
        warm = threading.Thread(target=_warm_kernels, args=(skip_blas_probe,), name="kernel-warmup", daemon=True)
        warm.start()
        base_info = read_gguf(base_path)
        memdec_infos = [read_gguf(path) for path in _decoder_paths(memdec_path)]
        for info in memdec_infos:
            check_pair(base_info, info)
        self.names = decoder_names([info.path for info in memdec_infos])
        own = [float(info.memdec.get("lambda", DEFAULT_LAMBDA)) for info in memdec_infos]
        if lam is None and sum(own) > 1.0 + LAMBDA_SUM_SLACK:
            raise UserError(
                f"the memory decoders' own lambdas ({self.describe(own)}) sum to {sum(own):g}, above 1; give the "
                "lambdas (--lambda) with one weight per decoder"
            )
        self.lams: tuple[float, ...] = self._resolve(lam, own)
        # the entropy gate on lambda (lambda_gate.py): lambda_t = lambda * sigmoid(...) per token; None = fixed
        self.gate = resolve_gate(lambda_gate, [info.memdec for info in memdec_infos])
        # A LoRA on the base changes its lower blocks, which the decoder then no longer shares.
        sharing = len(memdec_infos) == 1 and shared_trunk and not options.lora
        self.shared = shared_blocks(base_info, memdec_infos[0]) if sharing else 0
        if options.n_parallel > 1 and options.flash_attn:
            logger.warning(
                "flash attention with %d parallel sequences: an answer may then differ from the one a request "
                "gets alone (its CPU kernel depends on what is batched together); -fa auto keeps it off",
                options.n_parallel,
            )
        threads = options.n_threads or default_threads()
        # auto tries overlapping only on the CPU (two contexts driving one GPU at once: not measured, not risked)
        offloaded = options.n_gpu_layers != 0 or (memdec_gpu_layers or 0) != 0
        can_overlap = bool(memdec_infos) and threads > 1 and not self.shared and (overlap is True or not offloaded)
        self.overlap = OverlapChoice(overlap, can_overlap)
        self._threads, self._overlapped = threads, False
        base_opts = replace(options, n_threads=threads, n_threads_batch=options.n_threads_batch or threads)
        capture = None
        if self.shared:
            capture = HiddenCapture(self.shared, int(base_info.get(f"{base_info.arch}.embedding_length")))
        self._capture = capture
        self.base = LlamaModel(
            base_path,
            base_opts,
            info=base_info,
            eval_callback=capture.callback if capture else None,
            eval_callback_data=capture.user_data if capture else None,
        )
        if capture is not None:  # rows between two takes: one eval (<= n_ctx) or one eval_seqs (<= n_batch)
            capture.reserve(max(self.base.n_ctx, self.base.n_batch))
        self.memdecs: list[LlamaModel] = []
        gpu_layers = options.n_gpu_layers if memdec_gpu_layers is None else memdec_gpu_layers
        mem_opts = replace(base_opts, n_ctx=self.base.n_ctx, n_gpu_layers=gpu_layers, lora=())  # base's n_ctx
        for info in memdec_infos:
            if capture is not None:
                self.memdecs.append(TopDecoder(info, capture, mem_opts))
            else:
                self.memdecs.append(LlamaModel(info.path, mem_opts, info=info))
        self.base_special_tokens = base_special_tokens  # lambda 0 on control/EOS tokens unless a request says
        self.n_shared = min(model.n_vocab for model in self.models)  # ids every model has: the mixed ones
        self.lock = threading.RLock()
        may_overlap = self.overlap.chosen is not False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="memdec") if may_overlap else None
        # Sequential steps share one persistent ggml pool (two polling pools would fight over the cores).
        self._threadpool = None
        if options.cpu_threadpool and self.overlap.chosen is not True:
            self._threadpool = CpuThreadPool.create(max(threads, base_opts.n_threads_batch))
        if self._threadpool is not None:
            for model in self.models:
                model.use_threadpool(self._threadpool)
        self._run_overlapped(bool(self.overlap.chosen))
        warm.join()

    @property
    def memdec(self) -> LlamaModel | None:
        """The first memory decoder (None: the base runs alone)."""
        return self.memdecs[0] if self.memdecs else None

    @property
    def lam(self) -> float:
        """The memory decoders' weight together, sum_i lambda_i (0 without a decoder)."""
        return lambda_total(self.lams)

    def weights(self, lam: Lambdas) -> tuple[float, ...]:
        """Each decoder's lambda for a request's `lam`, checked (UserError: one sentence).

        None: the pair's own; a number: the one decoder's (with several, only 0 is accepted: all off); a
        sequence: one per decoder, in order; a mapping by decoder name: those named, the others keep the pair's.
        """
        return self._resolve(lam, self.lams)

    def describe(self, weights: Sequence[float] | None = None) -> str:
        """`weights` (default the pair's lambdas) for a message: "0.3" for one decoder, "legal 0.3, finance 0.2"
        for several."""
        weights = self.lams if weights is None else weights
        if len(weights) == 1:
            return format(weights[0], "g")
        return ", ".join(f"{name} {x:g}" for name, x in zip(self.names, weights, strict=True)) or "none"

    def _resolve(self, lam: Lambdas, own: Sequence[float]) -> tuple[float, ...]:
        """`lam` (see `weights`) as one checked lambda per decoder; `own`: those of None and of unnamed ones."""
        names = self.names
        if lam is None:
            return check_lambdas(own, names)
        if isinstance(lam, Mapping):
            unknown = [key for key in lam if key not in names]
            if unknown:
                known = ", ".join(names) if names else "none: the base runs alone"
                raise UserError(f"no memory decoder is named {unknown[0]!r}; the decoders are {known}")
            return check_lambdas([lam.get(name, x) for name, x in zip(names, own, strict=True)], names)
        if isinstance(lam, str) or not isinstance(lam, Sequence):
            if len(names) > 1 and is_lambda(lam) and lam == 0:
                return (0.0,) * len(names)
            if len(names) > 1:
                raise UserError(
                    f"one lambda ({lam}) for {len(names)} memory decoders ({', '.join(names)}); give one per "
                    "decoder, in order, or by name"
                )
            lam = [lam] if names else []
        return check_lambdas(list(lam), names)

    @property
    def models(self) -> list[LlamaModel]:
        """The base, then each memory decoder."""
        return [self.base, *self.memdecs]

    @property
    def n_ctx(self) -> int:
        """KV cells of each sequence: the most prompt + answer tokens one generation holds."""
        return self.base.n_ctx

    @property
    def n_parallel(self) -> int:
        """Sequences the pair can decode together (`eval_seqs`); 1: one generation at a time."""
        return self.base.n_parallel

    @property
    def n_batch(self) -> int:
        """Most tokens one `eval_seqs` call takes."""
        return min(model.n_batch for model in self.models)

    def eval(self, tokens: Sequence[int], logits: Sequence[bool] | None = None) -> int:
        """Append `tokens` to both caches; returns the number of logit rows each model now holds."""
        if not self.memdecs:
            return self.base.eval(tokens, logits)
        if self._capture is not None:
            self._capture.clear()  # rows of a failed earlier call must not feed this one
        if self._worker is None or len(tokens) != 1:
            n = self.base.eval(tokens, logits)  # prompt batches: always one model after the other
            self._eval_memdecs(tokens, logits)
            return n
        return self._one_token_step(lambda: self.base.eval(tokens, logits), self._eval_memdecs, tokens, logits)

    def _one_token_step(self, run_base: Callable[[], T], run_memdecs: Callable[..., None], *args: Any) -> T:
        """One one-token step: `run_base()` and `run_memdecs(*args)` in turns or at once, as the overlap choice
        says (timed while "auto" is still measuring); returns what `run_base` returned."""
        overlapped, timed = self.overlap.next_step()
        self._run_overlapped(overlapped)
        t0 = time.perf_counter()
        if overlapped:
            pending = self._worker.submit(run_memdecs, *args)
            try:
                out = run_base()
            finally:
                pending.result()
        else:
            out = run_base()
            run_memdecs(*args)
        if timed:
            self.overlap.record(overlapped, time.perf_counter() - t0)
        return out

    def _run_overlapped(self, overlapped: bool) -> None:
        """Set the one-token thread counts for steps run at once (the base `threads - threads // 2`, each decoder
        `threads // 2`, no shared pool: two models must not compute on one) or in turns (every thread, the pool)."""
        if overlapped == self._overlapped:
            return
        half = max(1, self._threads // 2)
        for i, model in enumerate(self.models):
            n = (self._threads - half if i == 0 else half) if overlapped else self._threads
            model.set_threads(n, model.n_threads_batch)
            if self._threadpool is not None:
                if overlapped:
                    model.leave_threadpool()
                else:
                    model.use_threadpool(self._threadpool)
        self._overlapped = overlapped

    def _eval_memdecs(self, tokens: Sequence[int], logits: Sequence[bool] | None) -> None:
        for memdec in self.memdecs:
            memdec.eval(tokens, logits)

    def eval_seqs(self, seqs: Sequence[int], tokens: Sequence[Sequence[int]], logits: Sequence[bool]) -> list[int]:
        """Append `tokens[i]` to sequence `seqs[i]` of both caches, one llama_decode per model; returns each
        entry's batch index for the models' `logits_at` (see LlamaModel.eval_seqs)."""
        if not self.memdecs:
            return self.base.eval_seqs(seqs, tokens, logits)
        if self._worker is not None and len(seqs) == 1 and len(tokens[0]) == 1:  # one row: as `eval`'s steps
            return self._one_token_step(
                lambda: self.base.eval_seqs(seqs, tokens, logits), self._eval_memdecs_seqs, seqs, tokens, logits
            )
        # batches of sequences overlap only when asked to (a one-sequence measurement says little about them)
        overlapped = self.overlap.setting is True and self._worker is not None and all(len(t) == 1 for t in tokens)
        self._run_overlapped(overlapped)
        if overlapped:
            pending = self._worker.submit(self._eval_memdecs_seqs, seqs, tokens, logits)
            try:
                last = self.base.eval_seqs(seqs, tokens, logits)
            finally:
                pending.result()
            return last
        last = self.base.eval_seqs(seqs, tokens, logits)
        self._eval_memdecs_seqs(seqs, tokens, logits)
        return last

    def _eval_memdecs_seqs(
        self, seqs: Sequence[int], tokens: Sequence[Sequence[int]], logits: Sequence[bool]
    ) -> None:
        for memdec in self.memdecs:
            memdec.eval_seqs(seqs, tokens, logits)

    def rewind(self, n_keep: int, seq: int = 0) -> None:
        for model in self.models:
            model.rewind(n_keep, seq)

    def clear(self, seq: int) -> None:
        """Free every cell of sequence `seq` in both caches."""
        for model in self.models:
            model.clear(seq)

    def common_prefix(self, tokens: Sequence[int], seq: int = 0, n_new: int = 1) -> int:
        """How many of sequence `seq`'s cached tokens (in both models) begin `tokens`, leaving at least `n_new`
        of them (or all) to evaluate."""
        cached = self.base.seq_tokens[seq]
        limit = min(len(cached), max(len(tokens) - n_new, 0))
        n = 0
        while n < limit and cached[n] == tokens[n]:
            n += 1
        if any(memdec.seq_tokens[seq][:n] != cached[:n] for memdec in self.memdecs):
            n = 0
        return n

    def reuse_prefix(self, tokens: Sequence[int], seq: int = 0, n_new: int = 1) -> int:
        """Keep sequence `seq`'s cached tokens shared with `tokens` (all but its last `n_new`), drop the rest;
        returns how many kept."""
        n = self.common_prefix(tokens, seq, n_new)
        self.rewind(n, seq)
        return n

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        for model in self.models:
            model.close()
        if self._threadpool is not None:
            self._threadpool.free()


def _warm_kernels(skip_blas_probe: bool) -> None:
    from edge_memdec.kernels import warmup

    warmup(skip_blas_probe)
