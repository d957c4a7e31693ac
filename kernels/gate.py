"""Entropies of logit rows and the gated lambda they give (edge_memdec.lambda_gate).

H = log Z - sum_i (x_i - m) e^(x_i - m) / Z with m the row maximum and Z = sum_i e^(x_i - m): one pass of
float32 exps with float64 block totals, as sum_exp_f32 (nats; absolute error ~1e-6, plenty for a gate).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .fastmath import ELEMENTWISE, REDUCTION, exp_f32, jit
from .rows import row_max

_BLOCK = 512


@jit(fastmath=REDUCTION)
def row_entropy(row, n):
    """Entropy (nats, float64) of softmax(row[:n])."""
    top = row_max(row, n)
    z = 0.0
    t = 0.0
    for start in range(0, n, _BLOCK):
        block = row[start : min(start + _BLOCK, n)]
        zp = np.float32(0.0)
        tp = np.float32(0.0)
        for i in range(block.shape[0]):
            d = block[i] - top
            e = exp_f32(d)
            zp += e
            tp += d * e
        z += zp
        t += tp
    return np.log(z) - t / z


@jit(fastmath=ELEMENTWISE)
def gate_factor(h_base, h_mem, base_slope, slope, offset):
    """sigmoid(base_slope * h_base - slope * h_mem + offset) in float64."""
    z = base_slope * h_base - slope * h_mem + offset
    if z < -700.0:
        return 0.0
    return 1.0 / (1.0 + np.exp(-z))


@jit(fastmath=ELEMENTWISE)
def gated_lambda_core(base, mem, n, lam, base_slope, slope, offset):
    """lam * gate_factor of the two rows' entropies over their first n ids."""
    if lam == 0.0:
        return 0.0
    return lam * gate_factor(row_entropy(base, n), row_entropy(mem, n), base_slope, slope, offset)


@jit(parallel=True, fastmath=ELEMENTWISE)
def gate_factors_core(base, mem, n, base_slope, slope, offset, out):
    """out[r] = gate_factor of rows base[r] and mem[r] (float64 [rows])."""
    for r in prange(base.shape[0]):
        out[r] = gate_factor(row_entropy(base[r], n), row_entropy(mem[r], n), base_slope, slope, offset)


@jit(parallel=True, fastmath=ELEMENTWISE)
def entropies_core(rows, n, out):
    """out[r] = row_entropy(rows[r], n) (float64 [rows])."""
    for r in prange(rows.shape[0]):
        out[r] = row_entropy(rows[r], n)
