"""The mixture p = lam * softmax(mem) + (1 - lam) * softmax(base) over the shared ids, in log space.

A token's mixed log-prob is logaddexp(x, y) with x = (base - max_base) + cb and y = (mem - max_mem) + cm,
where cb = log(1 - lam) - log Z_base and cm = log(lam) - log Z_mem (Z: the softmax normaliser of the
max-shifted row). Subtracting the row maximum first keeps x and y exact near the head even for logits in the
thousands.
lam == 0 and lam == 1 never touch the unused row, so no log(0) appears and the result is exactly one model's.

Several memory decoders are mixed first, into one row (`blend_into`, chained), which then mixes with the base.
"""

from __future__ import annotations

import numpy as np

from .fastmath import ELEMENTWISE, jit
from .rows import mix_key, row_max, sum_exp_f32


@jit(fastmath=ELEMENTWISE)
def mixture_constants(base, mem, n, lam, mb, mm, normalise):
    """(cb, cm) as float64 for rows whose maxima are mb and mm; an unused row (lam 0 or 1) gets -inf.

    With normalise False and a single model, cb (or cm) is 0: keys are then max-shifted logits, which order
    the tokens like log-probs without a pass of exps.
    """
    cb = -np.inf
    cm = -np.inf
    if lam < 1.0:
        cb = np.log1p(-lam)
        if normalise or lam > 0.0:
            cb -= np.log(sum_exp_f32(base, n, mb))
    if lam > 0.0:
        cm = np.log(lam)
        if normalise or lam < 1.0:
            cm -= np.log(sum_exp_f32(mem, n, mm))
    return cb, cm


@jit(fastmath=ELEMENTWISE)
def mix_into(base, mem, n, lam, out):
    """out[:n] = log(lam * softmax(mem[:n]) + (1 - lam) * softmax(base[:n])) as float32."""
    mb = row_max(base, n) if lam < 1.0 else np.float32(0.0)
    mm = row_max(mem, n) if lam > 0.0 else np.float32(0.0)
    cb, cm = mixture_constants(base, mem, n, lam, mb, mm, True)
    cb32, cm32 = np.float32(cb), np.float32(cm)
    if lam == 0.0:
        for i in range(n):
            out[i] = (base[i] - mb) + cb32
    elif lam == 1.0:
        for i in range(n):
            out[i] = (mem[i] - mm) + cm32
    else:
        for i in range(n):
            out[i] = mix_key((base[i] - mb) + cb32, (mem[i] - mm) + cm32)


@jit(fastmath=ELEMENTWISE)
def blend_into(a, b, n, w, out):
    """out[:n] = log((1 - w) * softmax(a[:n]) + w * softmax(b[:n])) + (1 - w) * lse(a[:n]) + w * lse(b[:n]).

    The mixture of two memory decoders as logits: its log-normaliser (lse) is the w-weighted mean of the two
    rows' own, so chaining it over several decoders gives the logits whose normaliser is their lambda-weighted
    mean (what adjust.py's penalties read). `out` may be `a`: each entry is read before it is written.
    """
    if w == 0.0:
        for i in range(n):
            out[i] = a[i]
        return
    if w == 1.0:
        for i in range(n):
            out[i] = b[i]
        return
    ma = row_max(a, n)
    mb = row_max(b, n)
    ca, cb = mixture_constants(a, b, n, w, ma, mb, True)  # log1p(-w) - log Z_a, log(w) - log Z_b
    shift = (1.0 - w) * (np.float64(ma) + np.log1p(-w) - ca) + w * (np.float64(mb) + np.log(w) - cb)
    ca32, cb32, shift32 = np.float32(ca), np.float32(cb), np.float32(shift)
    for i in range(n):
        out[i] = mix_key((a[i] - ma) + ca32, (b[i] - mb) + cb32) + shift32
