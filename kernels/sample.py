"""One decode step from two logit rows to a token: mix, logit bias and penalties, top-k, top-p, min-p,
temperature, draw.

Logit bias and the repetition penalties move a few tokens of the mixture first (adjust.py). The filters
then run in the order of llama.cpp's common sampler chain (top-k, top-p, min-p, then temperature), each on
the mixed distribution left by the previous one, as llama.cpp does:
- top-k keeps the k most probable tokens (k <= 0 or k >= n: off);
- top-p keeps the shortest most-probable prefix whose probability, renormalised over the tokens still kept,
  reaches top_p (the token that crosses it included; top_p >= 1: off);
- min-p keeps the tokens with p >= min_p * p_max (min_p <= 0: off);
- temperature T turns the kept probabilities into p^(1/T), renormalised; T <= 0 (or below float32's range) is
  greedy: the argmax of the mixture (ties to the lowest id), whatever the filters.
The draw is the inverse CDF at u: kept tokens in increasing id order, the first whose cumulative weight
exceeds u * total. Probability ties in top-k and top-p go to the lower id.

With top-k or top-p on, only a head of the distribution is materialised (head.py); its log-probs are
recomputed in float64 for the filters and the draw. With neither, one pass writes every token's weight into
`scratch`.
"""

from __future__ import annotations

import numpy as np

from .adjust import offset_at, token_offsets
from .fastmath import ELEMENTWISE, REDUCTION, exp_f32, jit
from .head import chunk_keys, select_head
from .mixture import mixture_constants
from .rows import CHUNK, NEG_INF32, chunk_maxima, mix_key_f64

_FIRST_HEAD = 64  # head size tried first when top-p runs without top-k; grown 8x until it holds top_p
_HEAD_GROWTH = 8
_DRAW_BLOCK = 512
_MIN_KEPT_MASS = 1e-3  # top-p against the adjusted total only while bias/penalties leave this much of it


@jit(fastmath=ELEMENTWISE)
def _head_logprobs(base, mem, ids, size, mb, mm, cb, cm, moved, offsets, out):
    """float64 mixed log-probs of the head (one model unnormalised: up to a shared constant), offsets added."""
    for j in range(size):
        i = ids[j]
        x = (np.float64(base[i]) - mb) + cb
        y = (np.float64(mem[i]) - mm) + cm
        out[j] = mix_key_f64(x, y) + offset_at(moved, offsets, i)


@jit(fastmath=ELEMENTWISE)
def _top_p_cut(logp, size, top_p, absolute):
    """How many head tokens top-p keeps; -1 when an absolute head of this size cannot reach top_p."""
    if absolute:
        cum = 0.0
        for j in range(size):
            cum += np.exp(logp[j])
            if cum >= top_p:
                return j + 1
        return -1
    total = 0.0
    for j in range(size):
        total += np.exp(logp[j] - logp[0])
    cum = 0.0
    for j in range(size):
        cum += np.exp(logp[j] - logp[0])
        if cum >= top_p * total:
            return j + 1
    return size


@jit(fastmath=ELEMENTWISE)
def _draw_head(ids, logp, kept, min_p, temperature, u):
    """min-p, temperature and the inverse-CDF draw over the first `kept` head tokens (best first)."""
    floor = logp[0] + np.log(min_p) if min_p > 0.0 else -np.inf
    top = logp[0]
    order = np.argsort(ids[:kept])
    weights = np.zeros(kept)
    total = 0.0
    for j in range(kept):
        if j == 0 or logp[j] >= floor:
            weights[j] = np.exp((logp[j] - top) / temperature)
            total += weights[j]
    target = u * total
    cum = 0.0
    last = ids[0]
    for j in order:
        if weights[j] > 0.0:
            cum += weights[j]
            last = ids[j]
            if cum > target:
                return last
    return last


@jit(fastmath=REDUCTION)
def _block_sum(block):
    part = np.float32(0.0)
    for i in range(block.shape[0]):
        part += block[i]
    return np.float64(part)


