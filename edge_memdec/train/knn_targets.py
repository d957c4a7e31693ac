"""kNN targets: for every datastore position, the next-token distribution of its nearest neighbours.

Each position's key is searched in the datastore (k neighbours, its own entry excluded by index), neighbour i
gets weight softmax(-d_i / T) over squared-L2 distances, weights are summed per value token and normalised.
The distributions are peaked, so each position keeps only its `top` heaviest tokens (renormalised), stored as
  knn-ids.npy    int32   [n_positions, top]  (padding id 0 with probability 0)
  knn-probs.npy  float16 [n_positions, top]
next to targets.json (parameters, statistics) in the output folder. Chunks of queries are written into
memory-mapped `.partial` files and recorded in targets.json, so a killed run resumes at the first unfinished chunk.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from edge_memdec.defaults import KNN_CHUNK, KNN_K, KNN_TEMPERATURE
from edge_memdec.errors import UserError
from edge_memdec.files import output_folder, write_error, write_json_atomic
from edge_memdec.train.datastore import ShardRows, datastore_keys, load_values, read_manifest
from edge_memdec.train.ivf_search import search

MANIFEST = "targets.json"
IVF_CENTROIDS = 4096
PQ_BYTES = 64
IVF_TRAIN_MAX = 1_000_000
KEY_BLOCK = 65_536  # keys read and searched (or added to an index) at a time: 151 MB float32 at dim 576

Keys = np.ndarray | ShardRows  # float32 [n, dim] in memory, or read from the datastore's shards block by block


class FlatKeys:
    """Exact search over the caller's keys without copying them: faiss.knn, the very search IndexFlatL2 runs
    (same distances and ids), which would first copy every key into itself. Keys read from the datastore's
    shards (`ShardRows`) are searched `block` at a time, each block's nearest merged into a running top-k, so
    memory holds one block of them, not all."""

    def __init__(self, keys: Keys, block: int = KEY_BLOCK):
        self.keys = keys if isinstance(keys, ShardRows) else np.ascontiguousarray(keys, dtype=np.float32)
        self.ntotal, self.d = self.keys.shape
        self.nprobe = 0
        self.block = block

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances float32 [n, k] (squared L2, nearest first) and ids int64 [n, k]; -1 past the n keys."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if isinstance(self.keys, np.ndarray):
            return faiss.knn(queries, self.keys, k)
        heap = faiss.ResultHeap(len(queries), k)
        for start in range(0, self.ntotal, self.block):
            keys = self.keys[start : start + self.block]
            distances, ids = faiss.knn(queries, keys, min(k, len(keys)))
            heap.add_result(distances, ids + start)
        heap.finalize()
        return heap.D, heap.I


def build_index(
    keys: Keys,
    kind: str,
    nprobe: int = 32,
    threshold: int = 2_000_000,
    seed: int = 0,
    lists: int = 0,
    pq_bytes: int = PQ_BYTES,
    device: str = "cpu",
):
    """A faiss index over `keys` (float32 [n, dim], or `ShardRows`): exact `flat` (`FlatKeys`: the keys searched
    where they are);
    `ivfflat` (`lists` inverted lists holding the keys themselves, so distances are exact within the lists
    searched; 0 = about 2 sqrt(n) lists trained on 64 keys each); `ivfpq` (`lists` lists, 0 = up to 4096 with
    >= 39 training keys each; `pq_bytes`-byte codes of 8-bit sub-quantizers); `torch`, exact search as matrix
    products on `device`; or `auto` (on CUDA: faiss's GPU flat index if this faiss has one, else `torch`;
    elsewhere flat up to `threshold` keys, else ivfpq). `index_description` says which was built."""
    n, dim = keys.shape
    on_gpu = str(device).startswith("cuda")
    if kind == "auto" and on_gpu:
        if hasattr(faiss, "StandardGpuResources"):
            index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), dim)
            _add(index, keys)
            return index
        kind = "torch"
    if kind == "auto":
        kind = "flat" if n <= threshold else "ivfpq"
    if kind == "torch":
        import torch

        from edge_memdec.train.torch_index import TorchFlatIndex

        return TorchFlatIndex(keys[:], torch.device(device))
    if kind == "flat":
        return FlatKeys(keys)
    if kind == "ivfflat":
        centroids = lists or int(min(IVF_CENTROIDS, max(1, 2 * np.sqrt(n))))
        if not 1 <= centroids <= n:
            raise UserError(f"--ivf-lists must be between 1 and the {n} datastore keys, got {lists}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, centroids)
        sample = np.random.default_rng(seed).choice(n, size=min(n, 64 * centroids), replace=False)
        index.train(keys[np.sort(sample)])
        index.nprobe = nprobe
    elif kind == "ivfpq":
        if pq_bytes < 1 or dim % pq_bytes:
            raise UserError(
                f"IVF-PQ needs a code size that divides the key size {dim}, got --pq-bytes {pq_bytes}; "
                "use another --pq-bytes or --index flat"
            )
        centroids = lists or min(IVF_CENTROIDS, max(1, n // 39))
        if not 1 <= centroids <= n:
            raise UserError(f"--ivf-lists must be between 1 and the {n} datastore keys, got {lists}")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, centroids, pq_bytes, 8)
        sample = np.random.default_rng(seed).choice(n, size=min(n, IVF_TRAIN_MAX), replace=False)
        index.train(keys[np.sort(sample)])
        index.nprobe = nprobe
    else:
        raise UserError(f"unknown index {kind!r}; use flat, ivfflat, ivfpq, torch or auto")
    _add(index, keys)
    return index


def _add(index, keys: Keys) -> None:
    """Add every key to `index` (ids 0..n-1, in order) a block at a time: the index holds its own copy (or codes),
    so the keys never need to be in memory all at once."""
    for start in range(0, len(keys), KEY_BLOCK):
        index.add(keys[start : start + KEY_BLOCK])


def index_description(index) -> str:
    """`flat`, or the IVF shape: lists, code bytes (PQ), nprobe."""
    if isinstance(index, faiss.IndexIVFPQ):
        return f"ivfpq: {index.nlist} lists, {index.pq.M}-byte codes, nprobe {index.nprobe}"
    if isinstance(index, faiss.IndexIVFFlat):
        return f"ivfflat: {index.nlist} lists, nprobe {index.nprobe}"
    if not isinstance(index, (FlatKeys, faiss.Index)):
        return f"torch exact on {index.device}"
    return "flat" if isinstance(index, (FlatKeys, faiss.IndexFlat)) else type(index).__name__


def exact_agreement(index, keys: Keys, k: int, sample: int = 500, seed: int = 0) -> dict | None:
    """How an approximate index's neighbours compare with exact search on `sample` datastore keys: the share
    of queries whose nearest other key is the same, and the mean share of the exact k neighbours found
    (recall@k). None for an exact index."""
    if isinstance(index, (FlatKeys, faiss.IndexFlat)) or not isinstance(index, faiss.Index):
        return None  # exact search
    n = len(keys)
    queries = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    kk = min(k, n - 1)
    sample_keys = keys[queries]  # read once (from the shards when the keys are there)
    _, truth = FlatKeys(keys).search(sample_keys, kk + 1)
    _, found = index.search(sample_keys, kk + 1)
    truth = drop_self(np.zeros(truth.shape, np.float32), truth, queries, kk)[1]
    found = drop_self(np.zeros(found.shape, np.float32), found, queries, kk)[1]
    recall = np.mean([len(np.intersect1d(t, f)) / kk for t, f in zip(truth, found, strict=True)])
    return {
        "sample": len(queries),
        "k": kk,
        "nearest_same": float(np.mean(truth[:, 0] == found[:, 0])),
        "recall_at_k": float(recall),
    }


def drop_self(distances: np.ndarray, neighbours: np.ndarray, query_ids: np.ndarray, k: int):
    """From k+1 search results per query, remove the query's own entry (matched by index), or the farthest
    result when the query is not among them; returns distances and ids, each [n_queries, k]."""
    is_self = neighbours == query_ids[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones(neighbours.shape, dtype=bool)
    keep[np.arange(len(drop)), drop] = False
    return distances[keep].reshape(-1, k), neighbours[keep].reshape(-1, k)


def knn_distribution(
    distances: np.ndarray, neighbour_values: np.ndarray, temperature: float, top: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse next-token distributions from neighbours: softmax(-d/T) summed per value token, the `top` heaviest
    tokens kept and renormalised. Inputs [n, k] (distances squared L2; values -1 for missing neighbours);
    returns ids int32 [n, top] and probabilities float32 [n, top], heaviest first (numba, rows in parallel)."""
    from edge_memdec.kernels.knn_distribution import knn_distribution_core

    n = distances.shape[0]
    ids = np.empty((n, top), dtype=np.int32)
    probs = np.empty((n, top), dtype=np.float32)
    knn_distribution_core(
        np.ascontiguousarray(distances, dtype=np.float32),
        np.ascontiguousarray(neighbour_values, dtype=np.int64),
        float(temperature),
        int(top),
        ids,
        probs,
    )
    return ids, probs


