"""One decode step explained: the chosen token's log-prob and rank under the base, the memory decoder and their
mixture, and each one's most probable tokens, in one pass over the shared ids.

Log-probs are natural logs in float64 of the softmaxes over the n shared ids (temperature 1, before logit bias,
penalties and the sampling filters: what llama-server reports by default). Ranks count from 1; a tie goes to
the lower id, as in the sampler.
"""

from __future__ import annotations

import numpy as np

from .fastmath import ELEMENTWISE, jit
from .mixture import mix_into
from .rows import mix_key_f64, row_max, sum_exp_f64

BASE, MEM, MIX = 0, 1, 2  # rows of trace_core's outputs


@jit(fastmath=ELEMENTWISE, inline="always")
def _ahead(v, i, w, j):
    """Whether token i with log-prob v comes before token j with log-prob w (higher first, then lower id)."""
    return v > w or (v == w and i < j)


@jit(fastmath=ELEMENTWISE)
def _keep_top(ids, logp, size, k, i, v):
    """Insert (i, v) into the best-first list ids/logp[:size] of at most k entries; returns the new size."""
    if size == k and not _ahead(v, i, logp[k - 1], ids[k - 1]):
        return size
    j = size if size < k else k - 1
    while j > 0 and _ahead(v, i, logp[j - 1], ids[j - 1]):
        ids[j] = ids[j - 1]
        logp[j] = logp[j - 1]
        j -= 1
    ids[j] = i
    logp[j] = v
    return size + 1 if size < k else size


_NEAR = 1e-4  # float32 log-probs closer than this to the chosen token's are compared in float64


@jit(fastmath=ELEMENTWISE, inline="always")
def _exact(base, mem, r, i, lzb, lzm, wb, wm):
    """float64 log-prob of token i under row r."""
    lb = np.float64(base[i]) - lzb
    if r == BASE:
        return lb
    lm = np.float64(mem[i]) - lzm
    return lm if r == MEM else mix_key_f64(wb + lb, wm + lm)


@jit(fastmath=ELEMENTWISE)
def _fill_row(base, mem, r, n, lam, lzb, lzm, out):
    """out[:n] = float32 log-probs of row r."""
    if r == MIX:
        mix_into(base, mem, n, lam, out)
        return
    row, lz = (base, np.float32(lzb)) if r == BASE else (mem, np.float32(lzm))
    for i in range(n):
        out[i] = row[i] - lz


@jit(fastmath=ELEMENTWISE)
def trace_core(base, mem, has_mem, n, lam, token, scratch, top_ids, top_logp, chosen_logp, chosen_rank):
    """Fill, for each row r of (BASE, MEM, MIX): top_ids[r, :k] / top_logp[r, :k] (k = top_ids.shape[1] >= 1,
    best first), chosen_logp[r] and chosen_rank[r] of `token` (< n). scratch: float32, >= n entries. Without a
    memory decoder (has_mem False) the MEM row is left alone and MIX repeats BASE.

    Each row is one float32 pass (mix_into's for the mixture); the reported log-probs, and the order of tokens
    within _NEAR of the chosen one, are float64 from the logits.
    """
    k = top_ids.shape[1]
    lzb = np.float64(row_max(base, n))
    lzb += np.log(sum_exp_f64(base, n, lzb))
    lzm = 0.0
    if has_mem:
        lzm = np.float64(row_max(mem, n))
        lzm += np.log(sum_exp_f64(mem, n, lzm))
    wb = np.log1p(-lam) if lam < 1.0 else -np.inf
    wm = np.log(lam) if lam > 0.0 else -np.inf
    for r in range(3 if has_mem else 1):
        _fill_row(base, mem, r, n, lam, lzb, lzm, scratch)
        v = _exact(base, mem, r, token, lzb, lzm, wb, wm)
        v32 = scratch[token]
        ahead = 0
        for i in range(n):
            d = scratch[i] - v32
            if d > _NEAR:
                ahead += 1
            elif d >= -_NEAR and i != token:
                ahead += _ahead(_exact(base, mem, r, i, lzb, lzm, wb, wm), i, v, token)
        size = 0
        for i in range(n):
            if size < k or scratch[i] >= top_logp[r, k - 1]:
                size = _keep_top(top_ids[r], top_logp[r], size, k, i, np.float64(scratch[i]))
        for j in range(k):  # exact values, kept best first (float32 near-ties may swap)
            i = top_ids[r, j]
            w = _exact(base, mem, r, i, lzb, lzm, wb, wm)
            m = j
            while m > 0 and _ahead(w, i, top_logp[r, m - 1], top_ids[r, m - 1]):
                top_ids[r, m] = top_ids[r, m - 1]
                top_logp[r, m] = top_logp[r, m - 1]
                m -= 1
            top_ids[r, m] = i
            top_logp[r, m] = w
        chosen_logp[r] = v
        chosen_rank[r] = ahead + 1
    if not has_mem:
        chosen_logp[MIX] = chosen_logp[BASE]
        chosen_rank[MIX] = chosen_rank[BASE]
        top_ids[MIX, :] = top_ids[BASE, :]
        top_logp[MIX, :] = top_logp[BASE, :]
