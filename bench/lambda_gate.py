"""Fixed lambda against the entropy gate (edge_memdec.lambda_gate): domain gain at each price on general text.

One pass of the pair over each text (gate_fit.position_scores: the paper's 1024/512 windows) keeps, per scored
position, both models' NLL of the target and the entropies of their next-token distributions; every mixture
below is arithmetic on those. Choices are made on held-in text, reported on held-out text: the lambda (and gate) with the lowest
validation PPL among those that keep the first half of the general sample within each budget, then its test-
split PPL and the second half's. Quality is measured here, never speed.

    python bench/lambda_gate.py --split WORK/split [--memdec GGUF] [--tokens 10000] [--threads 2] [--json F]

Needs the train extra (the split's sample is drawn with the base's tokenizer, as the recipe's report draws it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edge_memdec import MemoryDecoderLM
from edge_memdec.corpus import general_sample
from edge_memdec.defaults import PAPER_N_CTX
from edge_memdec.gate_fit import GATES, gated_ppl, general_halves, position_scores
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

BUDGETS = (1.02, 1.05, 1.10, 1.20)  # general PPL / base's, at most
FIXED = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95
GATED_LAMBDAS = (0.5, 0.7, 0.8, 0.9, 0.95)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True, help="a `corpus split` folder (validation, test)")
    parser.add_argument("--model", type=Path, default=None, help="base GGUF (default SmolLM2)")
    parser.add_argument("--memdec", type=Path, default=None, help="memory decoder GGUF (default: the shipped one)")
    parser.add_argument("--tokens", type=int, default=10000, help="validation and test tokens each")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="write the table here")
    args = parser.parse_args()
    from edge_memdec.train.base import load_tokenizer
    from edge_memdec.train.report import split_text

    base = args.model or default_base_gguf()
    tokenizer = load_tokenizer(base)
    first, second = general_halves(general_sample())
    texts = {
        "validation": split_text(tokenizer, args.split, "validation", args.tokens),
        "test": split_text(tokenizer, args.split, "test", args.tokens),
        "general, first half": first,
        "general, second half": second,
    }
    with MemoryDecoderLM(base, args.memdec or default_memdec_gguf(), lambda_gate=None, n_ctx=PAPER_N_CTX,
                         n_batch=PAPER_N_CTX, n_threads=args.threads, flash_attn=False) as lm:  # fmt: skip
        rows = {}
        for name, text in texts.items():
            rows[name] = position_scores(lm.pair, text)
            print(f"{name}: {len(rows[name])} positions scored", file=sys.stderr)
    base_ppl = {name: float(np.exp(r[:, 0].mean())) for name, r in rows.items()}
    settings = [(lam, None) for lam in FIXED] + [(lam, g) for lam in GATED_LAMBDAS for g in GATES]
    scored = [
        {"lambda": lam, "gate": g, **{name: gated_ppl(r, lam, g) / base_ppl[name] for name, r in rows.items()}}
        for lam, g in settings
    ]

    def best(budget: float | None, gated: bool) -> dict:
        ok = [s for s in scored if (s["gate"] is not None) == gated]
        if budget is not None:
            ok = [s for s in ok if s["general, first half"] <= budget] or ok[:1]
        return min(ok, key=lambda s: s["validation"])

    print("base PPL: " + ", ".join(f"{name} {p:.2f}" for name, p in base_ppl.items()))
    print(f"{'general budget':>15} {'kind':>6} {'lambda':>7} {'gate':>8} {'valid':>7} {'test':>7} {'gen 1st':>8} {'gen 2nd':>8}")
    table = []
    for budget in (*BUDGETS, None):
        for gated in (False, True):
            s = best(budget, gated)
            table.append({"budget": budget, **s})
            gate = "-" if s["gate"] is None else s["gate"].text()
            print(
                f"{'none' if budget is None else format(budget, '.2f') + 'x':>15} {'gated' if gated else 'fixed':>6} "
                f"{s['lambda']:7.2f} {gate:>8} {s['validation']:7.3f} {s['test']:7.3f} "
                f"{s['general, first half']:8.3f} {s['general, second half']:8.3f}"
            )
    if args.json:
        named = [s | {"gate": s["gate"].text() if s["gate"] else None} for s in scored]
        best_named = [s | {"gate": s["gate"].text() if s["gate"] else None} for s in table]
        args.json.write_text(json.dumps({"base_ppl": base_ppl, "best": best_named, "all": named}, indent=1) + "\n")


if __name__ == "__main__":
    main()
