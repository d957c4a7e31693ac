"""Fixed lambda against the entropy gate (edge_memdec.lambda_gate): domain gain at each price on general text.

One pass of the pair over each text (the paper's 1024/512 windows) keeps, per scored position, both models'
NLL of the target and the entropies of their next-token distributions; every mixture below is arithmetic on
those. Choices are made on held-in text, reported on held-out text: the lambda (and gate) with the lowest
validation PPL among those that keep the first half of the general sample within each budget, then its test-
split PPL and the second half's. Quality is measured here, never speed.

    python bench/lambda_gate.py --split WORK/split [--memdec GGUF] [--tokens 10000] [--threads 2] [--json F]

Needs the train extra (the split's sample is drawn with the base's tokenizer, as the recipe's report draws it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from edge_memdec import MemoryDecoderLM
from edge_memdec.corpus import general_sample
from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.kernels import row_entropies, score_rows
from edge_memdec.paths import default_base_gguf, default_memdec_gguf
from edge_memdec.perplexity import _pieces
from edge_memdec.windows import paper_windows

BUDGETS = (1.02, 1.05, 1.10, 1.20)  # general PPL / base's, at most
FIXED = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95
GATES = tuple(itertools.product((0.5, 1.0, 2.0), (-3.0, -2.0, -1.0, 0.0, 1.0)))  # (slope, offset)
GATED_LAMBDAS = (0.5, 0.7, 0.8, 0.9, 0.95)


def rows_of(lm: MemoryDecoderLM, text: str) -> np.ndarray:
    """float64 [scored positions, 4]: NLL base, NLL decoder, entropy base, entropy decoder (nats)."""
    pair = lm.pair
    tokens = pair.base.tokenize(text, add_bos=None, special=False)
    out = []
    with pair.lock:
        for window in paper_windows(len(tokens), PAPER_N_CTX, PAPER_STRIDE):
            pair.rewind(0)
            for piece in _pieces(tokens, window, None, pair.n_batch):
                n = pair.eval(piece.tokens, piece.flags)
                if n == 0:
                    continue
                base, mem = pair.base.logits_rows(n), pair.memdec.logits_rows(n)
                nll_base, nll_mem, _ = score_rows(base, mem, piece.targets, np.zeros(0), pair.n_shared)
                h = [row_entropies(rows, pair.n_shared) for rows in (base, mem)]
                out.append(np.column_stack([nll_base, nll_mem, *h]))
        pair.rewind(0)
    return np.concatenate(out)


def ppl(rows: np.ndarray, lam: float, gate: tuple[float, float] | None) -> float:
    """PPL of the mixture at lambda `lam`, gated by (slope, offset) or fixed."""
    lam_t = np.full(len(rows), lam)
    if gate is not None:
        lam_t = lam / (1.0 + np.exp(-(gate[0] * (rows[:, 2] - rows[:, 3]) + gate[1])))
    with np.errstate(divide="ignore"):
        mix = np.logaddexp(np.log1p(-lam_t) - rows[:, 0], np.log(lam_t) - rows[:, 1])
    return float(np.exp(-mix.mean()))


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
    general = general_sample()
    half = len(general) // 2
    cut = general.rfind("\n\n", 0, half) if general.rfind("\n\n", 0, half) > 0 else half
    texts = {
        "validation": split_text(tokenizer, args.split, "validation", args.tokens),
        "test": split_text(tokenizer, args.split, "test", args.tokens),
        "general, first half": general[:cut],
        "general, second half": general[cut:],
    }
    with MemoryDecoderLM(base, args.memdec or default_memdec_gguf(), lambda_gate=None, n_ctx=PAPER_N_CTX,
                         n_batch=PAPER_N_CTX, n_threads=args.threads, flash_attn=False) as lm:  # fmt: skip
        rows = {}
        for name, text in texts.items():
            rows[name] = rows_of(lm, text)
            print(f"{name}: {len(rows[name])} positions scored", file=sys.stderr)
    base_ppl = {name: float(np.exp(r[:, 0].mean())) for name, r in rows.items()}
    settings = [(lam, None) for lam in FIXED] + [(lam, g) for lam in GATED_LAMBDAS for g in GATES]
    scored = [
        {"lambda": lam, "gate": g, **{name: ppl(r, lam, g) / base_ppl[name] for name, r in rows.items()}}
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
            gate = "-" if s["gate"] is None else f"{s['gate'][0]:g},{s['gate'][1]:g}"
            print(
                f"{'none' if budget is None else format(budget, '.2f') + 'x':>15} {'gated' if gated else 'fixed':>6} "
                f"{s['lambda']:7.2f} {gate:>8} {s['validation']:7.3f} {s['test']:7.3f} "
                f"{s['general, first half']:8.3f} {s['general, second half']:8.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps({"base_ppl": base_ppl, "best": table, "all": scored}, indent=1) + "\n")


if __name__ == "__main__":
    main()
