"""Passes over one logit row (float32, natural-log units): maxima, softmax normalisers, the mixed log-prob.

Only the first `n` entries of a row are read: `n` is the number of token ids both models share.
"""

from __future__ import annotations

import numpy as np

from .fastmath import ELEMENTWISE, MAXIMUM, REDUCTION, exp_f32, exp_f64, fmax_f32, jit, log1p_f32

CHUNK = 64  # ids per chunk whose maximum bounds every mixed log-prob inside it (see head.py)
_SUM_BLOCK = 512  # float32 partial sums stay this short, then add into a float64 total

NEG_INF32 = np.float32(-np.inf)


@jit(fastmath=MAXIMUM)
def chunk_maxima(row, n, out):
    """out[c] = max(row[c*CHUNK : (c+1)*CHUNK]) for every chunk of row[:n]; returns max(row[:n])."""
    n_chunks = (n + CHUNK - 1) // CHUNK
    best = NEG_INF32
    for c in range(n_chunks):
        chunk = row[c * CHUNK : min(c * CHUNK + CHUNK, n)]
        m = NEG_INF32
        for i in range(chunk.shape[0]):
            m = fmax_f32(m, chunk[i])
        out[c] = m
        best = fmax_f32(best, m)
    return best


@jit(fastmath=MAXIMUM)
def row_max(row, n):
    """max(row[:n]) as float32."""
    m = NEG_INF32
    for i in range(n):
        m = fmax_f32(m, row[i])
    return m


@jit(fastmath=REDUCTION)
def sum_exp_f32(row, n, shift):
    """sum(exp(row[:n] - shift)), shift >= every entry: float32 exps, float64 total, relative error ~1e-7."""
    total = 0.0
    for start in range(0, n, _SUM_BLOCK):
        block = row[start : min(start + _SUM_BLOCK, n)]
        part = np.float32(0.0)
        for i in range(block.shape[0]):
            part += exp_f32(block[i] - shift)
        total += part
    return total


@jit(fastmath=REDUCTION)
def sum_exp_f64(row, n, shift):
    """sum(exp(row[:n] - shift)) in float64 throughout (shift >= every entry); relative error ~1e-15."""
    total = 0.0
    for i in range(n):
        total += exp_f64(np.float64(row[i]) - shift)
    return total


@jit(fastmath=ELEMENTWISE, inline="always")
def mix_key(x, y):
    """logaddexp(x, y) in float32 (x, y: the two weighted log-probs of one token); -inf when both are -inf."""
    hi = max(x, y)
    lo = min(x, y)
    return hi + log1p_f32(exp_f32(lo - hi)) if hi > NEG_INF32 else hi


@jit(fastmath=ELEMENTWISE, inline="always")
def mix_key_f64(x, y):
    """logaddexp(x, y) in float64 with the math library (used on a few head tokens, not on the vocabulary)."""
    hi = max(x, y)
    if hi == -np.inf:
        return hi
    return hi + np.log1p(np.exp(min(x, y) - hi))
