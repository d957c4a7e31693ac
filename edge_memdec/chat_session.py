"""The `chat` command's session: one answer for -p, or an interactive conversation.

Ctrl-C during an answer stops that answer and keeps the session; Ctrl-C or Ctrl-D at the prompt ends it.
When the conversation no longer fits the context, the oldest turns are dropped (and the user is told).
Interactive lines starting with "/" are commands (COMMANDS; "//" sends a message that starts with "/").
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
from edge_memdec.explain_view import LEGEND, is_terminal, report, tint, use_colour
from edge_memdec.lambda_gate import request_gate
from edge_memdec.pair import Lambdas

RESERVE_TOKENS = 16  # room kept free for at least the start of an answer


class ChatSession:
    def __init__(
        self,
        lm: MemoryDecoderLM,
        system: str | None = None,
        raw: bool = False,
        sampling: dict[str, Any] | None = None,
        verbose: bool = False,
        explain: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ) -> None:
        self.lm = lm
        self.raw = raw
        self.sampling = dict(sampling or {})
        self.verbose = verbose
        self.explain = explain
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []
        self.cancel = threading.Event()
        self.lam: Lambdas = self.sampling.pop("lam", None)  # None: the pair's own lambdas
        self.memdec_on = True
        self.gate: str | None = None  # /gate: "SLOPE,OFFSET[,BASE_SLOPE]" or "off" for the next answers; None: the pair's

    def reset(self) -> None:
        self.turns.clear()

    @property
    def effective_lambda(self) -> tuple[float, ...] | None:
        """Each memory decoder's weight for the next answer (None when the pair has no decoder)."""
        if self.lm.pair.memdec is None:
            return None
        if not self.memdec_on:
            return (0.0,) * len(self.lm.pair.memdecs)
        return self.lm.pair.weights(self.lam)

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
        lam = self.effective_lambda
        sampling = self.sampling if lam is None else self.sampling | {"lam": lam}
        if self.gate is not None:
            sampling = sampling | {"lambda_gate": self.gate}
        coloured = self.explain and use_colour(self.out)
        generation = self.lm.start(tokens, cancel=self.cancel, explain=self.explain, **sampling)
        with _ctrl_c_sets(self.cancel):
            for piece in generation:
                self.out.write(tint(piece, piece.tokens) if coloured else piece)
                self.out.flush()
        self.out.write("\n")
        if self.explain:
            self.out.write("".join(line + "\n" for line in report(generation.traces, is_terminal(self.out))))
        self.out.flush()
        if not self.raw:
            self.turns.append({"role": "assistant", "content": generation.text})
        if generation.finish_reason == "context":
            print("[context full: the answer was cut; older turns will be dropped next time]", file=self.err)
        elif generation.finish_reason == "cancelled":
            print("[stopped]", file=self.err)
        if self.verbose:
            gate = f", gated {generation.gate.text()}" if generation.gate and lam and any(lam) else ""
            print(
                f"[{len(generation.tokens)} tokens in {generation.decode_seconds:.2f} s, "
                f"{generation.tokens_per_second:.1f} tok/s; prompt {len(generation.prompt_tokens)} tokens "
                f"({generation.n_cached} cached) in {generation.prompt_seconds:.2f} s; "
                f"lambda {'none' if lam is None else self.lm.pair.describe(lam)}{gate}]",
                file=self.err,
            )
        return generation

    def interact(self, read: Callable[[str], str] = input) -> None:
        """Read messages until EOF, Ctrl-C at the prompt, or /exit; other /commands change the session."""
        print("chat: Ctrl-C stops an answer, Ctrl-D or /exit ends, /help lists the commands", file=self.err)
        if self.explain and use_colour(self.out):
            print(LEGEND, file=self.err)
        while True:
            try:
                line = read("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=self.err)
                return
            text = line.strip()
            if not text:
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text) == "exit":
                        return
                    continue
                self.answer(line.replace("//", "/", 1) if text.startswith("//") else line)
            except UserError as err:
                print(f"error: {err}", file=self.err)

    def command(self, text: str) -> str | None:
        """Run one /command line; "exit" when the session should end. A bad one raises UserError."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return "exit"
        if name not in COMMANDS:
            raise UserError(f"unknown command {name}; /help lists the commands")
        if name == "/help":
            print("\n".join(f"  {usage:<18} {what}" for usage, what in COMMANDS.values()), file=self.err)
        elif name == "/reset":
            self.reset()
            print("[conversation cleared]", file=self.err)
        elif name == "/system":
            self.system = [{"role": "system", "content": arg}] if arg else []
            print(f"[system message {'set' if arg else 'removed'}]", file=self.err)
        elif name == "/explain":
            self.explain = _on_off(name, arg)
            print(f"[explain {'on' if self.explain else 'off'}]", file=self.err)
            if self.explain and use_colour(self.out):
                print(LEGEND, file=self.err)
        else:
            self._memdec_command(name, arg)
        return None

    def _memdec_command(self, name: str, arg: str) -> None:
        """/lambda X, /memdec on|off and /gate SLOPE,OFFSET[,BASE_SLOPE]|off."""
        if self.lm.pair.memdec is None:
            raise UserError(f"{name} needs a memory decoder; this chat runs the base model alone")
        if name == "/gate":
            gate = request_gate(arg, len(self.lm.pair.memdecs))
            self.gate = gate.text() if gate else "off"
            print(f"[lambda gate {self.gate}]", file=self.err)
            return
        if name == "/memdec":
            self.memdec_on = _on_off(name, arg)
        else:
            try:
                values = [float(x) for x in arg.split(",")]
            except ValueError:
                raise UserError(
                    f"/lambda takes a number between 0 and 1 (several decoders: one each, 0.3,0.2), got {arg!r}"
                ) from None
            self.lam = self.lm.pair.weights(values if len(values) > 1 else values[0])
            self.memdec_on = True
        if self.memdec_on:
            print(f"[memory decoder on, lambda {self.lm.pair.describe(self.effective_lambda)}]", file=self.err)
        else:
            print("[memory decoder off: the base model answers alone (lambda 0)]", file=self.err)


COMMANDS = {
    "/lambda": ("/lambda X", "the memory decoder's weight (0 to 1) from the next answer on; X,Y,.. for several"),
    "/memdec": ("/memdec on|off", "mix the memory decoder in, or answer with the base alone"),
    "/gate": ("/gate S,O[,B]|off", "the entropy gate on lambda (slope,offset[,base slope]), or a fixed lambda"),
    "/explain": ("/explain on|off", "show how the memory decoder moved each token"),
    "/system": ("/system TEXT", "set the system message (no text: remove it)"),
    "/reset": ("/reset", "forget the conversation"),
    "/help": ("/help", "this list"),
    "/exit": ("/exit", "end the chat (also /quit, Ctrl-D)"),
}


def _on_off(name: str, arg: str) -> bool:
    if arg.lower() not in ("on", "off"):
        raise UserError(f"{name} takes on or off, got {arg!r}")
    return arg.lower() == "on"


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
