"""The one decode loop: chat, the server and the Python API all generate through `Generation`.

A `Generation` holds one answer's sampling state and its per-token `step` (logits in, token and text out); the
drivers only evaluate the models: `Generation.__iter__` runs one answer alone (chat, the API, a `--parallel 1`
server), `batch.BatchDecoder` runs several in one llama.cpp batch (the server). Both call the same `step`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from edge_memdec import defaults
from edge_memdec.detok import TextStream
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import request_gate
from edge_memdec.pair import Lambdas, ModelPair
from edge_memdec.trace import MAX_ALTERNATIVES, TokenTrace, TracedText, trace_step


@dataclass
class SamplingParams:
    """How the next token is chosen from the mixed distribution (llama.cpp's names and defaults)."""

    max_tokens: int = defaults.MAX_TOKENS  # the answer also ends on EOS/EOT, a stop string or a full context
    temperature: float = defaults.TEMPERATURE  # <= 0 means greedy
    top_k: int = defaults.TOP_K  # 0 = off
    top_p: float = defaults.TOP_P  # 1.0 = off
    min_p: float = defaults.MIN_P  # 0.0 = off
    seed: int | None = None  # None = a fresh random seed
    stop: Sequence[str] = field(default_factory=tuple)  # text that ends the answer (not included in it)
    # memory decoder weights for this request (ModelPair.weights): None = the pair's, a number (one decoder),
    # one per decoder in order, or {decoder name: lambda}
    lam: Lambdas = None
    ignore_eos: bool = False  # never end on EOS/EOT (their logits are masked), as llama.cpp's --ignore-eos
    # llama.cpp's penalties and logit bias, on the mixture's logits (kernels/adjust.py)
    repeat_penalty: float = defaults.REPEAT_PENALTY
    repeat_last_n: int = defaults.REPEAT_LAST_N  # 0 = off, -1 = the context size
    presence_penalty: float = defaults.PRESENCE_PENALTY
    frequency_penalty: float = defaults.FREQUENCY_PENALTY
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit (-100 all but bans it)
    # lambda 0 on the control and end-of-generation tokens (the chat template's markers, EOS): they keep the
    # base's probability, since a memory decoder trained on plain domain text never saw them; None = the pair's
    base_special_tokens: bool | None = None
    # the entropy gate on lambda for this request: "SLOPE,OFFSET[,BASE_SLOPE]", "off" (a fixed lambda); None = the pair's
    lambda_gate: str | None = None

    def check(self, n_vocab: int) -> None:
        if self.max_tokens < 1:
            raise UserError(f"max tokens must be at least 1, got {self.max_tokens}")
        if self.top_k < 0:
            raise UserError(f"top-k must be 0 (off) or more, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UserError(f"min-p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repeat_penalty < math.inf:
            raise UserError(f"the repeat penalty must be above 0 (1 = off), got {self.repeat_penalty}")
        if self.repeat_last_n < -1:
            raise UserError(f"repeat-last-n must be -1 (the context), 0 (off) or more, got {self.repeat_last_n}")
        for name, value in (("presence", self.presence_penalty), ("frequency", self.frequency_penalty)):
            if not math.isfinite(value):
                raise UserError(f"the {name} penalty must be a finite number, got {value}")
        for token, bias in (self.logit_bias or {}).items():
            if not 0 <= token < n_vocab:
                raise UserError(f"logit bias names token {token}, but token ids go from 0 to {n_vocab - 1}")
            if not math.isfinite(bias):
                raise UserError(f"the logit bias of token {token} must be a finite number, got {bias}")


class Generation:
    """One answer: iterate it for text pieces as they become valid UTF-8; stats are filled in as it runs.

    With `explain` (alternatives per token, 0..20) every piece is a `TracedText` carrying the `TokenTrace`s of
    the tokens it completes, and `traces` collects them all.

    `finish_reason` ends as "stop" (EOS/EOT or a stop string), "length" (max_tokens), "context" (the context
    is full) or "cancelled" (the `cancel` event was set, e.g. by Ctrl-C).
    """

    def __init__(
        self,
        pair: ModelPair,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        cancel: threading.Event | None = None,
        explain: int | None = None,
    ) -> None:
        if not prompt_tokens:
            raise UserError("the prompt is empty; give some text to continue")
        params.check(pair.base.n_vocab)
        self.weights = pair.weights(params.lam)  # each memory decoder's lambda
        self.lam = defaults.lambda_total(self.weights)  # theirs together: the memory side's weight
        self.gate = pair.gate if params.lambda_gate is None else request_gate(params.lambda_gate, len(pair.memdecs))
        if explain is not None and not 0 <= explain <= MAX_ALTERNATIVES:
            raise UserError(f"explain takes 0 to {MAX_ALTERNATIVES} alternatives per token, got {explain}")
        if len(prompt_tokens) >= pair.n_ctx:
            raise UserError(
                f"the prompt has {len(prompt_tokens)} tokens but the context holds {pair.n_ctx}; shorten it or pass "
                "a larger -c/--ctx-size"
            )
        self.pair = pair
        self.explain = explain  # None: no trace; else alternatives per token in each TokenTrace (0..20)
        self.traces: list[TokenTrace] = []  # one per generated token when explaining
        self._n_yielded = 0  # traces already handed out with a piece
        self.prompt_tokens = list(prompt_tokens)
        self.params = params
        self.cancel = cancel or threading.Event()
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.n_cached = 0  # prompt tokens found already in the KV cache
        self.prompt_seconds = 0.0
        self.decode_seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def __iter__(self) -> Iterator[str]:
        """The sequential driver (chat, the Python API): this generation alone in sequence 0 of the pair."""
        pair = self.pair
        with pair.lock:
            self.begin()
            self.n_cached = pair.reuse_prefix(self.prompt_tokens)
            pair.eval(self.prompt_tokens[self.n_cached :])
            self.prompt_evaluated()
            try:
                while True:
                    yield from self.step(pair.base.last_logits(), [m.last_logits() for m in pair.memdecs])
                    if self.finish_reason is not None:
                        break
                    pair.eval([self.tokens[-1]])
            finally:
                self.end()

    # ---- the per-sequence step, shared by the sequential driver above and the server's batch.py ----

    def begin(self) -> None:
        """Set up this answer's sampler (seeded draw, penalty history, stop strings, logit bias) and start its
        clock; a driver calls it once, just before the prompt is evaluated."""
        # numba: loaded by the warmup thread
        from edge_memdec.kernels import make_logit_bias, make_scratch

        pair, params = self.pair, self.params
        self._used = [i for i, w in enumerate(self.weights) if w > 0.0]  # decoders whose rows are read
        self._premix = np.empty(pair.n_shared, np.float32) if len(self._used) > 1 else None
        self._rng = np.random.default_rng(params.seed)
        self._scratch = make_scratch(pair.n_shared)
        self._stream = TextStream(params.stop)
        self._bias = make_logit_bias(params.logit_bias) if params.logit_bias else None
        base_special = params.base_special_tokens
        if base_special is None:
            base_special = pair.base_special_tokens
        self._special = _SpecialTokens(pair.base.special_ids, self._bias) if base_special and pair.memdecs else None
        self._last_n = pair.n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
        self._n_seen = len(self.prompt_tokens)  # the penalties count the last_n tokens of prompt + answer
        self._history = np.zeros(min(self._n_seen + params.max_tokens, pair.n_ctx + 1), np.int64)
        self._history[: self._n_seen] = self.prompt_tokens
        self._t_start = self._t_decode = time.perf_counter()

    def prompt_evaluated(self) -> None:
        """The driver has evaluated the prompt: the first logits are ready, and decoding time starts."""
        self._t_decode = time.perf_counter()
        self.prompt_seconds = self._t_decode - self._t_start

    def step(self, base_row: np.ndarray, mem_rows: Sequence[np.ndarray]) -> list[str]:
        """One token from the models' logits for the next position: sample it, turn it into text, decide
        whether the answer ends. Returns the text pieces to hand out (none, one, or a last one and the held-back
        tail); while `finish_reason` stays None the driver evaluates `self.tokens[-1]` and steps again.

        `base_row`, `mem_rows` (one per memory decoder, none without): float32 [n_vocab] logit rows (views over
        llama.cpp's buffers, masked in place with `ignore_eos`).
        """
        from edge_memdec.kernels import sample_token

        if self.cancel.is_set():
            return self.finish("cancelled")
        params, lam, special = self.params, self.lam, self._special
        base = self.pair.base
        if params.ignore_eos:
            for row in (base_row, *mem_rows):
                _mask(row, base.eog_ids)
        mem_row = self._memory_row(mem_rows)
        gate = self.gate
        if gate is not None and lam > 0.0 and mem_row is not None:
            from edge_memdec.kernels import gated_lambda

            lam = gated_lambda(base_row, mem_row, lam, gate.slope, gate.offset, gate.base_weight)
        n_seen = self._n_seen
        token = sample_token(
            base_row,
            mem_row,
            lam,
            params.temperature,
            params.top_k,
            params.top_p,
            params.min_p,
            self._rng.random(),
            self._scratch,
            self._history[max(0, n_seen - self._last_n) : n_seen],
            params.repeat_penalty,
            params.frequency_penalty,
            params.presence_penalty,
            self._bias if special is None or lam == 0.0 else special.bias(base_row, mem_row, lam),
        )
        self._history[n_seen] = token
        self._n_seen = n_seen + 1
        if base.is_eog(token):
            return self.finish("stop")
        self.tokens.append(token)
        if self.explain is not None:
            self.traces.append(trace_step(base, base_row, mem_row, lam, token, self.explain))
        pieces = []
        piece = self._stream.push(base.piece(token))
        if piece:
            pieces.append(self._traced(piece))
        if self._stream.stopped:
            return pieces + self.finish("stop")
        if len(self.tokens) >= params.max_tokens:
            return pieces + self.finish("length")
        if len(self.prompt_tokens) + len(self.tokens) - 1 >= self.pair.n_ctx:  # tokens in the cache
            return pieces + self.finish("context")
        return pieces

    def _memory_row(self, mem_rows: Sequence[np.ndarray]) -> np.ndarray | None:
        """The one row the mixing kernels take for the memory side, at weight `self.lam`: a single decoder's own
        logits, or the decoders' mixture as logits (kernels.mix_decoders, at their lambdas relative to their
        sum). Decoders at lambda 0 are not read; with all at 0 any row does (lam 0 never reads it)."""
        if not mem_rows:
            return None
        if len(self._used) < 2:
            return mem_rows[self._used[0] if self._used else 0]
        from edge_memdec.kernels import mix_decoders

        return mix_decoders([mem_rows[i] for i in self._used], [self.weights[i] for i in self._used], self._premix)

    def finish(self, reason: str) -> list[str]:
        """End the answer for `reason` ("stop", "length", "context", "cancelled"); returns the held-back tail
        as a last piece, if there is one."""
        self.finish_reason = reason
        tail = self._stream.flush()
        return [self._traced(tail)] if tail else []

    def end(self) -> None:
        """The driver is done with this answer (finished, failed or abandoned): fix its text and timing."""
        self.text = self._stream.text
        self.decode_seconds = time.perf_counter() - self._t_decode
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _traced(self, piece: str) -> str:
        """The piece, carrying the traces of the tokens since the last piece when explaining."""
        if self.explain is None:
            return piece
        tokens = tuple(self.traces[self._n_yielded :])
        self._n_yielded = len(self.traces)
        return TracedText(piece, tokens)

    def run(self) -> str:
        """Generate to the end; return the whole answer."""
        for _ in self:
            pass
        return self.text


class _SpecialTokens:
    """The logit bias that gives the special tokens the base's probability at each step, on top of the
    request's own logit bias."""

    def __init__(self, ids: np.ndarray, bias: tuple[np.ndarray, np.ndarray] | None) -> None:
        from edge_memdec.kernels import base_only_bias

        self._offsets = base_only_bias
        self.special = ids
        user_ids, user_values = bias if bias is not None else (ids[:0], np.zeros(0))
        self.ids = np.union1d(ids, user_ids)
        self.values = np.zeros(len(self.ids))
        self.values[np.searchsorted(self.ids, user_ids)] = user_values
        self.at = np.searchsorted(self.ids, ids)

    def bias(self, base_row: np.ndarray, mem_row: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
        values = self.values.copy()
        values[self.at] += self._offsets(base_row, mem_row, lam, self.special)
        return self.ids, values


MASKED_LOGIT = -1e30  # finite: exp() of it is 0 in every kernel, with no inf - inf NaNs


def _mask(row: np.ndarray, ids: np.ndarray) -> None:
    """Rule tokens out by writing into llama.cpp's logits buffer (it is rewritten by the next decode)."""
    row[ids[ids < len(row)]] = MASKED_LOGIT
