"""Perplexity of base, memory decoder and their mixtures, all from one pass over the text.

Two protocols:
- "paper": sliding windows of n_ctx tokens moved by `stride`; each window scores only the tokens no earlier
  window scored (the first window scores all of its tokens but the very first one). This is the protocol of the
  Memory Decoder paper and of Hugging Face's perplexity guide.
- "llama": exactly llama.cpp's `llama-perplexity`: non-overlapping chunks of n_ctx tokens, BOS written over
  each chunk's first token when the model adds one, the second half of each chunk scored.

Each model evaluates each window once; only the scored rows' logits are requested from llama.cpp. The kernel
(kernels.score_rows) gives each model's per-row negative log-likelihood of the target; every mixture of the
sweep is arithmetic on those (scoring.mixture_nll). With several memory decoders the sweep moves one decoder's
lambda (`sweep`, default the first) with the others fixed at the pair's lambdas.
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

from edge_memdec.defaults import (
    LAMBDA_MAX,
    LAMBDA_SUM_SLACK,
    PERPLEXITY_LAMBDAS,
    check_lambdas,
    flash_attn_name,
)
from edge_memdec.errors import UserError
from edge_memdec.files import write_json_atomic
from edge_memdec.pair import ModelPair
from edge_memdec.scoring import Accumulator, mixture_nll
from edge_memdec.windows import Window, llama_windows, paper_windows

PROTOCOLS = ("paper", "llama")


@dataclass
class Piece:
    """One llama_decode call's share of a window: its tokens, which rows want logits, and their targets."""

    tokens: list[int]
    flags: list[bool]
    targets: np.ndarray  # int32, one per flagged row, in order


def pieces(tokens: Sequence[int], window: Window, bos: int | None, n_batch: int) -> Iterator[Piece]:
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

    def restore(self, accumulators: Sequence[Accumulator]) -> None:
        """Load the saved sums into `accumulators` (none saved yet: left as they are)."""
        if self.sums and len(self.sums) != len(accumulators):
            raise UserError(
                f"{self.path} holds the progress of another perplexity run; remove it or pick another --state"
            )
        for acc, saved in zip(accumulators, self.sums, strict=False):
            acc.restore(saved)

    def save(self, next_window: int, accumulators: Sequence[Accumulator]) -> None:
        payload = {"job": self.job, "next_window": next_window, "sums": [a.state() for a in accumulators]}
        write_json_atomic(self.path, payload, indent=None)

    def done(self) -> None:
        self.path.unlink(missing_ok=True)


