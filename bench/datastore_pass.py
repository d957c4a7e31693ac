"""The datastore pass, variant against variant on the same legal train tokens, in alternating rounds: one forward
per 1024/512 window (each position computed twice) or the carried one pass (each position once), in fp32 or
with bf16 autocast; then kNN-LM validation PPL from each datastore's keys (same validation text, same fp32
queries, same exact search, best T and lambda).

    python bench/datastore_pass.py [--variants windows:fp32,carry:fp32,carry:bf16] [--tokens 20000] [--rounds 2]
                                   [--valid-tokens 4000] [--threads 2]

Prints positions/s per variant and round, each variant's ratio to the first, and the kNN-LM table. Needs the
train extra and the legal corpus (`pip install --no-deps licensedcode-data==32.1.0`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_memdec.corpus import load_corpus, split_documents
from edge_memdec.defaults import VALIDATION_LAMBDAS
from edge_memdec.paths import default_base_gguf
from edge_memdec.train.base import load_base
from edge_memdec.train.datastore import build_datastore, load_keys, load_values
from edge_memdec.train.knn_lm import base_keys_and_logprobs, knn_sweep, search
from edge_memdec.train.knn_targets import build_index
from edge_memdec.train.stream import token_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="windows:fp32,carry:fp32,carry:bf16", help="PASS:PRECISION,...")
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--valid-tokens", type=int, default=4_000)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_base(default_base_gguf())
    splits = split_documents(load_corpus("legal"))
    tokens = token_stream(base.tokenizer, splits["train"], args.tokens)
    valid = token_stream(base.tokenizer, splits["validation"], args.valid_tokens)
    work = Path(tempfile.mkdtemp(prefix="ds-pass-"))
    variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    names = [f"{mode}:{precision}" for mode, precision in variants]
    rates: dict[str, list[float]] = {name: [] for name in names}
    try:
        for r in range(args.rounds):
            order = list(zip(names, variants, strict=True))
            for name, (mode, precision) in order if r % 2 == 0 else order[::-1]:
                out = work / f"{name.replace(':', '-')}-{r}"
                t0 = time.perf_counter()
                build_datastore(base, tokens, out, mode=mode, shard_windows=32, precision=precision)
                rates[name].append((len(tokens) - 1) / (time.perf_counter() - t0))
                if r:
                    shutil.rmtree(out)
        first = np.median(rates[names[0]])
        print(f"{'variant':12} " + " ".join(f"round {i + 1:>2}" for i in range(args.rounds)) + "   vs first")
        for name, values in rates.items():
            ratio = np.median(values) / first
            print(f"{name:12} " + " ".join(f"{v:8.1f}" for v in values) + f"   {ratio:.2f}x")
        print(f"positions/s (medians for the ratio), {len(tokens) - 1} positions, {args.threads} threads")
        queries, base_lp = base_keys_and_logprobs(base, valid, 1024, 512)
        print(
            f"\nkNN-LM on {len(base_lp)} validation tokens (base PPL {np.exp(-base_lp.mean()):.3f}), exact search"
        )
        for name in names:
            ds = work / f"{name.replace(':', '-')}-0"
            values = load_values(ds)
            distances, ids = search(build_index(load_keys(ds), "flat"), queries, 1024)
            rows = knn_sweep(
                distances, ids, values, valid[1:], base_lp, [0.5, 1, 2, 4], [1024], list(VALIDATION_LAMBDAS)
            )
            best = rows[0]
            print(f"{name:12} PPL {best['ppl']:.3f} at T {best['temperature']:g}, lambda {best['lambda']:g}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
