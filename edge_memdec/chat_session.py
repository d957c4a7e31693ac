"""The `chat` command's session: one answer for -p, or an interactive conversation.

Ctrl-C during an answer stops that answer and keeps the session; Ctrl-C or Ctrl-D at the prompt ends it.
When the conversation no longer fits the context, the oldest turns are dropped (and the user is told).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.decode import Generation
from edge_memdec.errors import UserError

RESERVE_TOKENS = 16  # room kept free for at least the start of an answer


class ChatSession:
    def __init__(
        self,
        lm: MemoryDecoderLM,
        system: str | None = None,
        raw: bool = False,
        sampling: dict[str, Any] | None = None,
        verbose: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.lm = lm
        self.raw = raw
        self.sampling = sampling or {}
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []
        self.cancel = threading.Event()

    def reset(self) -> None:
        self.turns.clear()

    def _prompt_tokens(self, user_text: str) -> list[int]:
        if self.raw:
            if not user_text:
                raise UserError("the prompt is empty; give some text to continue")
            return self.lm.tokenize(user_text)
        self.turns.append({"role": "user", "content": user_text})
        limit = self.lm.pair.n_ctx - RESERVE_TOKENS
        while True:
            tokens = self.lm.chat_format.tokens(self.system + self.turns)
            if len(tokens) <= limit or len(self.turns) <= 1:
                break
            del self.turns[: 2 if len(self.turns) > 2 else 1]
            print("[context full: dropped the oldest turn of the conversation]", file=self.err)
        if len(tokens) > limit:
            self.turns.pop()
            raise UserError(
                f"this message needs {len(tokens)} tokens but the context holds {self.lm.pair.n_ctx}; "
                "shorten it or pass a larger -c/--ctx-size"
            )
        return tokens

    def answer(self, user_text: str) -> Generation:
        """Generate and print the reply to one user message (or one raw prompt)."""
        tokens = self._prompt_tokens(user_text)
        self.cancel.clear()
        generation = self.lm.start(tokens, cancel=self.cancel, **self.sampling)
        with _ctrl_c_sets(self.cancel):
            for piece in generation:
                self.out.write(piece)
                self.out.flush()
        self.out.write("\n")
        self.out.flush()
        if not self.raw:
            self.turns.append({"role": "assistant", "content": generation.text})
        if generation.finish_reason == "context":
            print("[context full: the answer was cut; older turns will be dropped next time]", file=self.err)
        elif generation.finish_reason == "cancelled":
            print("[stopped]", file=self.err)
        if self.verbose:
            print(
                f"[{len(generation.tokens)} tokens in {generation.decode_seconds:.2f} s, "
                f"{generation.tokens_per_second:.1f} tok/s; prompt {len(generation.prompt_tokens)} tokens "
                f"({generation.n_cached} cached) in {generation.prompt_seconds:.2f} s; "
                f"lambda {format(self.lm.lam, 'g') if self.lm.pair.memdec else 'none'}]",
                file=self.err,
            )
        return generation

    def interact(self, read: Callable[[str], str] = input) -> None:
        """Read messages until EOF, Ctrl-C at the prompt, or /exit; /reset forgets the conversation."""
        print("chat: Ctrl-C stops an answer, Ctrl-D or /exit ends, /reset starts over", file=self.err)
        while True:
            try:
                line = read("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=self.err)
                return
            text = line.strip()
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.reset()
                continue
            if not text:
                continue
            try:
                self.answer(line)
            except UserError as err:
                print(f"error: {err}", file=self.err)


class _ctrl_c_sets:
    """While active (main thread only), SIGINT sets `event` instead of raising KeyboardInterrupt."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, lambda *_: self.event.set())

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
