"""`chat --explain` on a terminal: each token tinted by how much the memory decoder moved it, then the tokens
whose top choice it changed and a summary line; piped, the answer stays plain text followed by a table with
one line per token.

Colours follow the NO_COLOR convention (set: no colour) and are used only when the output is a terminal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TextIO

from edge_memdec.trace import TokenTrace, summary

STRONG_SHIFT = 0.2  # |p_mix - p_base| from which a token is drawn bold
FAINT_SHIFT = 0.02  # below this a token keeps the terminal's colour

_GREEN, _RED, _BOLD, _UNDERLINE, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[1m", "\x1b[4m", "\x1b[0m"

LEGEND = (
    "[explain: green = the memory decoder raised the chosen token's probability, red = lowered it, bold = by "
    f"{STRONG_SHIFT:g} or more, underlined = it changed the most probable token]"
)


def is_terminal(out: TextIO) -> bool:
    return hasattr(out, "isatty") and out.isatty()


def use_colour(out: TextIO) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set."""
    return not os.environ.get("NO_COLOR") and is_terminal(out)


def tint(text: str, tokens: Sequence[TokenTrace]) -> str:
    """A piece of answer text with ANSI colour for the (first) token it completes."""
    if not tokens or not text:
        return text
    shift = sum(t.shift for t in tokens)
    style = ""
    if abs(shift) >= FAINT_SHIFT:
        style += _GREEN if shift > 0 else _RED
    if abs(shift) >= STRONG_SHIFT:
        style += _BOLD
    if any(t.changed for t in tokens):
        style += _UNDERLINE
    return f"{style}{text}{_RESET}" if style else text


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def changed_lines(traces: Sequence[TokenTrace]) -> list[str]:
    """One line per token whose most probable choice the memory decoder changed."""
    lines = []
    for t in traces:
        if t.changed:
            base_top = t.top_base[0]
            lines.append(
                f"  {t.text!r}: base {_p(t.p_base)} (rank {t.rank_base}) -> mixed {_p(t.p_mix)} "
                f"(rank {t.rank_mix}); decoder {_p(t.p_mem)}; the base's top was {base_top.text!r} {base_top.p:.3f}"
            )
    return lines


TABLE_HEADER = "token\tp_base\tp_mem\tp_mix\tlambda\trank_base\trank_mix\tchanged\ttop_base\ttop_mix"


def table_lines(traces: Sequence[TokenTrace]) -> list[str]:
    """Tab-separated, one token per line (tokens written as Python string literals); `lambda` is the weight
    that token was mixed with (the entropy gate moves it per token)."""
    lines = [TABLE_HEADER]
    for t in traces:
        lines.append(
            f"{t.text!r}\t{_p(t.p_base)}\t{_p(t.p_mem)}\t{_p(t.p_mix)}\t{t.lam:.3f}\t{t.rank_base}\t{t.rank_mix}\t"
            f"{'yes' if t.changed else 'no'}\t{t.top_base[0].text!r}\t{t.top_mix[0].text!r}"
        )
    return lines


def summary_line(traces: Sequence[TokenTrace]) -> str:
    counts = summary(list(traces))
    return (
        f"[explain: {counts['tokens']} tokens; the memory decoder changed the top token {counts['changed']} "
        f"times; mean shift of the chosen token {counts['mean_shift']:+.3f} (mean |shift| "
        f"{counts['mean_abs_shift']:.3f})]"
    )


def report(traces: Sequence[TokenTrace], terminal: bool) -> list[str]:
    """What follows an explained answer: the changed tokens (terminal) or the whole table (piped), then the
    summary line."""
    body = changed_lines(traces) if terminal else table_lines(traces)
    return [*body, summary_line(traces)]
