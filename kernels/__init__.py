"""numba kernels of the memory-decoder runtime: mix two logit rows, sample a token, score many rows.

All are compiled with cache=True: the machine code lands in __pycache__ next to these files (numba falls back
to a user cache directory when that is not writable), so only the first process on a machine pays the JIT.
numba keys each cache entry on its own source file only: after editing a kernel, delete kernels/__pycache__ or
kernels that call the edited one keep running the old code.
"""

from __future__ import annotations

import sys

import numpy as np

from .api import (
    base_only_bias,
    gate_factors,
    gated_lambda,
    make_logit_bias,
    make_scratch,
    mix_decoders,
    mix_logprobs,
    row_entropies,
    sample_token,
    score_rows,
    trace_token,
)

__all__ = [
    "base_only_bias",
    "gate_factors",
    "gated_lambda",
    "make_logit_bias",
    "make_scratch",
    "mix_decoders",
    "mix_logprobs",
    "row_entropies",
    "sample_token",
    "score_rows",
    "trace_token",
    "warmup",
]


def warmup(skip_blas_probe: bool = False) -> None:
    """Compile (or load from the cache) every kernel for the argument types the runtime passes.

    With `skip_blas_probe` (the CLI's own process), numba's first dispatch is kept from probing for BLAS by
    importing scipy.linalg (~0.4 s of a ~2.4 s start): the probe fails fast while the kernels load, numba falls
    back to its plain-loop inner product (used only by np.cov-style helpers, which no kernel calls), and later
    scipy imports work normally. Library users keep numba's default: another thread of theirs might import
    scipy.linalg meanwhile.
    """
    blocked = (
        skip_blas_probe and "scipy.linalg" not in sys.modules and "numba.np.arraymath" not in sys.modules
    )
    if blocked:
        sys.modules.setdefault("scipy.linalg.cython_blas", None)  # an import of it raises ModuleNotFoundError
    try:
        _compile_all()
    finally:
        if blocked and sys.modules.get("scipy.linalg.cython_blas", 0) is None:
            del sys.modules["scipy.linalg.cython_blas"]


def _compile_all() -> None:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(130).astype(np.float32)
    mem = rng.standard_normal(128).astype(np.float32)
    mix_logprobs(base, mem, 0.5)
    mix_decoders([mem, base], [0.3, 0.2], np.empty(128, np.float32))
    sample_token(base, mem, 0.5, 0.8, 40, 0.95, 0.05, 0.5, make_scratch(128))
    score_rows(base[None, :], mem[None, :], np.zeros(1, np.int64), np.array([0.0, 0.5, 1.0]))
    trace_token(base, mem, 0.5, 3, 5)
    trace_token(base, None, 0.0, 3, 5)
    base_only_bias(base, mem, 0.5, np.array([1, 2], np.int64))
    gated_lambda(base, mem, 0.5, 1.0, 0.0)
    gate_factors(base[None, :128], mem[None, :], 1.0, 0.0)
    row_entropies(mem[None, :])