def build_targets(
    ds_dir: Path,
    out_dir: Path | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    top: int = 32,
    index_kind: str = "auto",
    nprobe: int = 32,
    chunk: int = KNN_CHUNK,
    threads: int = 2,
    threshold: int = 2_000_000,
    lists: int = 0,
    pq_bytes: int = PQ_BYTES,
    searcher: tuple | None = None,
    extra: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Compute (or resume) the kNN targets of every datastore position; returns targets.json's content.

    `searcher` is (keys, values, index) already loaded and built (by a temperature sweep), else they are made
    here; `extra` goes into targets.json (the sweep's table)."""
    ds_dir = Path(ds_dir)
    out_dir = Path(out_dir) if out_dir else ds_dir / "targets"
    _check_settings(k, temperature, top, chunk, nprobe, threads, lists)
    n = read_manifest(ds_dir)["n_positions"]
    if n < 2:
        raise UserError("the datastore has fewer than 2 positions; build it from more text")
    k = min(k, n - 1)
    output_folder(out_dir, "targets")
    faiss.omp_set_num_threads(threads)
    params = {"k": k, "temperature": temperature, "top": top, "index": index_kind, "nprobe": nprobe,
              "chunk": chunk, "ivf_lists": lists, "pq_bytes": pq_bytes}  # fmt: skip
    manifest = _open_manifest(out_dir, ds_dir, n, params)
    if manifest.get("complete"):
        return manifest
    ids_out, probs_out = _open_partials(out_dir, manifest, n, top)
    t0 = time.perf_counter()
    keys, values, index = searcher or make_searcher(
        ds_dir, index_kind, nprobe, threshold, lists, pq_bytes, device
    )
    manifest["index_used"] = index_description(index)
    manifest["index_seconds"] = time.perf_counter() - t0
    manifest.update(extra or {})
    if "exact_agreement" not in manifest:
        manifest["exact_agreement"] = exact_agreement(index, keys, k)
    _search_chunks(index, keys, values, k, temperature, top, chunk, ids_out, probs_out, manifest, out_dir / MANIFEST)
    del ids_out, probs_out
    return _finish(out_dir, manifest, values)


def _check_settings(k: int, temperature: float, top: int, chunk: int, nprobe: int, threads: int, lists: int) -> None:
    if k < 1 or top < 1 or chunk < 1 or nprobe < 1 or threads < 1 or lists < 0:
        raise UserError(
            "-k, --top, --chunk, --nprobe and --threads must be at least 1 (and --ivf-lists at least 0), got "
            f"{k}, {top}, {chunk}, {nprobe}, {threads} and {lists}"
        )
    if not temperature > 0 or not np.isfinite(temperature):
        raise UserError(f"--temperature must be a positive number, got {temperature}")


def _open_manifest(out_dir: Path, ds_dir: Path, n: int, params: dict) -> dict:
    """targets.json of a run with these settings (a fresh one, or the one to resume); other settings refused."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        return {"datastore": str(ds_dir), "n_positions": n, "params": params, "finished": [], "seconds": 0.0}
    manifest = json.loads(manifest_path.read_text())
    # targets.json files from before --ivf-lists / --pq-bytes existed used their defaults
    saved = {"ivf_lists": 0, "pq_bytes": PQ_BYTES, **manifest["params"]}
    if saved != params or manifest["n_positions"] != n:
        raise UserError(f"{out_dir} holds targets made with other settings; choose another --out or delete it")
    return manifest


def _partial_paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / "knn-ids.partial.npy", out_dir / "knn-probs.partial.npy"


def _open_partials(out_dir: Path, manifest: dict, n: int, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The memory-mapped target arrays, ids int32 [n, top] and probs float16 [n, top]: reopened to resume, or
    created (disk reserved up front) when there is nothing to resume; the manifest is saved either way."""
    partial_ids, partial_probs = _partial_paths(out_dir)
    mode = "r+" if manifest["finished"] and partial_ids.is_file() and partial_probs.is_file() else "w+"
    if mode == "w+":
        manifest["finished"] = []
    try:
        ids_out = np.lib.format.open_memmap(partial_ids, mode=mode, dtype=np.int32, shape=(n, top))
        probs_out = np.lib.format.open_memmap(partial_probs, mode=mode, dtype=np.float16, shape=(n, top))
        if mode == "w+":
            _reserve_blocks(partial_ids)
            _reserve_blocks(partial_probs)
    except OSError as err:
        if mode == "w+":
            partial_ids.unlink(missing_ok=True)
            partial_probs.unlink(missing_ok=True)
        raise write_error(f"the kNN targets in {out_dir}", err) from None
    write_json_atomic(out_dir / MANIFEST, manifest)
    return ids_out, probs_out


def _search_chunks(
    index, keys, values, k, temperature, top, chunk, ids_out, probs_out, manifest: dict, manifest_path: Path
) -> None:
    """Search and write every unfinished chunk of `chunk` positions, saving the manifest after each one."""
    n = ids_out.shape[0]
    finished = set(manifest["finished"])
    bar = tqdm(total=n, initial=min(n, len(finished) * chunk), unit="pos", desc="knn targets", smoothing=0.1)
    try:
        for start in range(0, n, chunk):
            if start in finished:
                continue
            t1 = time.perf_counter()
            stop = min(start + chunk, n)
            distances, neighbours = search(index, keys[start:stop], k + 1)
            distances, neighbours = drop_self(distances, neighbours, np.arange(start, stop), k)
            neighbour_values = np.where(neighbours >= 0, values[np.maximum(neighbours, 0)], -1)
            ids, probs = knn_distribution(distances, neighbour_values, temperature, top)
            ids_out[start:stop], probs_out[start:stop] = ids, probs
            ids_out.flush()
            probs_out.flush()
            manifest["finished"].append(start)
            manifest["seconds"] += time.perf_counter() - t1
            write_json_atomic(manifest_path, manifest)
            bar.update(stop - start)
    finally:
        bar.close()


def _finish(out_dir: Path, manifest: dict, values: np.ndarray) -> dict:
    """Summary figures into the manifest, the arrays under their final names, the manifest marked complete."""
    partial_ids, partial_probs = _partial_paths(out_dir)
    ids = np.load(partial_ids, mmap_mode="r")
    probs = np.load(partial_probs, mmap_mode="r").astype(np.float32)
    manifest["avg_top1_prob"] = float(probs[:, 0].mean())
    manifest["avg_support"] = float((probs > 0).sum(axis=1).mean())
    manifest["next_token_in_support"] = float((ids == values[:, None]).any(axis=1).mean())
    manifest["seconds"] += manifest.pop("index_seconds")
    os.replace(partial_ids, out_dir / "knn-ids.npy")
    os.replace(partial_probs, out_dir / "knn-probs.npy")
    manifest["complete"] = True
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def make_searcher(
    ds_dir: Path,
    index_kind: str = "auto",
    nprobe: int = 32,
    threshold: int = 2_000_000,
    lists: int = 0,
    pq_bytes: int = PQ_BYTES,
    device: str = "cpu",
) -> tuple[ShardRows, np.ndarray, object]:
    """The datastore's keys (`ShardRows`: read from disk as searched), values (int32 [n]) and an index over
    the keys."""
    keys, values = datastore_keys(ds_dir), load_values(ds_dir)
    index = build_index(keys, index_kind, nprobe, threshold, lists=lists, pq_bytes=pq_bytes, device=device)
    return keys, values, index


def _reserve_blocks(path: Path) -> None:
    """Allocate a memory-mapped file's blocks up front, so a full disk fails now with an OSError instead of
    killing the process with SIGBUS on a later write into the map."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # file systems without fallocate: go on
                raise


def load_targets(targets_dir: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """Memory-mapped sparse targets (ids int32 [n, top], probs float16 [n, top]) and their manifest."""
    targets_dir = Path(targets_dir)
    path = targets_dir / MANIFEST
    if not path.is_file() or not json.loads(path.read_text()).get("complete"):
        raise UserError(f"{targets_dir} has no finished kNN targets; run `edge-memdec knn-targets` first")
    manifest = json.loads(path.read_text())
    ids = np.load(targets_dir / "knn-ids.npy", mmap_mode="r")
    probs = np.load(targets_dir / "knn-probs.npy", mmap_mode="r")
    return ids, probs, manifest