@jit(fastmath=ELEMENTWISE)
def _draw_full(base, mem, n, mb, mm, cb, cm, moved, offsets, top, min_p, temperature, u, scratch):
    """min-p, temperature and the draw over every id < n; scratch[:n] receives the weights."""
    floor = top + np.float32(np.log(min_p)) if min_p > 0.0 else NEG_INF32
    t32 = np.float32(temperature)
    total = 0.0
    for start in range(0, n, _DRAW_BLOCK):
        stop = min(start + _DRAW_BLOCK, n)
        block = scratch[start:stop]
        chunk_keys(base, mem, start, stop, mb, mm, cb, cm, moved, offsets, block)
        for j in range(block.shape[0]):
            key = block[j]
            block[j] = exp_f32((key - top) / t32) if key >= floor else np.float32(0.0)
        total += _block_sum(block)
    target = u * total
    cum = 0.0
    last = -1
    for start in range(0, n, _DRAW_BLOCK):
        stop = min(start + _DRAW_BLOCK, n)
        part = _block_sum(scratch[start:stop])
        if cum + part <= target and last < 0:
            cum += part
            continue
        for i in range(start, stop):
            w = scratch[i]
            if w > 0.0:
                last = i
                cum += w
                if cum > target:
                    return i
    return last


@jit(fastmath=ELEMENTWISE)
def sample_core(
    base, mem, lam, temperature, top_k, top_p, min_p, u, scratch, recent, bias_ids, bias, repeat, frequency, presence
):
    """The token id drawn from the lam-mixture of two logit rows (module docstring); scratch: >= n floats.

    recent, bias_ids, bias, repeat, frequency, presence: the logit bias and penalties of adjust.py.
    """
    n = min(base.shape[0], mem.shape[0])
    n_chunks = (n + CHUNK - 1) // CHUNK
    chunk_max = (
        scratch[: 2 * n_chunks] if scratch.shape[0] >= 2 * n_chunks else np.empty(2 * n_chunks, np.float32)
    )
    base_chunk_max = chunk_max[:n_chunks]
    mem_chunk_max = chunk_max[n_chunks:]
    mb = chunk_maxima(base, n, base_chunk_max) if lam < 1.0 else np.float32(0.0)
    mm = chunk_maxima(mem, n, mem_chunk_max) if lam > 0.0 else np.float32(0.0)
    greedy = np.float32(temperature) <= 0.0 or top_k == 1
    top_k_on = 0 < top_k < n
    top_p_on = top_p < 1.0 and not greedy
    absolute = top_p_on and not top_k_on
    cb, cm = mixture_constants(base, mem, n, lam, mb, mm, absolute)
    cb32, cm32 = np.float32(cb), np.float32(cm)
    moved, offsets, mass = token_offsets(
        base, mem, n, lam, mb, mm, cb, cm, recent, bias_ids, bias, repeat, frequency, presence
    )
    cut = top_p
    if absolute:
        total = 1.0 + mass  # the keys' total after the offsets (they were normalised log-probs)
        if total >= _MIN_KEPT_MASS:
            cut = top_p * total
        else:  # too little is left to trust the total: top-p over one head of all n ids
            absolute = False

    if greedy or not (top_k_on or top_p_on):
        keys = np.empty(1, np.float32)
        ids = np.empty(1, np.int64)
        select_head(base, mem, n, mb, mm, cb32, cm32, base_chunk_max, mem_chunk_max, moved, offsets, keys, ids)
        if greedy:
            return ids[0]
        return _draw_full(
            base, mem, n, mb, mm, cb32, cm32, moved, offsets, keys[0], min_p, temperature, u, scratch
        )

    h = top_k if top_k_on else (min(n, _FIRST_HEAD) if absolute else n)
    while True:
        keys = np.empty(h, np.float32)
        ids = np.empty(h, np.int64)
        size = select_head(
            base, mem, n, mb, mm, cb32, cm32, base_chunk_max, mem_chunk_max, moved, offsets, keys, ids
        )
        logp = np.empty(size)
        _head_logprobs(base, mem, ids, size, mb, mm, cb, cm, moved, offsets, logp)
        kept = size
        if top_p_on:
            whole = not absolute or size == n  # then top-p renormalises over this head
            kept = _top_p_cut(logp, size, top_p if whole else cut, not whole)
        if kept > 0:
            return _draw_head(ids, logp, kept, min_p, temperature, u)
        h = min(n, h * _HEAD_GROWTH)
