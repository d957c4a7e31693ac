"""kNN-LM at inference, the retrieval baseline the memory decoder replaces.

At every scored position the base model's key (the same hidden state the datastore stores) is searched in the
datastore; the neighbours' softmax(-d/T) weights give p_kNN(target). Mixing with the base is left to the caller:
p = lambda * p_kNN + (1 - lambda) * p_base.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_memdec.defaults import KNN_K, KNN_TEMPERATURE, PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.errors import UserError
from edge_memdec.scoring import mixed_ppl
from edge_memdec.train import ivf_search
from edge_memdec.train.base import Base, load_base
from edge_memdec.train.datastore import datastore_keys, load_values, read_manifest
from edge_memdec.train.knn_targets import build_index
from edge_memdec.train.logprobs import window_logprobs


def base_keys_and_logprobs(base: Base, tokens: np.ndarray, n_ctx: int, stride: int):
    """Per scored position t (0..n_tokens-2): the datastore key of t (float32 [n, dim]) and the base's
    log p(token[t+1]) (float64 [n]), with sliding windows as in perplexity."""
    n = len(tokens) - 1
    keys = np.empty((n, base.model.config.hidden_size), dtype=np.float32)
    logprobs = np.empty(n, dtype=np.float64)
    captured: list[torch.Tensor] = []
    handle = base.key_layer.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        for w, window_lp in window_logprobs(base.model, tokens, n_ctx, stride, progress="kNN-LM base"):
            a, b = w.first_new - w.begin, w.stop - w.begin
            keys[w.first_new : w.stop] = captured[-1][0, a:b].float().numpy().astype(np.float16)
            logprobs[w.first_new : w.stop] = window_lp
            captured.clear()
    finally:
        handle.remove()
    return keys, logprobs


def search(index, queries: np.ndarray, k: int, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """k nearest datastore entries of each query: squared-L2 distances float32 [n, k], ids int64 [n, k]
    (-1 where the index found fewer)."""
    distances = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in tqdm(range(0, len(queries), chunk), desc="kNN-LM search", unit="chunk"):
        distances[start : start + chunk], ids[start : start + chunk] = ivf_search.search(
            index, queries[start : start + chunk], k
        )
    return distances, ids


def knn_logprob_of(
    distances: np.ndarray, ids: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float
) -> np.ndarray:
    """log p_kNN(target) per query from its neighbours: the softmax(-d/T) weight of those whose value is the
    target (-inf when none holds it), float64 [n]."""
    logits = np.where(ids >= 0, -distances.astype(np.float64) / temperature, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    hit = (values[np.maximum(ids, 0)] == targets[:, None]) & (ids >= 0)
    with np.errstate(divide="ignore"):
        return np.log((w * hit).sum(axis=1)) - np.log(w.sum(axis=1))


def knn_target_logprobs(
    index,
    values: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    k: int,
    temperature: float,
    chunk: int = 16384,
) -> np.ndarray:
    """log p_kNN(target) per query (see `knn_logprob_of`), float64 [n]."""
    distances, ids = search(index, queries, k, chunk)
    return knn_logprob_of(distances, ids, values, targets, temperature)


def knn_sweep(
    distances: np.ndarray,
    ids: np.ndarray,
    values: np.ndarray,
    targets: np.ndarray,
    base_lp: np.ndarray,
    temperatures: list[float],
    ks: list[int],
    lambdas: list[float],
) -> list[dict]:
    """kNN-LM PPL at its best lambda for every (T, k), from one search of max(ks) neighbours per position:
    [{"temperature", "k", "lambda", "ppl"}], best first. Distances come sorted, so the first k are the k nearest."""
    rows = []
    for k in ks:
        for t in temperatures:
            knn_lp = knn_logprob_of(distances[:, :k], ids[:, :k], values, targets, t)
            table = mixed_ppl(base_lp, knn_lp, lambdas)
            lam = min(table, key=table.get)
            rows.append({"temperature": t, "k": k, "lambda": lam, "ppl": table[lam]})
    return sorted(rows, key=lambda r: r["ppl"])


def knn_lm_scores(
    base_gguf_or_dir: Path,
    datastore_dir: Path,
    text: str,
    n_ctx: int = PAPER_N_CTX,
    stride: int = PAPER_STRIDE,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    threads: int = 2,
) -> dict:
    """Base and kNN target log-probs for every scored position of `text` (natural log, float64 [n_scored]).

    Returns {"tokens_scored", "base_logprobs", "knn_logprobs", "k", "temperature", "datastore_positions",
    "seconds": {"base", "search"}}; the base runs in PyTorch (fp32), the search is exact (faiss.knn over the keys).
    """
    import faiss

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    manifest = read_manifest(datastore_dir)
    base = load_base(Path(base_gguf_or_dir))
    if base.model.config.hidden_size != manifest["dim"]:
        raise UserError(
            f"the datastore's keys have size {manifest['dim']}, the base's {base.model.config.hidden_size}"
        )
    tokens = base.encode(text)
    if len(tokens) < 2:
        raise UserError("the text has fewer than 2 tokens; give more text")
    t0 = time.perf_counter()
    keys, base_lp = base_keys_and_logprobs(base, tokens, n_ctx, stride)
    t1 = time.perf_counter()
    index = build_index(datastore_keys(datastore_dir), "flat")  # searched a block of keys at a time
    knn_lp = knn_target_logprobs(
        index, load_values(datastore_dir), keys, tokens[1:], min(k, manifest["n_positions"]), temperature
    )
    t2 = time.perf_counter()
    return {
        "tokens_scored": len(base_lp),
        "base_logprobs": base_lp,
        "knn_logprobs": knn_lp,
        "k": k,
        "temperature": temperature,
        "datastore_positions": manifest["n_positions"],
        "seconds": {"base": t1 - t0, "search": t2 - t1},
    }
