"""Perplexity of base, memory decoder and their mixtures, all from one pass over the text.

Two protocols:
- "paper": sliding windows of n_ctx tokens moved by `stride`; each window scores only the tokens no earlier
  window scored (the first window scores all of its tokens but the very first one). This is the protocol of the
  Memory Decoder paper and of Hugging Face's perplexity guide.
- "llama": exactly llama.cpp's `llama-perplexity`: non-overlapping chunks of n_ctx tokens, BOS written over
  each chunk's first token when the model adds one, the second half of each chunk scored.

Each model evaluates each window once; only the scored rows' logits are requested from llama.cpp, and the
per-row negative log-likelihoods of every lambda come from one kernel call (kernels.score_rows).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_memdec.defaults import PERPLEXITY_LAMBDAS, check_lambda, flash_attn_name
from edge_memdec.errors import UserError
from edge_memdec.files import write_json_atomic
from edge_memdec.pair import ModelPair
from edge_memdec.scoring import Accumulator
from edge_memdec.windows import Window, llama_windows, paper_windows

PROTOCOLS = ("paper", "llama")


@dataclass
class Piece:
    """One llama_decode call's share of a window: its tokens, which rows want logits, and their targets."""

    tokens: list[int]
    flags: list[bool]
    targets: np.ndarray  # int32, one per flagged row, in order


def _pieces(tokens: Sequence[int], window: Window, bos: int | None, n_batch: int) -> Iterator[Piece]:
    """Split a window into calls of at most n_batch tokens (BOS over its first token when `bos` is given):
    llama.cpp keeps only the last call's logits, so each piece's rows are scored before the next is evaluated."""
    feed = list(tokens[window.begin : window.end])
    if bos is not None:
        feed[0] = bos
    rows = np.arange(window.first_new, window.stop) - window.begin
    targets = np.asarray(tokens[window.first_new + 1 : window.stop + 1], np.int32)
    flags = np.zeros(len(feed), bool)
    flags[rows] = True
    for lo in range(0, len(feed), n_batch):
        hi = min(lo + n_batch, len(feed))
        inside = (rows >= lo) & (rows < hi)
        yield Piece(feed[lo:hi], flags[lo:hi].tolist(), targets[inside])


class ProgressState:
    """Running sums saved after every window, so an interrupted run continues where it stopped.

    The file is tied to one job (text, protocol, window sizes, lambdas, both model files); a file of another
    job is an error rather than silently mixed in. It is removed when the run completes.
    """

    def __init__(self, path: Path, job: dict) -> None:
        self.path = path
        self.job = job
        self.next_window = 0
        self.sums: list[list[float]] = []
        if path.exists():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                same_job = saved["job"] == job
            except (OSError, ValueError, KeyError, TypeError):
                raise UserError(
                    f"{path} is not a perplexity progress file; remove it or pick another --state"
                ) from None
            if not same_job:
                raise UserError(
                    f"{path} holds the progress of another perplexity run; remove it or pick another --state"
                )
            self.next_window, self.sums = saved["next_window"], saved["sums"]

    def save(self, next_window: int, accumulators: Sequence[Accumulator]) -> None:
        payload = {"job": self.job, "next_window": next_window, "sums": [a.state() for a in accumulators]}
        write_json_atomic(self.path, payload, indent=None)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def job_key(
    pair: ModelPair, text: str, protocol: str, n_ctx: int, stride: int, lambdas: Sequence[float]
) -> dict:
    """What identifies a perplexity run for resuming: the inputs that change its numbers."""
    files = [{"name": m.path.name, "bytes": m.path.stat().st_size} for m in pair.models]
    return {
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "protocol": protocol,
        "n_ctx": n_ctx,
        "stride": stride,
        "lambdas": list(lambdas),
        "lambda": pair.lam,
        "models": files,
        "flash_attn": pair.base.options.flash_attn,
        "n_ubatch": pair.base.n_ubatch,
        **({"lora": [[lora.path.name, lora.n_bytes, scale] for lora, scale in pair.base.loras]} if pair.base.loras else {}),
    }


def check_text(text: str, n_tokens: int, protocol: str, n_ctx: int) -> None:
    need = 2 * n_ctx if protocol == "llama" else n_ctx + 1
    if not text.strip():
        raise UserError("the text is empty; give a file with text to score")
    if n_tokens < need:
        raise UserError(
            f"the text has {n_tokens} tokens but the {protocol} protocol with -c {n_ctx} needs at least {need}; "
            "give a longer text or a smaller -c"
        )


