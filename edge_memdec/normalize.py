"""Corpus normalisation: undo hard wrapping so a decoder learns a domain's content, not its file layout.

Licence files and many plain-text corpora are wrapped at ~70-80 columns and decorated with rule lines
(`*****`, `-----`); a decoder trained on them answers in broken short lines. `normalize_text` reflows each
paragraph into one line and keeps what carries meaning: blank lines between paragraphs, list items, headings
and other deliberately short lines (addresses, titles), each on a line of its own.
"""

from __future__ import annotations

import re

# A list item: a bullet, or a number / letter / roman numeral followed by `.` or `)`, or in parentheses.
LIST_ITEM = re.compile(
    r"^(?:[-*+\u2022\u00b7]|\(?(?:\d{1,3}(?:\.\d{1,3})*|[a-zA-Z]|[ivxlcdmIVXLCDM]{1,6})[.)])\s+\S"
)
RULE_LINE = re.compile(r"^\s*([^\w\s])\1{2,}\s*$")  # a line of one repeated punctuation character
SENTENCE_END = ".:;!?"
SPACES = re.compile(r"[ \t]{2,}")
SHORT_FRACTION = 0.6  # a line shorter than this share of the text's wrap width ends where its author ended it
MAX_WRAP = 100  # a text whose lines run longer is not hard-wrapped: its line breaks are the author's
CENTRED_FRACTION = 0.2  # a line indented by more than this share of the wrap width is centred (a title)


def wrap_width(lines: list[str]) -> int:
    """The column a hard-wrapped text breaks at: the 90th percentile of its non-blank line lengths."""
    lengths = sorted(len(line) for line in lines if line.strip())
    return lengths[int(0.9 * (len(lengths) - 1))] if lengths else 0


def normalize_text(text: str) -> str:
    """`text` with hard-wrapped paragraphs joined into single lines (runs of spaces collapsed), rule lines
    dropped, blank lines kept (at most one in a row), list items, centred titles and short lines (headings)
    kept on lines of their own."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    lines = ["" if RULE_LINE.match(line) else line for line in lines]
    width = wrap_width(lines)
    short, centred = SHORT_FRACTION * width, max(6, CENTRED_FRACTION * width)
    out: list[str] = []
    joinable = False  # whether the last output line is prose that the next line may continue
    for raw in lines:
        line = SPACES.sub(" ", raw.strip())
        if not line:
            if out and out[-1]:
                out.append("")
            joinable = False
            continue
        indent = len(raw) - len(raw.lstrip())
        # a list marker starts an item after a finished sentence, not "(2)" in the middle of one
        if joinable and indent <= centred and not (LIST_ITEM.match(line) and out[-1][-1] in SENTENCE_END):
            out[-1] = f"{out[-1]} {line}"
        else:
            out.append(line)
        joinable = width <= MAX_WRAP and len(raw) >= short and indent <= centred
    return "\n".join(out).strip("\n")
