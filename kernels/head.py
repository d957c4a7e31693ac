"""The head of the mixture: the h most probable tokens, found without sorting the vocabulary.

A min-heap of h (key, id) pairs scans the ids in chunks of CHUNK ids. The maximum of each row's logits over a
chunk bounds every key in it, so most chunks are skipped without an exp. Ties go to the lower id: ids arrive
in increasing order and only a strictly larger key enters a full heap.
"""

from __future__ import annotations

import numpy as np

from .adjust import offset_bounds, offset_keys
from .fastmath import ELEMENTWISE, jit
from .rows import CHUNK, NEG_INF32, mix_key

# Bound on |mix_key(x, y) - logaddexp(x, y)| in float32, as absolute + relative parts (keys are <= 0).
_KEY_ERROR_ABS = np.float32(1e-6)
_KEY_ERROR_REL = np.float32(4e-7)


@jit(inline="always")
def _worse(key_a, id_a, key_b, id_b):
    return key_a < key_b or (key_a == key_b and id_a > id_b)


@jit(inline="always")
def _sift_down(keys, ids, size, key, i):
    """Put (key, i) at the root of the min-heap keys/ids[:size] (root: the worst), then restore the order."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= size:
            break
        if child + 1 < size and _worse(keys[child + 1], ids[child + 1], keys[child], ids[child]):
            child += 1
        if not _worse(keys[child], ids[child], key, i):
            break
        keys[pos] = keys[child]
        ids[pos] = ids[child]
        pos = child
    keys[pos] = key
    ids[pos] = i


@jit(inline="always")
def _sift_up(keys, ids, pos, key, i):
    """Put (key, i) at position pos (the heap's new last slot) and move it up to its place."""
    while pos > 0:
        parent = (pos - 1) // 2
        if not _worse(key, i, keys[parent], ids[parent]):
            break
        keys[pos] = keys[parent]
        ids[pos] = ids[parent]
        pos = parent
    keys[pos] = key
    ids[pos] = i


@jit(fastmath=ELEMENTWISE)
def chunk_keys(base, mem, start, stop, mb, mm, cb, cm, moved, offsets, out):
    """out[:stop-start] = float32 keys of ids start..stop-1 (mixed log-probs; one model: up to a constant),
    the `moved` tokens shifted by their `offsets` (adjust.py)."""
    b = base[start:stop]
    m = mem[start:stop]
    if cm == NEG_INF32:
        for i in range(b.shape[0]):
            out[i] = (b[i] - mb) + cb
    elif cb == NEG_INF32:
        for i in range(m.shape[0]):
            out[i] = (m[i] - mm) + cm
    else:
        for i in range(b.shape[0]):
            out[i] = mix_key((b[i] - mb) + cb, (m[i] - mm) + cm)
    offset_keys(moved, offsets, start, stop, out)


@jit(fastmath=ELEMENTWISE)
def _chunk_bounds(base_chunk_max, mem_chunk_max, mb, mm, cb, cm, floors, ceilings):
    """Per chunk, a floor (some token in it has at least this key) and a ceiling (no token has more).

    One model: both are the key of the chunk's largest logit. Two: the keys x, y of the two maxima X, Y give
    the floor max(X, Y) and, logaddexp being increasing in both arguments, the ceiling logaddexp(X, Y),
    padded by the float32 error of mix_key (<= 1e-6 + 4e-7 |key|).
    """
    if cm == NEG_INF32:
        for c in range(floors.shape[0]):
            floors[c] = (base_chunk_max[c] - mb) + cb
            ceilings[c] = floors[c]
    elif cb == NEG_INF32:
        for c in range(floors.shape[0]):
            floors[c] = (mem_chunk_max[c] - mm) + cm
            ceilings[c] = floors[c]
    else:
        for c in range(floors.shape[0]):
            x = (base_chunk_max[c] - mb) + cb
            y = (mem_chunk_max[c] - mm) + cm
            floors[c] = max(x, y)
            top = mix_key(x, y)
            ceilings[c] = top + (_KEY_ERROR_ABS + abs(top) * _KEY_ERROR_REL)


@jit(fastmath=ELEMENTWISE)
def select_head(base, mem, n, mb, mm, cb, cm, base_chunk_max, mem_chunk_max, moved, offsets, keys, ids):
    """Fill keys/ids with the len(keys) best tokens of ids < n, best first; returns how many were filled.

    mb, mm, cb, cm are float32 mixture constants (cb or cm is -inf for an unused row); *_chunk_max hold each
    chunk's maximum logit (from rows.chunk_maxima); the `moved` tokens' keys are shifted by `offsets`. The
    h-th largest chunk floor is a lower bound of the h-th largest key, so chunks whose ceiling is below it are
    never read.
    """
    h = keys.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    floors = np.empty(n_chunks, np.float32)
    ceilings = np.empty(n_chunks, np.float32)
    _chunk_bounds(base_chunk_max[:n_chunks], mem_chunk_max[:n_chunks], mb, mm, cb, cm, floors, ceilings)
    offset_bounds(moved, offsets, floors, ceilings, CHUNK)
    cutoff = NEG_INF32
    if h <= n_chunks:
        for c in range(h):
            _sift_up(keys, ids, c, floors[c], c)
        for c in range(h, n_chunks):
            if floors[c] > keys[0]:
                _sift_down(keys, ids, h, floors[c], c)
        cutoff = keys[0]
    buf = np.empty(CHUNK, np.float32)
    size = 0
    for c in range(n_chunks):
        ceiling = ceilings[c]
        if ceiling < cutoff or (size == h and ceiling <= keys[0]):
            continue
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        chunk_keys(base, mem, start, stop, mb, mm, cb, cm, moved, offsets, buf)
        for j in range(stop - start):
            key = buf[j]
            if size < h:
                if key >= cutoff:
                    _sift_up(keys, ids, size, key, start + j)
                    size += 1
            elif key > keys[0]:
                _sift_down(keys, ids, h, key, start + j)
    for end in range(size - 1, 0, -1):
        key, i = keys[end], ids[end]
        keys[end], ids[end] = keys[0], ids[0]
        _sift_down(keys, ids, end, key, i)
    return size