def job_key(
    pair: ModelPair, text: str, protocol: str, n_ctx: int, stride: int, lambdas: Sequence[float], sweep: int = 0
) -> dict:
    """What identifies a perplexity run for resuming: the inputs that change its numbers."""
    files = [{"name": m.path.name, "bytes": m.path.stat().st_size} for m in pair.models]
    several = {"lambdas": list(pair.lams), "sweep": pair.names[sweep]} if len(pair.memdecs) > 1 else {}
    return {
        **several,
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
        **({"lambda_gate": pair.gate.text()} if pair.gate else {}),
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
    lambdas: Sequence[float] | None = None,
    max_windows: int | None = None,
    progress: bool = True,
    on_window: Callable[[int, Accumulator], None] | None = None,
    state_path: str | Path | None = None,
    sweep: str | None = None,
) -> dict:
    """Score `text`; returns the JSON report (see the README): base, memdec, mixed per lambda, best lambda.

    `lambdas` (default 0, 0.1, ..., 1) sweep the lambda of the decoder named `sweep` (default the first), the
    others fixed at the pair's; with several decoders the default sweep stops where the lambdas would sum
    above 1. `on_window(i, acc)` is called after window i with the accumulator of the headline model (the
    mixture at the pair's lambdas, or the base alone), which is how `--protocol llama` prints its running
    `[i]x.xxxx,`. With `state_path`, progress is saved there after every window and a rerun continues from it.
    """
    stride = _check_options(pair, protocol, n_ctx, stride)
    j = _sweep_index(pair, sweep)
    lambdas, weights = _sweep_weights(pair, j, lambdas)
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

    # base, each memory decoder, one per row of `weights` (the sweep, then the pair's own lambdas)
    accumulators = [Accumulator() for _ in range(1 + len(pair.memdecs) + len(weights))]
    headline = accumulators[-1] if pair.memdecs else accumulators[0]  # the pair's own mixture: the [i] lines
    state = None
    if state_path is not None:
        state = ProgressState(Path(state_path), job_key(pair, text, protocol, n_ctx, stride, lambdas, j))
        state.restore(accumulators)
    bar = _progress(len(windows), progress)
    bar.update(state.next_window if state else 0)
    with pair.lock:
        for i, window in enumerate(windows):
            if state is not None and i < state.next_window:
                continue
            _score_window(pair, tokens, window, bos, weights, accumulators)
            if on_window is not None:
                on_window(i, headline)
            if state is not None:
                state.save(i + 1, accumulators)
            bar.update(1)
        pair.rewind(0)
    bar.close()
    if state is not None:
        state.done()
    report = _report(pair, protocol, n_ctx, stride, lambdas, j, accumulators)
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_options(pair: ModelPair, protocol: str, n_ctx: int, stride: int | None) -> int:
    """The stride (default n_ctx // 2), or a UserError for an option out of range."""
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    if n_ctx < 2 or n_ctx > pair.n_ctx:
        raise UserError(f"-c must be between 2 and the loaded context size {pair.n_ctx}, got {n_ctx}")
    stride = n_ctx // 2 if stride is None else stride
    if protocol == "paper" and not 1 <= stride <= n_ctx:
        raise UserError(f"--stride must be between 1 and -c ({n_ctx}), got {stride}")
    return stride


def _sweep_index(pair: ModelPair, sweep: str | None) -> int:
    """The position of the decoder whose lambda the sweep moves (0 without a name)."""
    if sweep is None:
        return 0
    if sweep not in pair.names:
        known = ", ".join(pair.names) if pair.names else "none: the base runs alone"
        raise UserError(f"--sweep names no memory decoder: {sweep!r}; the decoders are {known}")
    return pair.names.index(sweep)


def _sweep_weights(pair: ModelPair, j: int, lambdas: Sequence[float] | None) -> tuple[list[float], np.ndarray]:
    """The sweep of decoder j's lambda (checked: each with the others' sums to at most 1) and the weight rows
    float64 [len(sweep) + 1, n_decoders]: the sweep's, then the pair's own lambdas. No decoder: no rows."""
    if not pair.memdecs:
        return [], np.zeros((0, 0))
    fixed = list(pair.lams)
    rest = sum(fixed) - fixed[j]
    if lambdas is None:
        lambdas = [x for x in PERPLEXITY_LAMBDAS if x + rest <= LAMBDA_MAX + LAMBDA_SUM_SLACK]
    rows = [check_lambdas([*fixed[:j], x, *fixed[j + 1 :]], pair.names) for x in lambdas]
    return [row[j] for row in rows], np.array([*rows, fixed], np.float64).reshape(-1, len(fixed))


def window_rows(
    pair: ModelPair, tokens: Sequence[int], window: Window, bos: int | None
) -> Iterator[tuple[np.ndarray, list[np.ndarray], np.ndarray]]:
    """Evaluate one window from an empty cache, a piece at a time; yields each piece's scored rows: the base's
    logits [n, vocab], each memory decoder's logits [n, its vocab], and the target ids int32 [n]. A piece's
    rows are only valid until the next is evaluated (llama.cpp keeps the last call's logits)."""
    pair.rewind(0)
    for piece in pieces(tokens, window, bos, pair.n_batch):
        n_rows = pair.eval(piece.tokens, piece.flags)
        if n_rows:
            yield (
                pair.base.logits_rows(n_rows),
                [memdec.logits_rows(n_rows) for memdec in pair.memdecs],
                piece.targets,
            )


