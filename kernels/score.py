"""Per-row negative log-likelihoods of target tokens for base, memory decoder and a list of lambdas.

Only each row's log-sum-exp and its target's logit are needed, so no [rows, vocab] temporary is built; the
log-sum-exp is float64 throughout (vectorized exp_f64), rows run in parallel.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .fastmath import ELEMENTWISE, jit
from .rows import mix_key_f64, row_max, sum_exp_f64


@jit(fastmath=ELEMENTWISE)
def _row_nll(row, n, target):
    """-log softmax(row[:n])[target], natural log."""
    top = np.float64(row_max(row, n))
    return top + np.log(sum_exp_f64(row, n, top)) - np.float64(row[target])


@jit(parallel=True, fastmath=ELEMENTWISE)
def score_core(base, mem, has_mem, n, targets, lambdas, nll_base, nll_mem, nll_mix):
    """Fill nll_base [rows], nll_mem [rows] and nll_mix [rows, L] (float64) over the first n ids of each row.

    Without a memory decoder (has_mem False, mem ignored) nll_mem is NaN and every mixture column is the base.
    """
    for r in prange(base.shape[0]):
        nb = _row_nll(base[r], n, targets[r])
        nll_base[r] = nb
        nm = _row_nll(mem[r], n, targets[r]) if has_mem else np.nan
        nll_mem[r] = nm
        for j in range(lambdas.shape[0]):
            lam = lambdas[j]
            if not has_mem or lam == 0.0:
                nll_mix[r, j] = nb
            elif lam == 1.0:
                nll_mix[r, j] = nm
            else:
                nll_mix[r, j] = -mix_key_f64(np.log1p(-lam) - nb, np.log(lam) - nm)
