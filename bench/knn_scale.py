"""kNN search throughput of our IVF-PQ index (edge_memdec.train.knn_targets.build_index) and what it implies
for a paper-scale datastore.

    python bench/knn_scale.py --n 400000 --lists 1024 --nprobe 32 -k 1024 --queries 2000

Keys are random Gaussian vectors of the base's key size (576 for SmolLM2): search cost depends on how many PQ
codes each query scans (n * nprobe / lists when lists are balanced), not on the values. Prints build and search
times, codes scanned per second, and the search time of the paper's setting (4096 lists, 64-byte codes,
nprobe 32) at --paper-n keys with one query per key, scaled linearly in codes scanned.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from edge_memdec.train.knn_targets import build_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=400_000, help="keys in the index")
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--lists", type=int, default=1024)
    parser.add_argument("--pq-bytes", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("-k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--paper-n", type=float, default=500e6, help="keys (= queries) of the paper-scale run")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((args.n, args.dim), dtype=np.float32)

    t0 = time.perf_counter()
    index = build_index(keys, "ivfpq", args.nprobe, lists=args.lists, pq_bytes=args.pq_bytes)
    build_s = time.perf_counter() - t0
    sizes = np.array([index.invlists.list_size(i) for i in range(index.nlist)])
    queries = keys[rng.choice(args.n, size=args.queries, replace=False)]
    index.search(queries[:50], args.k)  # warm-up
    t0 = time.perf_counter()
    index.search(queries, args.k)
    search_s = time.perf_counter() - t0
    # Codes a query scans: the sizes of its nprobe nearest lists; the mean over lists times nprobe is what
    # balanced lists give (random keys are balanced).
    scanned = sizes.mean() * args.nprobe
    rate = scanned * args.queries / search_s

    paper_scanned = args.paper_n * 32 / 4096
    paper_s = args.paper_n * paper_scanned / rate
    print(f"{'keys':>10} {'lists':>6} {'nprobe':>6} {'k':>5} {'build s':>8} {'queries/s':>10} {'codes/query':>12} "
          f"{'codes/s':>10}")
    print(f"{args.n:>10,} {index.nlist:>6} {args.nprobe:>6} {args.k:>5} {build_s:>8.1f} "
          f"{args.queries / search_s:>10.1f} {scanned:>12,.0f} {rate:>10.3g}")
    print(
        f"paper scale ({args.paper_n:.3g} keys, 4096 lists, {args.pq_bytes}-byte codes, nprobe 32): "
        f"{paper_scanned:,.0f} codes per query; one query per key = {paper_s / 3600:,.0f} hours on "
        f"{args.threads} threads here ({paper_s / 3600 / 24:,.1f} days), codes alone "
        f"{args.paper_n * args.pq_bytes / 2**30:,.0f} GiB"
    )


if __name__ == "__main__":
    main()
