"""An offline legal-clause explainer built on edge_memdec's Python API.

It reads a contract or licence, splits it into clauses (paragraphs) and has SmolLM2 + the legal memory decoder
explain each one in plain words, streaming the answer. Nothing leaves the machine.

    python examples/offline_app.py LICENSE.txt --clauses 3
    python examples/offline_app.py contract.txt --memdec my-legal-memdec.gguf --lambda 0.4 -n 120
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_memdec import MemoryDecoderLM, UserError
from edge_memdec.files import read_text_file
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

SYSTEM = "You explain legal text to people who are not lawyers, in two or three plain sentences."
MIN_CLAUSE_CHARS = 80  # shorter paragraphs are headings or signatures
MAX_CLAUSE_CHARS = 1500  # keeps each prompt well inside the context


def clauses(text: str) -> list[str]:
    """Paragraphs (blank-line separated) long enough to be clauses, each cut to MAX_CLAUSE_CHARS."""
    paragraphs = (" ".join(p.split()) for p in text.split("\n\n"))
    return [p[:MAX_CLAUSE_CHARS] for p in paragraphs if len(p) >= MIN_CLAUSE_CHARS]


def explain(lm: MemoryDecoderLM, clause: str, max_tokens: int) -> None:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What does this clause mean?\n\n{clause}"},
    ]
    for piece in lm.chat_stream(messages, max_tokens=max_tokens, temperature=0.0):
        print(piece, end="", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="UTF-8 text of a contract or licence")
    parser.add_argument("--base", type=Path, help="base GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--memdec", type=Path, help="memory decoder GGUF (default: the shipped legal one)")
    parser.add_argument("--lambda", dest="lam", type=float, help="memory decoder weight (default: its own)")
    parser.add_argument("--clauses", type=int, default=3, help="explain at most this many clauses")
    parser.add_argument("-n", "--max-tokens", type=int, default=96, help="most tokens per explanation")
    args = parser.parse_args()
    try:
        text = read_text_file(args.file)
        memdec = args.memdec or default_memdec_gguf()
        if memdec is None:
            raise UserError("no memory decoder is shipped in this install; pass --memdec MEM.gguf")
        with MemoryDecoderLM(args.base or default_base_gguf(), memdec, lam=args.lam, n_ctx=2048) as lm:
            for i, clause in enumerate(clauses(text)[: args.clauses], 1):
                print(f"\n[{i}] {clause[:120]}{'...' if len(clause) > 120 else ''}\n")
                explain(lm, clause, args.max_tokens)
    except UserError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
