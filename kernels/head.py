"""The head of the mixture: the h tokens with the largest mixed log-prob, found without sorting the vocabulary.

A min-heap of h (key, id) pairs scans the ids in order of chunks of CHUNK ids. The maximum of each row's logits
over a chunk bounds every key in it (a mixed key is at most ln 2 above the larger of its two weighted log-probs),
so once the heap is full, a chunk whose bound does not beat the heap's worst key is skipped without an exp.
Ties go to the lower id: ids arrive in increasing order and only a strictly larger key enters a full heap.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .fastmath import ELEMENTWISE
from .rows import CHUNK, NEG_INF32, mix_key

# Upper bound of the float32 log1p(exp(0)) in mix_key: ln 2 plus its approximation error.
_LN2_PAD = np.float32(0.6931481)


@njit(cache=True)
def _worse(keys, ids, a, b):
    return keys[a] < keys[b] or (keys[a] == keys[b] and ids[a] > ids[b])


@njit(cache=True)
def _swap(keys, ids, a, b):
    keys[a], keys[b] = keys[b], keys[a]
    ids[a], ids[b] = ids[b], ids[a]


@njit(cache=True)
def _sift_down(keys, ids, pos, size):
    while True:
        child = 2 * pos + 1
        if child >= size:
            return
        if child + 1 < size and _worse(keys, ids, child + 1, child):
            child += 1
        if not _worse(keys, ids, child, pos):
            return
        _swap(keys, ids, child, pos)
        pos = child


@njit(cache=True)
def _sift_up(keys, ids, pos):
    while pos > 0:
        parent = (pos - 1) // 2
        if not _worse(keys, ids, pos, parent):
            return
        _swap(keys, ids, pos, parent)
        pos = parent


@njit(cache=True, fastmath=ELEMENTWISE)
def chunk_keys(base, mem, start, stop, mb, mm, cb, cm, out):
    """out[:stop-start] = the float32 keys of ids start..stop-1 (mixed log-prob, up to a constant if one model)."""
    if cm == NEG_INF32:
        for i in range(start, stop):
            out[i - start] = (base[i] - mb) + cb
    elif cb == NEG_INF32:
        for i in range(start, stop):
            out[i - start] = (mem[i] - mm) + cm
    else:
        for i in range(start, stop):
            out[i - start] = mix_key((base[i] - mb) + cb, (mem[i] - mm) + cm)


@njit(cache=True, fastmath=ELEMENTWISE)
def _chunk_bound(base_max, mem_max, mb, mm, cb, cm):
    if cm == NEG_INF32:
        return (base_max - mb) + cb
    if cb == NEG_INF32:
        return (mem_max - mm) + cm
    return max((base_max - mb) + cb, (mem_max - mm) + cm) + _LN2_PAD


@njit(cache=True, fastmath=ELEMENTWISE)
def select_head(base, mem, n, mb, mm, cb, cm, base_chunk_max, mem_chunk_max, keys, ids):
    """Fill keys/ids with the len(keys) best tokens of ids < n, best first; returns how many were filled.

    mb, mm, cb, cm are float32 mixture constants (cb or cm is -inf for an unused row); *_chunk_max hold each
    chunk's maximum logit (from rows.chunk_maxima).
    """
    h = keys.shape[0]
    buf = np.empty(CHUNK, np.float32)
    size = 0
    worst = NEG_INF32
    for c in range((n + CHUNK - 1) // CHUNK):
        if size == h and _chunk_bound(base_chunk_max[c], mem_chunk_max[c], mb, mm, cb, cm) <= worst:
            continue
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        chunk_keys(base, mem, start, stop, mb, mm, cb, cm, buf)
        for i in range(start, stop):
            key = buf[i - start]
            if size < h:
                keys[size] = key
                ids[size] = i
                _sift_up(keys, ids, size)
                size += 1
                worst = keys[0]
            elif key > worst:
                keys[0] = key
                ids[0] = i
                _sift_down(keys, ids, 0, h)
                worst = keys[0]
    for end in range(size - 1, 0, -1):
        _swap(keys, ids, 0, end)
        _sift_down(keys, ids, 0, end)
    return size
