"""Logit bias and llama.cpp's repetition penalties, applied to the mixture as per-token offsets of its keys.

The mixture has no logits of its own, so it gets some: its log-probs plus the lambda-weighted mean of the two
models' log-normalisers, z = log p_mix + (1 - lam) * logsumexp(base) + lam * logsumexp(mem) (over the shared
ids). At lam 0 these are the base's logits exactly, at lam 1 the memory decoder's, so every setting below
does what llama.cpp does to one model's logits; in between, a token both models find equally likely gets the
lam-weighted mean of its two logits. On z, in llama.cpp's order (its logit-bias sampler, then penalties):
- logit bias: z += bias[token];
- for a token seen c > 0 times among the recent tokens: z /= repeat if z > 0 else z *= repeat, then
  z -= c * frequency + presence.
Only these few tokens move: the sampler adds each one's offset (new z - old z) to its key, wherever keys are
computed. Tokens whose key is -inf stay -inf.
"""

from __future__ import annotations

import numpy as np

from .fastmath import ELEMENTWISE, jit
from .rows import mix_key_f64, row_max, sum_exp_f32

_TINY = 1e-300  # floor of 1 - P when a set of tokens holds (almost) all the probability


@jit(fastmath=ELEMENTWISE)
def _logit_shift(lam, mb, mm, cb, cm):
    """z - key for every token, from the mixture constants (keys are normalised or max-shifted log-probs)."""
    shift = 0.0
    if lam < 1.0:
        shift += (1.0 - lam) * (np.float64(mb) + np.log1p(-lam) - cb)
    if lam > 0.0:
        shift += lam * (np.float64(mm) + np.log(lam) - cm)
    return shift


@jit(fastmath=ELEMENTWISE)
def token_offsets(base, mem, n, lam, mb, mm, cb, cm, recent, bias_ids, bias, repeat, frequency, presence):
    """(ids, offsets, mass): the sorted ids < n whose key moves, by how much (float64, natural log), and
    sum(exp(key + offset) - exp(key)) over them, the change of the total when keys are normalised log-probs.

    recent: the token ids the penalties look at (any order, repeats counted); bias_ids: sorted unique ids
    with their bias values; cb, cm: float64 mixture constants (-inf for an unused row).
    """
    penalise = recent.shape[0] > 0 and (repeat != 1.0 or frequency != 0.0 or presence != 0.0)
    seen = np.sort(recent) if penalise else recent[:0]
    size = seen.shape[0] + bias_ids.shape[0]
    ids = np.empty(size, np.int64)
    offsets = np.empty(size)
    shift = _logit_shift(lam, mb, mm, cb, cm)
    mass = 0.0
    m = 0
    i = 0
    j = 0
    while i < seen.shape[0] or j < bias_ids.shape[0]:
        if j >= bias_ids.shape[0] or (i < seen.shape[0] and seen[i] < bias_ids[j]):
            token = seen[i]
        else:
            token = bias_ids[j]
        count = 0
        while i < seen.shape[0] and seen[i] == token:
            count += 1
            i += 1
        z_bias = 0.0
        if j < bias_ids.shape[0] and bias_ids[j] == token:
            z_bias = bias[j]
            j += 1
        if token < 0 or token >= n:
            continue
        key = mix_key_f64((np.float64(base[token]) - mb) + cb, (np.float64(mem[token]) - mm) + cm)
        if key == -np.inf:
            continue
        z = key + shift
        moved = z + z_bias
        if count > 0:
            moved = moved * repeat if moved <= 0.0 else moved / repeat
            moved -= count * frequency + presence
        ids[m] = token
        offsets[m] = moved - z
        mass += np.exp(key + offsets[m]) - np.exp(key)
        m += 1
    return ids[:m], offsets[:m], mass


@jit(fastmath=ELEMENTWISE)
def offset_at(ids, offsets, token):
    """The offset of `token` (0.0 when it does not move); ids sorted."""
    if ids.shape[0] == 0:
        return 0.0
    k = np.searchsorted(ids, token)
    return offsets[k] if k < ids.shape[0] and ids[k] == token else 0.0


@jit(fastmath=ELEMENTWISE)
def offset_keys(ids, offsets, start, stop, out):
    """out[t - start] += offset of t for the moved tokens start <= t < stop (out: float32 keys)."""
    if ids.shape[0] == 0:
        return
    k = np.searchsorted(ids, start)
    while k < ids.shape[0] and ids[k] < stop:
        out[ids[k] - start] += np.float32(offsets[k])
        k += 1


@jit(fastmath=ELEMENTWISE)
def offset_bounds(ids, offsets, floors, ceilings, chunk):
    """Widen per-chunk key bounds (head.py) by the offsets of the moved tokens in each chunk of `chunk` ids.

    Each token's key moves by at least min(0, lowest offset in its chunk) and at most max(0, highest), and
    float32 addition rounds monotonically, so the shifted bounds still hold for the keys as computed.
    """
    k = 0
    while k < ids.shape[0]:
        c = ids[k] // chunk
        low = 0.0
        high = 0.0
        while k < ids.shape[0] and ids[k] // chunk == c:
            low = min(low, offsets[k])
            high = max(high, offsets[k])
            k += 1
        floors[c] += np.float32(low)
        ceilings[c] += np.float32(high)


@jit(fastmath=ELEMENTWISE)
def base_only_offsets(base, mem, n, lam, ids, out):
    """out[j]: the offset that gives token ids[j] (sorted, unique) the base's own probability in the lam-mixture,
    the other tokens keeping their mixed ratios: lambda 0 on these tokens (e.g. the chat template's and EOS,
    which a memory decoder trained on plain domain text never saw). Ids >= n get 0.

    With P_base and P_mix the two probabilities of the whole set, token s gets
    log p_base(s) - log p_mix(s) + log(1 - P_mix) - log(1 - P_base): after renormalisation p(s) = p_base(s).
    """
    mb = row_max(base, n)
    mm = row_max(mem, n)
    lzb = np.float64(mb) + np.log(sum_exp_f32(base, n, mb))
    lzm = np.float64(mm) + np.log(sum_exp_f32(mem, n, mm))
    wb = np.log1p(-lam)
    wm = np.log(lam)
    mass_base = 0.0
    mass_mix = 0.0
    for j in range(ids.shape[0]):
        i = ids[j]
        if i >= n:
            out[j] = 0.0
            continue
        lb = np.float64(base[i]) - lzb
        lx = mix_key_f64(wb + lb, wm + (np.float64(mem[i]) - lzm))
        out[j] = lb - lx if lx > -np.inf else 0.0
        mass_base += np.exp(lb)
        mass_mix += np.exp(lx)
    rest = np.log(max(1.0 - mass_mix, _TINY)) - np.log(max(1.0 - mass_base, _TINY))
    for j in range(ids.shape[0]):
        if ids[j] < n:
            out[j] += rest
