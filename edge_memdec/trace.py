"""The per-token trace: how the base, the memory decoder and their mixture rated each generated token.

The decode loop fills one `TokenTrace` per token when asked (`explain`), from the same logit rows it samples
from, so a trace costs one extra kernel pass per token and nothing when off. Probabilities are those of the
models at temperature 1 over the shared ids, before logit bias, penalties and the sampling filters (what
llama-server reports by default); the mixture is p = lam * p_mem + (1 - lam) * p_base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MAX_ALTERNATIVES = 20  # most alternatives per token (OpenAI's top_logprobs range is 0..20)
DEFAULT_ALTERNATIVES = 3  # explain=True


def alternatives(explain: bool | int | None) -> int | None:
    """The decode loop's `explain` (alternatives per token, or None: off) from an API user's True/False/N."""
    if explain is None or explain is False:
        return None
    return DEFAULT_ALTERNATIVES if explain is True else int(explain)


@dataclass(frozen=True)
class Alternative:
    """One of the most probable tokens of a model at a step: id, its bytes and natural-log probability."""

    token: int
    piece: bytes
    logprob: float

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")

    @property
    def p(self) -> float:
        return math.exp(self.logprob)


@dataclass(frozen=True)
class TokenTrace:
    """One generated token under the three distributions (natural-log probabilities, ranks from 1).

    The memory decoder's fields are None when the pair has none; `top_*` hold the requested number of most
    probable tokens, best first (the first one is always known, `changed` compares them).
    """

    token: int
    piece: bytes
    lam: float
    logprob_base: float
    logprob_mem: float | None
    logprob_mix: float
    rank_base: int
    rank_mem: int | None
    rank_mix: int
    top_base: tuple[Alternative, ...]
    top_mem: tuple[Alternative, ...] | None
    top_mix: tuple[Alternative, ...]
    n_top: int  # alternatives asked for (top_* may hold one more: the argmax `changed` needs)

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", errors="replace")

    @property
    def p_base(self) -> float:
        return math.exp(self.logprob_base)

    @property
    def p_mem(self) -> float | None:
        return None if self.logprob_mem is None else math.exp(self.logprob_mem)

    @property
    def p_mix(self) -> float:
        return math.exp(self.logprob_mix)

    @property
    def shift(self) -> float:
        """p_mix - p_base: how much the memory decoder moved the chosen token's probability."""
        return self.p_mix - self.p_base

    @property
    def changed(self) -> bool:
        """Whether the memory decoder changed the most probable token."""
        return self.top_mix[0].token != self.top_base[0].token


class TracedText(str):
    """A piece of generated text (a str) that carries the traces of the tokens it completes.

    A piece may hold several tokens (a character split over tokens) or none (text held back for a stop
    string arrives with a later piece)."""

    tokens: tuple[TokenTrace, ...]

    def __new__(cls, text: str, tokens: tuple[TokenTrace, ...]) -> TracedText:
        piece = super().__new__(cls, text)
        piece.tokens = tokens
        return piece


class PieceSource(Protocol):
    """What trace_step needs of the base model: the bytes of a token id (LlamaModel.piece)."""

    def piece(self, token: int) -> bytes: ...


def trace_step(
    pieces: PieceSource, base_row: np.ndarray, mem_row: np.ndarray | None, lam: float, token: int, n_top: int
) -> TokenTrace:
    """The trace of `token` drawn from these logit rows (float32 [n_vocab] each; mem_row None: base alone)."""
    from edge_memdec.kernels import trace_token  # numba: loaded by the warmup thread

    n_top = min(max(n_top, 0), MAX_ALTERNATIVES)
    top_ids, top_logp, chosen_logp, chosen_rank = trace_token(base_row, mem_row, lam, token, n_top)

    def top(row: int) -> tuple[Alternative, ...]:
        return tuple(
            Alternative(int(i), pieces.piece(int(i)), float(lp)) for i, lp in zip(top_ids[row], top_logp[row], strict=True)
        )

    has_mem = mem_row is not None
    return TokenTrace(
        token=token,
        piece=pieces.piece(token),
        lam=lam if has_mem else 0.0,
        logprob_base=float(chosen_logp[0]),
        logprob_mem=float(chosen_logp[1]) if has_mem else None,
        logprob_mix=float(chosen_logp[2]),
        rank_base=int(chosen_rank[0]),
        rank_mem=int(chosen_rank[1]) if has_mem else None,
        rank_mix=int(chosen_rank[2]),
        top_base=top(0),
        top_mem=top(1) if has_mem else None,
        top_mix=top(2),
        n_top=n_top,
    )


def summary(traces: list[TokenTrace]) -> dict[str, float | int]:
    """Tokens traced, how many the memory decoder changed (its top token differs from the base's), and the
    mean and mean absolute shift p_mix - p_base of the chosen tokens."""
    shifts = [t.shift for t in traces]
    n = len(traces)
    return {
        "tokens": n,
        "changed": sum(t.changed for t in traces),
        "mean_shift": sum(shifts) / n if n else 0.0,
        "mean_abs_shift": sum(abs(s) for s in shifts) / n if n else 0.0,
    }
