"""kNN-target search speed: faiss's IVF-flat search (each query scans its lists) against the same index searched
by list (edge_memdec.train.ivf_search: each list read once per batch, one matrix product per list).

    python bench/knn_search.py --datastore WORK/datastore --keys 400000 --queries 32768 --nprobe 8 -k 1024

Keys are a datastore's first --keys keys (its finished shards; a datastore still being built works), or
clustered random vectors without --datastore. The queries are keys of the index, as for the kNN targets.
Both searches run on the same queries in the same run; prints seconds, queries/s, the ratio, and how far the
two agree: identical neighbour lists, recall of faiss's neighbours, and the total-variation distance between the
kNN target distributions (T 1, top 32) each gives. At the whole legal split (2.97M keys) the targets' lists hold
~860 keys each: `--lists` gives a smaller sample lists of that size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from edge_memdec.train.ivf_search import search_by_list
from edge_memdec.train.knn_targets import build_index, knn_distribution


def datastore_keys(folder: Path, n: int) -> np.ndarray:
    """The first `n` keys (float32 [<= n, dim]) from a datastore's key shards, in order."""
    parts, have = [], 0
    for path in sorted(folder.glob("keys-*.npy")):
        if have >= n:
            break
        part = np.load(path)
        parts.append(part[: n - have].astype(np.float32))
        have += len(parts[-1])
    if not parts:
        raise SystemExit(f"{folder} has no key shards (keys-*.npy)")
    return np.concatenate(parts)


def clustered_keys(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Random keys around 2 sqrt(n) centres (IVF lists of uneven size, as real keys give)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((int(2 * np.sqrt(n)), dim), dtype=np.float32) * 3
    return centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32)


def target_distance(
    d_a, i_a, d_b, i_b, values: np.ndarray, temperature: float = 1.0, top: int = 32
) -> np.ndarray:
    """Total-variation distance [n] between the kNN target distributions of two searches of the same queries
    (the query's own entry kept: it is not in the sample's targets either way)."""

    def dense(d, i):
        ids, probs = knn_distribution(d, np.where(i >= 0, values[np.maximum(i, 0)], -1), temperature, top)
        out = {}
        for row, (a, p) in enumerate(zip(ids, probs, strict=True)):
            out[row] = dict(zip(a.tolist(), p.tolist(), strict=True))
        return out

    a, b = dense(d_a, i_a), dense(d_b, i_b)
    return np.array(
        [0.5 * sum(abs(a[r].get(t, 0) - b[r].get(t, 0)) for t in a[r].keys() | b[r].keys()) for r in a]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datastore", type=Path, help="a datastore folder (default: clustered random keys)")
    parser.add_argument("--keys", type=int, default=400_000, help="keys in the index")
    parser.add_argument("--dim", type=int, default=576, help="key size of the random keys")
    parser.add_argument("--queries", type=int, default=32_768, help="queries, as one batch of the targets")
    parser.add_argument("--per-query", type=int, default=4096, help="of them, searched by faiss's own search")
    parser.add_argument(
        "--lists", type=int, default=0, help="IVF lists (0: 2 sqrt(keys), as the targets use)"
    )
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("-k", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    keys = (
        datastore_keys(args.datastore, args.keys) if args.datastore else clustered_keys(args.keys, args.dim)
    )
    t0 = time.perf_counter()
    index = build_index(keys, "ivfflat", args.nprobe, lists=args.lists)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    queries = keys[np.sort(rng.choice(len(keys), size=min(args.queries, len(keys)), replace=False))]
    few = min(args.per_query, len(queries))

    t0 = time.perf_counter()
    d_faiss, i_faiss = index.search(queries[:few], args.k + 1)
    faiss_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_list, i_list = search_by_list(index, queries, args.k + 1)
    list_s = time.perf_counter() - t0

    values = np.random.default_rng(2).integers(0, 1000, len(keys))
    if args.datastore:
        values = np.load(args.datastore / "tokens.npy")[1 : len(keys) + 1]
    tv = target_distance(d_faiss, i_faiss, d_list[:few], i_list[:few], values)
    same = float(np.mean((i_faiss == i_list[:few]).all(axis=1)))
    recall = float(
        np.mean([len(np.intersect1d(a, b)) / len(a) for a, b in zip(i_faiss, i_list[:few], strict=True)])
    )
    print(
        f"{len(keys):,} keys x {keys.shape[1]}, {index.nlist} lists, nprobe {args.nprobe}, k {args.k}, "
        f"{args.threads} threads; index built in {build_s:.1f} s"
    )
    print(f"{'search':<28} {'queries':>8} {'seconds':>8} {'queries/s':>10} {'vs faiss':>9}")
    faiss_rate, list_rate = few / faiss_s, len(queries) / list_s
    print(f"{'faiss IndexIVFFlat.search':<28} {few:>8} {faiss_s:>8.2f} {faiss_rate:>10.0f} {1:>8.2f}x")
    print(
        f"{'by list (ivf_search)':<28} {len(queries):>8} {list_s:>8.2f} {list_rate:>10.0f} "
        f"{list_rate / faiss_rate:>8.2f}x"
    )
    print(
        f"agreement on the {few} common queries: identical lists {same:.3f}, recall of faiss's {recall:.4f}, "
        f"max distance difference {float(np.max(np.abs(d_faiss - d_list[:few]))):.3g}; "
        f"kNN targets' total variation mean {tv.mean():.2e}, max {tv.max():.2e}"
    )


if __name__ == "__main__":
    main()