def _score_window(
    pair: ModelPair,
    tokens: Sequence[int],
    window: Window,
    bos: int | None,
    weights: np.ndarray,
    accumulators: list[Accumulator],
) -> None:
    """Evaluate one window from an empty cache and add its rows' NLLs to [base, *memdecs, *weight rows]."""
    from edge_memdec.kernels import score_rows  # numba: imported by the pair's warmup thread

    k = len(pair.memdecs)
    acc_base, acc_mems, acc_mix = accumulators[0], accumulators[1 : 1 + k], accumulators[1 + k :]
    for base_rows, mem_rows, targets in window_rows(pair, tokens, window, bos):
        scores = [score_rows(base_rows, rows, targets, _NO_LAMBDAS, pair.n_shared) for rows in mem_rows or [None]]
        nll_base = scores[0][0]  # every call's: all over the ids every model shares
        nll_mems = np.array([nll_mem for _, nll_mem, _ in scores[:k]]).reshape(k, len(nll_base))
        acc_base.add(nll_base)
        for acc, nll in zip(acc_mems, nll_mems, strict=True):
            acc.add(nll)
        if k:
            gate = pair.gate
            factors = None
            if gate is not None:
                from edge_memdec.kernels import gate_factors

                factors = gate_factors(base_rows, mem_rows[0], gate.slope, gate.offset, pair.n_shared, gate.base_weight)
            nll_mix = mixture_nll(nll_base, nll_mems, weights, factors)
            for c, acc in enumerate(acc_mix):
                acc.add(nll_mix[:, c])


_NO_LAMBDAS = np.zeros(0)


def _report(
    pair: ModelPair,
    protocol: str,
    n_ctx: int,
    stride: int,
    lambdas: list[float],
    j: int,
    accumulators: list[Accumulator],
) -> dict:
    """The JSON report from the accumulators [base, *memdecs, *sweep, the pair's lambdas]; seconds left at 0.

    "memdec", "lambda" and the "mixed" rows' "lambda" are the swept decoder's (decoder j); "memdecs" lists
    every decoder alone with its lambda, "lambdas" the pair's lambdas by name."""
    k = len(pair.memdecs)
    acc_base, acc_mems, acc_mix = accumulators[0], accumulators[1 : 1 + k], accumulators[1 + k :]
    mixed = [{"lambda": lam, **acc.report()} for lam, acc in zip(lambdas, acc_mix[:-1], strict=True)]
    return {
        "protocol": protocol,
        "n_ctx": n_ctx,
        "stride": stride if protocol == "paper" else n_ctx,
        "flash_attn": flash_attn_name(pair.base.options.flash_attn),
        "n_ubatch": pair.base.n_ubatch,
        "tokens_scored": acc_base.count,
        "base": acc_base.report(),
        "lora": [{"file": lora.path.name, "scale": scale} for lora, scale in pair.base.loras],
        "memdec": acc_mems[j].report() if k else None,
        "lambda": pair.lams[j] if k else None,
        "lambda_gate": pair.gate.text() if pair.gate else None,  # lambdas below are then each token's ceiling
        "selected": {"lambda": pair.lams[j], **acc_mix[-1].report()} if k else None,
        "mixed": mixed,
        "best_lambda": min(mixed, key=lambda row: row["ppl"])["lambda"] if mixed else None,
        "sweep": pair.names[j] if k else None,
        "lambdas": dict(zip(pair.names, pair.lams, strict=True)),
        "memdecs": [
            {"name": name, "file": memdec.path.name, "lambda": lam, **acc.report()}
            for name, memdec, lam, acc in zip(pair.names, pair.memdecs, pair.lams, acc_mems, strict=True)
        ],
        "seconds": 0.0,
    }


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="window", desc="perplexity", disable=not enabled, file=sys.stderr, leave=False
    )
