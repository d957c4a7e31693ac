"""Python entry points of the kernels: argument checks (ValueError: these are internal), then one jitted call.

Logit rows are float32 (numpy views over llama.cpp's buffers are used as they are, never written); the two
rows may differ in length and only the n = min(len(base), len(mem)) shared ids are mixed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edge_memdec.defaults import check_lambda

from .adjust import base_only_offsets
from .gate import entropies_core, gate_factors_core, gated_lambda_core
from .mixture import blend_into, mix_into
from .sample import sample_core
from .score import score_core
from .trace import trace_core


def _row(logits: np.ndarray, name: str) -> np.ndarray:
    row = np.ascontiguousarray(logits, dtype=np.float32)
    if row.ndim != 1 or row.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 1-D row of logits, got shape {row.shape}")
    return row


def _lambda(lam: float) -> float:
    return check_lambda(lam, ValueError)


def make_scratch(n_vocab: int) -> np.ndarray:
    """A float32 work buffer for sample_token over rows of up to n_vocab shared ids (allocate once, reuse)."""
    return np.empty(max(int(n_vocab), 1), np.float32)


def mix_logprobs(
    base_logits: np.ndarray, mem_logits: np.ndarray | None, lam: float, out: np.ndarray | None = None
) -> np.ndarray:
    """Mixed log-probs log(lam * softmax(mem) + (1 - lam) * softmax(base)), float32 [n], natural log.

    mem_logits None means the base alone (its log-softmax). `out`, if given, is a float32 array of at least n
    entries; the result is its first n.
    """
    base = _row(base_logits, "base_logits")
    mem, lam = (base, 0.0) if mem_logits is None else (_row(mem_logits, "mem_logits"), _lambda(lam))
    n = min(base.shape[0], mem.shape[0])
    if out is None:
        out = np.empty(n, np.float32)
    elif out.dtype != np.float32 or out.ndim != 1 or out.shape[0] < n or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of at least {n} entries")
    mix_into(base, mem, n, lam, out)
    return out[:n]


def mix_decoders(mem_logits: Sequence[np.ndarray], weights: Sequence[float], out: np.ndarray) -> np.ndarray:
    """Several memory decoders' logit rows as one: log sum_i w_i softmax(row_i) + sum_i w_i lse(row_i), float32
    [n] over the n shared ids, with w_i = weights[i] / sum(weights).

    The result is the decoders' mixture as logits (their lambda-weighted mean log-normaliser, see
    mixture.blend_into): mixed with the base at lam = sum(lambda_i) it gives sum_i lambda_i p_i + (1 - lam)
    p_base exactly, and one decoder given twice is that decoder's row. weights: at least two, each above 0;
    `out`: a contiguous float32 array of at least n entries, the result is its first n.
    """
    rows = [_row(row, "mem_logits") for row in mem_logits]
    w = [float(x) for x in weights]
    if len(rows) < 2 or len(w) != len(rows) or not all(x > 0.0 for x in w):
        raise ValueError(f"mix_decoders takes two or more rows, each with a weight above 0, got {len(rows)} rows and {w}")
    n = min(row.shape[0] for row in rows)
    if out.dtype != np.float32 or out.ndim != 1 or out.shape[0] < n or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of at least {n} entries")
    total = w[0] + w[1]
    blend_into(rows[0], rows[1], n, w[1] / total, out)
    for row, weight in zip(rows[2:], w[2:], strict=True):
        total += weight
        blend_into(out, row, n, weight / total, out)
    return out[:n]


_NO_IDS = np.empty(0, np.int64)
_NO_VALUES = np.empty(0, np.float64)


def sample_token(
    base_logits: np.ndarray,
    mem_logits: np.ndarray | None,
    lam: float,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    u: float,
    scratch: np.ndarray,
    recent: np.ndarray | None = None,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    logit_bias: tuple[np.ndarray, np.ndarray] | None = None,
) -> int:
    """Token id drawn from the lam-mixture after logit bias and penalties, top-k, top-p, min-p and temperature
    (see kernels/sample.py and kernels/adjust.py).

    u: a uniform number in [0, 1) (the caller's seeded generator makes runs reproducible); temperature <= 0 is
    greedy. scratch: from make_scratch(n) or any contiguous float32 array of at least n entries.
    mem_logits None means the base alone. recent: the token ids the penalties count (llama.cpp's last
    repeat_last_n tokens); logit_bias: (ids, values) from make_logit_bias.
    """
    base = _row(base_logits, "base_logits")
    mem, lam = (base, 0.0) if mem_logits is None else (_row(mem_logits, "mem_logits"), _lambda(lam))
    n = min(base.shape[0], mem.shape[0])
    if (
        scratch.dtype != np.float32
        or scratch.ndim != 1
        or scratch.shape[0] < n
        or not scratch.flags.c_contiguous
    ):
        raise ValueError(f"scratch must be a contiguous float32 array of at least {n} entries (make_scratch)")
    u = float(u)
    if not 0.0 <= u < 1.0:
        raise ValueError(f"u must be in [0, 1), got {u}")
    if not repeat_penalty > 0.0:
        raise ValueError(f"repeat_penalty must be above 0, got {repeat_penalty}")
    recent = _NO_IDS if recent is None else np.ascontiguousarray(recent, dtype=np.int64)
    bias_ids, bias = (_NO_IDS, _NO_VALUES) if logit_bias is None else logit_bias
    bias_ids = np.ascontiguousarray(bias_ids, dtype=np.int64)
    bias = np.ascontiguousarray(bias, dtype=np.float64)
    return int(
        sample_core(
            base, mem, lam, float(temperature), int(top_k), float(top_p), float(min_p), u, scratch,
            recent, bias_ids, bias, float(repeat_penalty), float(frequency_penalty), float(presence_penalty),
        )  # fmt: skip
    )


def make_logit_bias(bias: Mapping[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """{token id: bias added to the mixture's logits} as the sorted (ids int64, values float64) sample_token
    takes; build it once per request. Values must be finite."""
    ids = np.array(sorted(bias), np.int64)
    values = np.array([float(bias[int(i)]) for i in ids], np.float64)
    if not np.isfinite(values).all():
        raise ValueError("logit bias values must be finite numbers")
    return ids, values


def score_rows(
    base_logits: np.ndarray,
    mem_logits: np.ndarray | None,
    targets: np.ndarray,
    lambdas: np.ndarray,
    n_ids: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Negative log-likelihoods (natural log, float64) of targets[r] under row r of each model and mixture.

    base_logits [rows, vb] and mem_logits [rows, vm] float32 (mem None: base only), targets [rows] ints below
    n = min(vb, vm, n_ids), lambdas [L] in [0, 1]. Returns (nll_base [rows], nll_mem [rows], nll_mix [rows, L]);
    softmaxes run over the n shared ids (`n_ids`: fewer, e.g. the ids a third model shares too). Without a
    memory decoder nll_mem is NaN and nll_mix repeats nll_base.
    """
    base = np.ascontiguousarray(base_logits, dtype=np.float32)
    if base.ndim != 2:
        raise ValueError(f"base_logits must be 2-D [rows, vocab], got shape {base.shape}")
    rows = base.shape[0]
    has_mem = mem_logits is not None
    mem = np.ascontiguousarray(mem_logits, dtype=np.float32) if has_mem else base
    if mem.ndim != 2 or mem.shape[0] != rows:
        raise ValueError(f"mem_logits must be 2-D with {rows} rows like base_logits, got shape {mem.shape}")
    n = min(base.shape[1], mem.shape[1], base.shape[1] if n_ids is None else int(n_ids))
    targets = np.ascontiguousarray(targets, dtype=np.int64)
    if targets.shape != (rows,):
        raise ValueError(f"targets must have shape ({rows},), got {targets.shape}")
    if rows and (targets.min() < 0 or targets.max() >= n):
        raise ValueError(f"targets must be token ids in [0, {n}), got {targets.min()}..{targets.max()}")
    lambdas = np.ascontiguousarray(lambdas, dtype=np.float64).reshape(-1)
    for lam in lambdas.tolist():
        _lambda(lam)
    nll_base = np.empty(rows)
    nll_mem = np.empty(rows)
    nll_mix = np.empty((rows, lambdas.shape[0]))
    if rows and n:
        score_core(base, mem, has_mem, n, targets, lambdas, nll_base, nll_mem, nll_mix)
    return nll_base, nll_mem, nll_mix


def trace_token(
    base_logits: np.ndarray, mem_logits: np.ndarray | None, lam: float, token: int, top_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How the base, the memory decoder and their lam-mixture rate `token` (see kernels/trace.py).

    Returns (top_ids int64 [3, k], top_logp float64 [3, k], chosen_logp float64 [3], chosen_rank int64 [3]),
    rows base, memory decoder, mixture; k = min(max(top_n, 1), n). Natural-log probabilities over the
    n = min(len(base), len(mem)) shared ids; ranks from 1. Without mem_logits the memory decoder's row is
    NaN / -1 and the mixture's repeats the base's.
    """
    base = _row(base_logits, "base_logits")
    has_mem = mem_logits is not None
    mem, lam = (_row(mem_logits, "mem_logits"), _lambda(lam)) if has_mem else (base, 0.0)
    n = min(base.shape[0], mem.shape[0])
    if not 0 <= token < n:
        raise ValueError(f"token must be an id in [0, {n}), got {token}")
    k = min(max(int(top_n), 1), n)
    top_ids = np.full((3, k), -1, np.int64)
    top_logp = np.full((3, k), np.nan)
    chosen_logp = np.full(3, np.nan)
    chosen_rank = np.full(3, -1, np.int64)
    scratch = np.empty(n, np.float32)
    trace_core(base, mem, has_mem, n, lam, int(token), scratch, top_ids, top_logp, chosen_logp, chosen_rank)
    return top_ids, top_logp, chosen_logp, chosen_rank


def base_only_bias(base_logits: np.ndarray, mem_logits: np.ndarray, lam: float, ids: np.ndarray) -> np.ndarray:
    """Log-offsets (float64 [len(ids)]) that, added to the lam-mixture's logits at the sorted unique `ids`
    (as sample_token's logit bias), give those tokens the base's own probability: lambda 0 for them.
    lam must be in (0, 1]; 0 where an id is outside the shared vocabulary."""
    base, mem = _row(base_logits, "base_logits"), _row(mem_logits, "mem_logits")
    lam = _lambda(lam)
    if lam == 0.0:
        raise ValueError("base_only_bias needs lambda above 0 (at 0 every token is the base's already)")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    out = np.empty(ids.shape[0])
    base_only_offsets(base, mem, min(base.shape[0], mem.shape[0]), lam, ids, out)
    return out


def gated_lambda(
    base_logits: np.ndarray, mem_logits: np.ndarray, lam: float, slope: float, offset: float,
    base_slope: float | None = None,
) -> float:
    """lam * sigmoid(base_slope * H_base - slope * H_mem + offset) (base_slope None: slope): the entropy-gated
    weight of one token (see edge_memdec.lambda_gate); H in nats over the n = min(len(base), len(mem)) shared
    ids of the float32 rows."""
    base, mem = _row(base_logits, "base_logits"), _row(mem_logits, "mem_logits")
    lam, n = _lambda(lam), min(base.shape[0], mem.shape[0])
    base_slope = slope if base_slope is None else base_slope
    return float(gated_lambda_core(base, mem, n, lam, float(base_slope), float(slope), float(offset)))


def gate_factors(
    base_logits: np.ndarray, mem_logits: np.ndarray, slope: float, offset: float, n_ids: int | None = None,
    base_slope: float | None = None,
) -> np.ndarray:
    """sigmoid(base_slope * H_base - slope * H_mem + offset) (base_slope None: slope) per row (float64 [rows]) of
    base_logits [rows, vb] and mem_logits [rows, vm] (float32), entropies over the first n = min(vb, vm, n_ids)
    ids; lambda_t / lambda."""
    base = np.ascontiguousarray(base_logits, dtype=np.float32)
    mem = np.ascontiguousarray(mem_logits, dtype=np.float32)
    if base.ndim != 2 or mem.ndim != 2 or base.shape[0] != mem.shape[0]:
        raise ValueError(f"base and mem logits must be 2-D with equal rows, got {base.shape} and {mem.shape}")
    n = min(base.shape[1], mem.shape[1], base.shape[1] if n_ids is None else int(n_ids))
    out = np.empty(base.shape[0])
    if base.shape[0] and n:
        base_slope = slope if base_slope is None else base_slope
        gate_factors_core(base, mem, n, float(base_slope), float(slope), float(offset), out)
    return out


def row_entropies(logits: np.ndarray, n_ids: int | None = None) -> np.ndarray:
    """Entropy (nats, float64 [rows]) of softmax over the first n_ids ids (default all) of each float32 row."""
    rows = np.ascontiguousarray(logits, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"logits must be 2-D [rows, vocab], got shape {rows.shape}")
    n = rows.shape[1] if n_ids is None else min(int(n_ids), rows.shape[1])
    out = np.empty(rows.shape[0])
    if rows.shape[0] and n:
        entropies_core(rows, n, out)
    return out