def perplexity(
    pair: ModelPair,
    text: str,
    protocol: str = "paper",
    n_ctx: int = 1024,
    stride: int | None = None,
    lambdas: Sequence[float] = PERPLEXITY_LAMBDAS,
    max_windows: int | None = None,
    progress: bool = True,
    on_window: Callable[[int, Accumulator], None] | None = None,
    state_path: str | Path | None = None,
) -> dict:
    """Score `text`; returns the JSON report (see the README): base, memdec, mixed per lambda, best lambda.

    `on_window(i, acc)` is called after window i with the accumulator of the headline model (the mixture at
    the pair's lambda, or the base alone), which is how `--protocol llama` prints its running `[i]x.xxxx,`.
    With `state_path`, progress is saved there after every window and a rerun continues from it.
    """
    stride, lambdas = _check_options(pair, protocol, n_ctx, stride, lambdas)
    t0 = time.perf_counter()
    base = pair.base
    tokens = base.tokenize(text, add_bos=None, special=False)
    check_text(text, len(tokens), protocol, n_ctx)
    bos = base.bos if protocol == "llama" and base.add_bos else None
    windows = llama_windows(len(tokens), n_ctx) if protocol == "llama" else paper_windows(len(tokens), n_ctx, stride)
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--chunks must be at least 1, got {max_windows}")
        windows = windows[:max_windows]

    has_memdec = pair.memdec is not None
    n_batch = min(model.n_batch for model in pair.models)
    # the pair's own lambda rides along as the last column: it drives the running [i] lines
    lam_arr = np.asarray([*lambdas, pair.lam] if has_memdec else [], np.float64)
    accumulators = [Accumulator() for _ in range(2 + len(lam_arr))]  # base, memdec, one per lambda column
    headline = accumulators[-1] if has_memdec else accumulators[0]
    state = None
    if state_path is not None:
        state = ProgressState(Path(state_path), job_key(pair, text, protocol, n_ctx, stride, lambdas))
        for acc, saved in zip(accumulators, state.sums, strict=True) if state.sums else ():  # none: a fresh run
            acc.restore(saved)
    bar = _progress(len(windows), progress)
    bar.update(state.next_window if state else 0)
    with pair.lock:
        for i, window in enumerate(windows):
            if state is not None and i < state.next_window:
                continue
            _score_window(pair, tokens, window, bos, n_batch, lam_arr, accumulators)
            if on_window is not None:
                on_window(i, headline)
            if state is not None:
                state.save(i + 1, accumulators)
            bar.update(1)
        pair.rewind(0)
    bar.close()
    if state is not None:
        state.done()
    report = _report(pair, protocol, n_ctx, stride, lambdas, accumulators)
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_options(
    pair: ModelPair, protocol: str, n_ctx: int, stride: int | None, lambdas: Sequence[float]
) -> tuple[int, list[float]]:
    """The stride (default n_ctx // 2) and the checked lambdas, or a UserError for an option out of range."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if n_ctx < 2 or n_ctx > pair.n_ctx:
        raise UserError(f"-c must be between 2 and the loaded context size {pair.n_ctx}, got {n_ctx}")
    stride = n_ctx // 2 if stride is None else stride
    if protocol == "paper" and not 1 <= stride <= n_ctx:
        raise UserError(f"--stride must be between 1 and -c ({n_ctx}), got {stride}")
    return stride, [check_lambda(x) for x in lambdas]


def _score_window(
    pair: ModelPair,
    tokens: Sequence[int],
    window: Window,
    bos: int | None,
    n_batch: int,
    lam_arr: np.ndarray,
    accumulators: list[Accumulator],
) -> None:
    """Evaluate one window from an empty cache and add its rows' NLLs to [base, memdec, *per lambda]."""
    from edge_memdec.kernels import score_rows  # numba: imported by the pair's warmup thread

    acc_base, acc_mem, *acc_mix = accumulators
    pair.rewind(0)
    for piece in _pieces(tokens, window, bos, n_batch):
        n_rows = pair.eval(piece.tokens, piece.flags)
        if n_rows == 0:
            continue
        base_rows = pair.base.logits_rows(n_rows)
        mem_rows = pair.memdec.logits_rows(n_rows) if pair.memdec is not None else None
        nll_base, nll_mem, nll_mix = score_rows(base_rows, mem_rows, piece.targets, lam_arr)
        acc_base.add(nll_base)
        if pair.memdec is not None:
            acc_mem.add(nll_mem)
            for j, acc in enumerate(acc_mix):
                acc.add(nll_mix[:, j])


def _report(
    pair: ModelPair, protocol: str, n_ctx: int, stride: int, lambdas: list[float], accumulators: list[Accumulator]
) -> dict:
    """The JSON report from the accumulators [base, memdec, *lambdas, the pair's lambda]; seconds left at 0."""
    acc_base, acc_mem, *acc_mix = accumulators
    has_memdec = pair.memdec is not None
    mixed = (
        [{"lambda": lam, **acc.report()} for lam, acc in zip(lambdas, acc_mix[:-1], strict=True)]
        if has_memdec
        else []
    )
    return {
        "protocol": protocol,
        "n_ctx": n_ctx,
        "stride": stride if protocol == "paper" else n_ctx,
        "flash_attn": flash_attn_name(pair.base.options.flash_attn),
        "n_ubatch": pair.base.n_ubatch,
        "tokens_scored": acc_base.count,
        "base": acc_base.report(),
        "lora": [{"file": lora.path.name, "scale": scale} for lora, scale in pair.base.loras],
        "memdec": acc_mem.report() if has_memdec else None,
        "lambda": pair.lam if has_memdec else None,
        "selected": {"lambda": pair.lam, **acc_mix[-1].report()} if has_memdec else None,
        "mixed": mixed,
        "best_lambda": min(mixed, key=lambda row: row["ppl"])["lambda"] if mixed else None,
        "seconds": 0.0,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="window", desc="perplexity", disable=not enabled, file=sys.stderr, leave=False
    )
