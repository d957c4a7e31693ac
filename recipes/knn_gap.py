"""Where kNN-LM beats the memory decoder, token by token, on the legal campaign's validation and test texts (the
report's: the same seeded documents, 1024/512 windows). Each scored position goes into a bucket by kNN's own
probability of the true next token; per bucket: the share of positions, and the PPL there of base + kNN-LM (its
lambda chosen on validation, as the report does) and of base + memory decoder (the GGUF's lambda, fixed), and
what the bucket adds to the gap between them (nats per position of the whole text). The last line is the PPL
of an oracle that takes the better of the two at every position.

    python recipes/knn_gap.py WORK --memdec GGUF [--datastore datastore] [--valid-tokens 10000]
                              [--test-tokens 10000] [--threads 2]

kNN-LM's scores are the report's cache in the datastore folder (computed and cached when missing: minutes, the
base in PyTorch and an exact search). Needs the train extra.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.defaults import DEFAULT_LAMBDA, PAPER_N_CTX, VALIDATION_LAMBDAS
from edge_memdec.gate_fit import position_scores
from edge_memdec.gguf_file import read_gguf
from edge_memdec.scoring import mix_logprobs
from edge_memdec.train.base import load_tokenizer
from edge_memdec.train.report import cached_knn_scores, knn_lm_rows, split_text

BUCKETS = (0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0)  # edges of kNN's probability of the true next token


def gap_table(knn_lp: np.ndarray, knn_mix: np.ndarray, mixed_lp: np.ndarray) -> list[dict]:
    """Rows per bucket of kNN's probability: share, PPL of each mixture there, and the bucket's part of the mean
    NLL gap (decoder mixture minus kNN-LM mixture, nats per position). Inputs: natural-log target
    probabilities, float64 [positions], of kNN alone, base + kNN-LM, and base + memory decoder."""
    p_knn = np.exp(knn_lp)
    rows = []
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:], strict=True):
        at = (p_knn >= lo) & ((p_knn < hi) if hi < 1.0 else (p_knn <= hi))
        if not at.any():
            continue
        rows.append({
            "p_knn": f"[{lo}, {hi}{']' if hi == 1.0 else ')'}",
            "share": float(at.mean()),
            "knn_lm_ppl": float(np.exp(-knn_mix[at].mean())),
            "memdec_ppl": float(np.exp(-mixed_lp[at].mean())),
            "gap_nats": float((knn_mix[at] - mixed_lp[at]).sum() / len(at)),
        })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--memdec", type=Path, required=True, help="the decoder GGUF (first file of a split set)")
    parser.add_argument("--datastore", default="datastore", help="the datastore folder under WORK kNN retrieves from")
    parser.add_argument("--valid-tokens", type=int, default=10_000)
    parser.add_argument("--test-tokens", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    datastore = args.work / args.datastore
    base = Path(json.loads((datastore / "datastore.json").read_text())["base"])
    params = json.loads((datastore / "targets" / "targets.json").read_text())["params"]
    k, temperature = int(params["k"]), float(params["temperature"])
    lam = round(float(read_gguf(args.memdec).memdec.get("lambda", DEFAULT_LAMBDA)), 6)  # stored as float32
    tokenizer = load_tokenizer(base)
    texts = {
        "validation": split_text(tokenizer, args.work / "split", "validation", args.valid_tokens),
        "test": split_text(tokenizer, args.work / "split", "test", args.test_tokens),
    }
    knn = {split: cached_knn_scores(base, datastore, text, k, temperature) for split, text in texts.items()}
    knn_lam = knn_lm_rows(knn["validation"], knn["test"], VALIDATION_LAMBDAS)[0]["lambda"]  # the report's choice
    with MemoryDecoderLM(base, args.memdec, n_ctx=PAPER_N_CTX, n_batch=PAPER_N_CTX, n_threads=args.threads) as lm:
        scores = {split: position_scores(lm.pair, text) for split, text in texts.items()}
    print(f"kNN-LM: k {k}, T {temperature}, lambda {knn_lam} (validation); memory decoder: lambda {lam} (fixed)")
    for split, s in scores.items():
        knn_lp, base_knn_lp = knn[split]["knn_logprobs"], knn[split]["base_logprobs"]
        if len(knn_lp) != len(s):
            raise SystemExit(f"{split}: kNN-LM scored {len(knn_lp)} positions, the pair {len(s)}")
        mixed_lp = mix_logprobs(-s[:, 0], -s[:, 1], lam)
        knn_mix = mix_logprobs(base_knn_lp, knn_lp, knn_lam)
        print(f"\n{split}: base + kNN-LM {np.exp(-knn_mix.mean()):.3f}, base + memory decoder "
              f"{np.exp(-mixed_lp.mean()):.3f}, oracle (the better at each position) "
              f"{np.exp(-np.maximum(knn_mix, mixed_lp).mean()):.3f}")  # fmt: skip
        print("| kNN's p(next token) | share | base + kNN-LM PPL | base + decoder PPL | gap, nats/position |")
        print("|---|---|---|---|---|")
        for r in gap_table(knn_lp, knn_mix, mixed_lp):
            print(f"| {r['p_knn']} | {r['share']:.3f} | {r['knn_lm_ppl']:.2f} | {r['memdec_ppl']:.2f} | "
                  f"{r['gap_nats']:+.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
