"""Where kNN-LM beats the memory decoder: the test sample's positions split by whether the datastore holds them.

A scored position "occurs in the datastore" when its last N tokens (the target and the N - 1 before it) appear,
in that order, somewhere in the datastore's token stream (further rows split those by how often they appear):
there kNN-LM can copy the next token from a stored neighbour, while the decoder must have learnt it. The text is the recipe's report's test sample (the first
`--tokens` of the test split's seeded documents, as `recipes/legal_ship.py` scores it); kNN-LM's log-probs come
from the report's cache in the datastore folder (computed, exact search, when absent); the pair (base GGUF +
memory decoder GGUF, llama.cpp) is scored here over the same 1024/512 windows. Quality only, never speed.

    python bench/knn_gap.py --datastore WORK/datastore-whole --split WORK/split --memdec DECODER.gguf \\
        [--tokens 40000] [--part test|validation] [-n 16] [--knn-lambda 0.8] [--threads 2] [--json F]

`--part validation --tokens 10001` is the validation sample a run of `--valid-tokens 10000` validates on (its
kNN-LM scores cached by the ship step's report).

Needs the train extra (the sample and kNN-LM use the base's tokenizer and PyTorch).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_memdec import MemoryDecoderLM
from edge_memdec.defaults import PAPER_N_CTX
from edge_memdec.gate_fit import gated_lambdas, mixed_logprobs, position_scores
from edge_memdec.train.base import load_tokenizer
from edge_memdec.train.report import cached_knn_scores, split_text

HASH_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: n-gram hashes are polynomials in it, modulo 2^64


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint64 [len(tokens) - n + 1]: a hash of each run of n tokens (entry i: tokens[i : i + n])."""
    tokens = tokens.astype(np.uint64)
    out = np.zeros(len(tokens) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            out = out * HASH_MULTIPLIER + tokens[j : j + len(out)] + np.uint64(1)
    return out


def occurrences_in(test: np.ndarray, store: np.ndarray, n: int) -> np.ndarray:
    """int64 [len(test) - 1]: how often target test[t + 1] and the n - 1 tokens before it occur in `store`
    (positions with fewer than n - 1 tokens before them: 0)."""
    known, counts = np.unique(ngram_hashes(store, n), return_counts=True)
    ends = ngram_hashes(test, n)  # entry i ends at test[i + n - 1], the target of scored position i + n - 2
    at = np.minimum(np.searchsorted(known, ends), len(known) - 1)
    out = np.zeros(len(test) - 1, dtype=np.int64)
    out[n - 2 :] = np.where(known[at] == ends, counts[at], 0)
    return out


def ppl(logprobs: np.ndarray) -> float:
    """exp of the mean negative log-prob (natural log); nan for no positions."""
    return float(np.exp(-logprobs.mean())) if len(logprobs) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--memdec", type=Path, required=True, help="the memory decoder GGUF (first file of a split)")
    parser.add_argument("--tokens", type=int, default=40_000, help="tokens of the sample (the report's: 40,000 test)")
    parser.add_argument("--part", choices=("test", "validation"), default="test", help="the split's part sampled")
    parser.add_argument("-n", type=int, default=16, help="tokens that must match, the target included")
    parser.add_argument("--knn-lambda", type=float, default=0.8, help="kNN-LM's lambda (the report's choice)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    manifest = json.loads((args.datastore / "datastore.json").read_text())
    base = Path(manifest["base"])
    params = json.loads((args.datastore / "targets" / "targets.json").read_text())["params"]
    text = split_text(load_tokenizer(base), args.split, args.part, args.tokens)
    knn = cached_knn_scores(base, args.datastore, text, int(params["k"]), float(params["temperature"]))
    with MemoryDecoderLM(base, args.memdec, n_ctx=PAPER_N_CTX, n_batch=PAPER_N_CTX, n_threads=args.threads) as lm:
        scores = position_scores(lm.pair, text)  # NLL base, NLL decoder, entropy base, entropy decoder
        lam, gate = lm.lam, lm.pair.gate
        tokens = np.asarray(lm.pair.base.tokenize(text, add_bos=None, special=False), dtype=np.int64)
    if not len(scores) == len(knn["knn_logprobs"]) == len(tokens) - 1:
        raise SystemExit("the pair and kNN-LM scored different positions; is the datastore's base the pair's?")
    lam_t = gated_lambdas(scores, lam, gate)
    columns = {
        "base": -scores[:, 0],
        "decoder alone": -scores[:, 1],
        "base + decoder (its settings)": mixed_logprobs(lam_t, -scores[:, 1], -scores[:, 0]),
        f"kNN-LM ({args.knn_lambda})": mixed_logprobs(args.knn_lambda, knn["knn_logprobs"], knn["base_logprobs"]),
    }
    times = occurrences_in(tokens, np.load(args.datastore / "tokens.npy"), args.n)
    buckets = {
        "all": times >= 0,
        f"{args.n}-gram in the datastore": times > 0,
        "not in it": times == 0,
        "in it once": times == 1,
        "2-4 times": (times >= 2) & (times <= 4),
        "5 times or more": times >= 5,
    }
    rows = []
    for name, where in buckets.items():
        row = {"positions": name, "count": int(where.sum())}
        row |= {col: ppl(lp[where]) for col, lp in columns.items()}
        row["NLL share"] = {col: float(-lp[where].sum() / -lp.sum()) for col, lp in columns.items()}
        rows.append(row)
    settings = f"lambda {lam:g}" + (f", gate {gate.text()}" if gate else ", fixed")
    print(f"{args.memdec.name} at {settings}; {len(tokens)} {args.part} tokens; PPL per bucket")
    print(f"| positions | count | {' | '.join(columns)} |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        print(f"| {row['positions']} | {row['count']} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "n": args.n, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
