"""Many queries against an IVF-flat index, organised by inverted list instead of by query.

faiss's `IndexIVFFlat.search` scans, for each query, the `nprobe` lists nearest to it, reading every key of
those lists from memory once per query. When the queries are the datastore's own keys (the kNN targets) tens of
queries probe each list, so here each list is read once per batch and compared with all the queries that probe
it as one matrix product (||q||^2 - 2 q.x + ||x||^2, faiss's BLAS path) whose every distance goes into the
query's running top-k. The lists searched are the same (the index's own coarse quantizer and nprobe) and distances are
exact within them, so the neighbours are faiss's, up to float rounding of near-equal distances
(`bench/knn_search.py` measures both the agreement and the speed).
"""

from __future__ import annotations

import faiss
import numpy as np

BY_LIST_MIN_QUERIES = 1024  # fewer queries than this share too few lists to gain: plain index.search


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest keys of each query: distances float32 [n, k] (squared L2, nearest first) and ids int64
    [n, k] (-1 where fewer than k keys were searched). IVF-flat indexes on the CPU with many queries go by list;
    every other index (flat, IVF-PQ, GPU, torch) answers through its own `search`."""
    if type(index) is faiss.IndexIVFFlat and len(queries) >= BY_LIST_MIN_QUERIES:
        return search_by_list(index, queries, k)
    return index.search(queries, k)


def search_by_list(index: faiss.IndexIVFFlat, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`search` for an IVF-flat index, one matrix product per inverted list probed (see the module's text)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = queries.shape
    _, probes = index.quantizer.search(queries, index.nprobe)  # [n, nprobe] list ids, nearest first
    flat = probes.ravel()
    order = np.argsort(flat, kind="stable")
    by_list = flat[order]
    query_of = order // probes.shape[1]
    bounds = np.searchsorted(by_list, np.arange(index.nlist + 1))
    invlists = faiss.extract_index_ivf(index).invlists
    heap = faiss.ResultHeap(n, k)
    for lst in np.unique(by_list[by_list >= 0]):
        size = invlists.list_size(int(lst))
        if size == 0:
            continue
        ids, keys = _list_contents(invlists, int(lst), size, dim)
        subset = query_of[bounds[lst] : bounds[lst + 1]]
        distances = faiss.pairwise_distances(queries[subset], keys)  # [len(subset), size]
        np.maximum(distances, 0, out=distances)  # rounding can take a duplicate key's 0 below zero
        heap.add_result_subset(subset, distances, ids)
    heap.finalize()
    return heap.D, heap.I


def _list_contents(invlists, lst: int, size: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids int64 [size] and keys float32 [size, dim] stored in inverted list `lst`."""
    id_ptr, code_ptr = invlists.get_ids(lst), invlists.get_codes(lst)
    try:
        ids = faiss.rev_swig_ptr(id_ptr, size).copy()
        codes = faiss.rev_swig_ptr(code_ptr, size * dim * 4).copy()
    finally:
        invlists.release_ids(lst, id_ptr)
        invlists.release_codes(lst, code_ptr)
    return ids.astype(np.int64, copy=False), codes.view(np.float32).reshape(size, dim)
