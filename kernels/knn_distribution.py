"""kNN target distributions from neighbour lists, one row per datastore position, rows in parallel.

For each row: weights softmax(-d / T) over its valid neighbours (value >= 0), summed per value token, the `top`
heaviest tokens kept (ties: smaller token id first) and renormalised over what is kept. Each row sorts only its
own k values, so the cost is n * k log k with no [n, k] float64 or int64 temporaries (the numpy version this
replaced sorted all n * k entries at once in float64: 0.4-0.9 s per 2,048 rows at k=1024, this takes 0.1 s).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .fastmath import jit


@jit(parallel=True)
def knn_distribution_core(distances, values, temperature, top, ids_out, probs_out):
    """distances float32 [n, k] (squared L2), values int32/int64 [n, k] (-1: no neighbour), temperature > 0;
    writes ids_out int32 [n, top] and probs_out float32 [n, top], heaviest first, zero-padded."""
    n, k = distances.shape
    for i in prange(n):
        peak = -np.inf
        for j in range(k):
            if values[i, j] >= 0:
                logit = -np.float64(distances[i, j]) / temperature
                if logit > peak:
                    peak = logit
        order = np.argsort(values[i], kind="mergesort")
        tokens = np.empty(k, dtype=np.int64)
        sums = np.zeros(k, dtype=np.float64)
        m = 0
        for j in range(k):
            v = values[i, order[j]]
            if v < 0:
                continue
            w = np.exp(-np.float64(distances[i, order[j]]) / temperature - peak)
            if m > 0 and tokens[m - 1] == v:
                sums[m - 1] += w
            else:
                tokens[m] = v
                sums[m] = w
                m += 1
        for j in range(top):
            ids_out[i, j] = 0
            probs_out[i, j] = 0.0
        if m == 0:
            continue
        heaviest = np.argsort(-sums[:m], kind="mergesort")  # stable: equal sums keep ascending token ids
        kept = min(top, m)
        total = 0.0
        for j in range(kept):
            total += sums[heaviest[j]]
        if total <= 0.0:
            continue
        for j in range(kept):
            s = sums[heaviest[j]]
            if s > 0.0:
                ids_out[i, j] = tokens[heaviest[j]]
                probs_out[i, j] = s / total
