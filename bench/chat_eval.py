"""Does the memory decoder make chat answers better? Domain and general questions, answered greedily by the
base alone and by the pair, scored for the facts a good answer names and for layout (characters per line).

    python bench/chat_eval.py [--memdec FILE] [--lam 0.3 --lam 0.6] [--json out.json] [-n 160] [--threads 2]
                              [--special mix|base|both] [--lambda-gate gguf|off|SLOPE,OFFSET[,BASE_SLOPE]]

A fact is a group of alternatives (lower-case substrings); an answer names it when any alternative occurs.
`vs base`: the mean per-question change of the legal facts score against the base's own answers, +/- its
standard error (one answer moves the score by ~0.03). Layout: mean characters per non-empty line, the share of
lines under 60 characters in answers of several lines, and lines made only of rule characters (`***`, `---`);
length: tokens per answer and the share that ends (EOS / end of turn) before the token limit. `--special base`
runs the pair with lambda 0 on the control and end-of-generation tokens (`base_special_tokens`), `both` runs each
lambda both ways. Quality is measured here, never speed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from edge_memdec import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

LEGAL = [
    (
        "What must you keep when you copy software under the MIT License?",
        [["copyright notice"], ["permission notice", "this permission"]],
    ),
    (
        "Does the Apache License 2.0 grant a patent license, and when does it end?",
        [["patent"], ["contribut"], ["terminat", "litigation", "lawsuit"]],
    ),
    (
        "What does the GNU GPL require when you distribute a modified program?",
        [["source code", "source"], ["same license", "same terms", "this license", "gpl"], ["distribut"]],
    ),
    (
        "What warranty does the MIT License give?",
        [["as is"], ["without warranty", "no warranty", "warranty of any kind"]],
    ),
    (
        "What does the BSD 3-Clause License say about using the authors' names?",
        [["name"], ["endorse", "promote"], ["written permission", "prior written"]],
    ),
    (
        "Under GPL version 2, what must come with a binary you distribute?",
        [["source code"], ["written offer", "offer"], ["three years", "3 years"]],
    ),
    ("What is the GNU Lesser General Public License meant for?", [["librar"], ["link"]]),
    (
        "What does the Mozilla Public License 2.0 apply to?",
        [["file"], ["source code form", "source code"], ["larger work"]],
    ),
    ("What is a Contribution under the Apache License 2.0?", [["submitted"], ["licensor"], ["work"]]),
    ("What does the GNU Affero GPL add to the GPL?", [["network", "server", "remote"], ["source"]]),
    ("What does the Unlicense do?", [["public domain"], ["copyright"]]),
    (
        "What does the Creative Commons Attribution 4.0 license require?",
        [["attribution", "credit", "attribute"], ["licen"]],
    ),
    ("What does sublicense mean in a software licence?", [["grant"], ["third part", "others", "another"]]),
    ("Can Apache 2.0 code be used in a proprietary product?", [["yes", "may", "can"], ["notice"], ["licen"]]),
    ("What does the ISC License permit?", [["use"], ["copy"], ["modify"], ["fee"]]),
    (
        "What does the zlib license say about altered versions?",
        [["plainly marked", "marked"], ["misrepresent"]],
    ),
    (
        "Can you add restrictions when you pass on a GPL program?",
        [["further restrictions", "additional restrictions", "not impose", "may not"]],
    ),
    (
        "What happens when someone violates GPL version 3?",
        [["terminat"], ["30 days", "cure", "reinstat", "cease"]],
    ),
    (
        "What is the NOTICE file in the Apache License 2.0?",
        [["notice"], ["attribution"], ["distribut", "redistribut"]],
    ),
    ("What does 'provided as is' mean in a licence?", [["warrant"], ["liab"]]),
    (
        "Does the MIT License allow you to sell copies of the software?",
        [["sell"], ["yes", "permit", "allow"]],
    ),
    ("What does the Eclipse Public License 2.0 say about patents?", [["patent"], ["contribut"]]),
    (
        "What does the Boost Software License require of copies?",
        [
            ["copyright notice", "this license", "licence", "license"],
            ["machine-executable", "object code", "binary"],
        ],
    ),
    (
        "What does the Artistic License let you do with the Package?",
        [["modif"], ["standard version", "package"]],
    ),
    (
        "What is a Derivative Work under the Apache License 2.0?",
        [["based on", "derived"], ["work"], ["editorial revisions", "modifications", "revisions"]],
    ),
    (
        "What does the GPL say about a warranty?",
        [["no warranty", "without any warranty", "without warranty"], ["extent permitted", "applicable law"]],
    ),
]

GENERAL = [
    ("What is the capital of France?", [["paris"]]),
    ("How many days does a leap year have?", [["366"]]),
    ("Which gas do plants take from the air for photosynthesis?", [["carbon dioxide", "co2"]]),
    ("Who wrote Romeo and Juliet?", [["shakespeare"]]),
    ("At what temperature does water boil at sea level, in Celsius?", [["100"]]),
    ("What is the largest planet in our solar system?", [["jupiter"]]),
    ("What does a thermometer measure?", [["temperature"]]),
    ("How many continents are there on Earth?", [["seven", "7"]]),
    ("What is the chemical formula of water?", [["h2o", "h₂o"]]),
    ("What is the freezing point of water in Fahrenheit?", [["32"]]),
]

RULE = re.compile(r"^\s*([^\w\s])\1{2,}\s*$")


def facts_named(answer: str, facts: list[list[str]]) -> float:
    """Share of fact groups that the answer names (any alternative, case-insensitive)."""
    text = answer.lower()
    return sum(any(alt in text for alt in group) for group in facts) / len(facts)


def layout(answer: str) -> dict:
    lines = [line for line in answer.split("\n") if line.strip()]
    chars = [len(line) for line in lines] or [0]
    short = sum(c < 60 for c in chars) / len(chars) if len(lines) > 2 else 0.0
    return {
        "chars_per_line": sum(chars) / len(chars),
        "short_share": short,
        "rule_lines": sum(bool(RULE.match(x)) for x in lines),
    }


def answer_all(lm: MemoryDecoderLM, questions, lam: float, max_tokens: int, base_special: bool) -> list[dict]:
    rows = []
    for question, facts in questions:
        tokens = lm.chat_format.tokens([{"role": "user", "content": question}])
        generation = lm.start(tokens, max_tokens=max_tokens, temperature=0, lam=lam, base_special_tokens=base_special)
        text = generation.run()
        rows.append({"question": question, "answer": text, "facts": facts_named(text, facts), **layout(text),
                     "tokens": len(generation.tokens), "ended": generation.finish_reason == "stop"})  # fmt: skip
    return rows


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {
        "facts": sum(r["facts"] for r in rows) / n,
        "chars_per_line": sum(r["chars_per_line"] for r in rows) / n,
        "short_share": sum(r["short_share"] for r in rows) / n,
        "rule_lines": sum(r["rule_lines"] for r in rows),
        "tokens": sum(r["tokens"] for r in rows) / n,
        "ended": sum(r["ended"] for r in rows) / n,
    }


def paired_gain(rows: list[dict], base_rows: list[dict]) -> tuple[float, float]:
    """Mean per-question change of the facts score against the base's answers to the same questions, and its
    standard error (the noise a difference between two runs must clear)."""
    diffs = [r["facts"] - b["facts"] for r, b in zip(rows, base_rows, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(n - 1, 1)
    return mean, (var / n) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="base GGUF (default SmolLM2)")
    parser.add_argument(
        "--memdec", type=Path, default=None, help="memory decoder GGUF (default: the shipped one)"
    )
    parser.add_argument("--lam", type=float, action="append", help="lambdas to try (default: the GGUF's)")
    parser.add_argument("-n", "--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write every answer and score here")
    parser.add_argument("--lambda-gate", default="gguf",
                        help="entropy gate on lambda: SLOPE,OFFSET[,BASE_SLOPE], off, or gguf (the decoder's own)")  # fmt: skip
    parser.add_argument("--special", choices=("mix", "base", "both"), default="mix",
                        help="control/EOS tokens: mixed as any token, or the base's alone (lambda 0)")  # fmt: skip
    args = parser.parse_args()
    base, memdec = args.model or default_base_gguf(), args.memdec or default_memdec_gguf()
    results = {"base": str(Path(base).name), "memdec": str(Path(memdec).name), "runs": {}}
    with MemoryDecoderLM(base, memdec, n_ctx=2048, n_threads=args.threads, lambda_gate=args.lambda_gate) as lm:
        results["lambda_gate"] = lm.pair.gate.text() if lm.pair.gate else None
        runs = [("base alone", 0.0, False)]
        for lam in args.lam or [lm.lam]:
            for base_special in {"mix": (False,), "base": (True,), "both": (False, True)}[args.special]:
                name = f"memdec {lam:g}" + (", special: base" if base_special else "")
                runs.append((name, lam, base_special))
        for name, lam, base_special in runs:
            t0 = time.perf_counter()
            run = {
                "lambda": lam,
                "base_special_tokens": base_special,
                "legal": answer_all(lm, LEGAL, lam, args.max_tokens, base_special),
                "general": answer_all(lm, GENERAL, lam, args.max_tokens, base_special),
            }
            run["seconds"] = time.perf_counter() - t0
            results["runs"][name] = run
            print(f"{name} done in {run['seconds']:.0f} s", file=sys.stderr)
    print(
        f"{'':30} {'legal facts':>11} {'vs base':>15} {'general facts':>13} {'chars/line':>10} {'short lines':>11}"
        f" {'rule lines':>10} {'tokens':>7} {'ended':>6}"
    )
    base_legal = results["runs"]["base alone"]["legal"]
    for name, run in results["runs"].items():
        legal, general = summary(run["legal"]), summary(run["general"])
        both = summary(run["legal"] + run["general"])
        gain, stderr = paired_gain(run["legal"], base_legal)
        run["legal_gain"] = {"mean": gain, "stderr": stderr}
        print(
            f"{name:30} {legal['facts']:11.3f} {gain:+8.3f} +/- {stderr:.3f} {general['facts']:13.3f} "
            f"{both['chars_per_line']:10.1f} {both['short_share']:11.3f} {both['rule_lines']:10d} "
            f"{both['tokens']:7.1f} {both['ended']:6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
