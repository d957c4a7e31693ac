"""Branch-free exp and log1p that LLVM can vectorize (no SVML here: numba's own exp/log stay scalar).

`exp_f32` and `log1p_f32` work on float32 lanes (relative error <= 4e-7 on their domains), `exp_f64` on
float64 lanes (relative error <= 3e-16); tests/test_kernels.py checks these bounds. Each exp is a Cody-Waite
range reduction x = k ln2 + r, |r| <= ln2/2, a polynomial for exp(r), and 2^k built from its IEEE bits.

The fast-math flag sets: `ELEMENTWISE` leaves out `reassoc` so the range reduction and the callers'
`(logit - max) + constant` keep their evaluation order; `REDUCTION` adds it so sums vectorize; `MAXIMUM`
(row maxima only) also assumes no NaN. None assumes finite values (`ninf`): a -inf logit stays legal; NaN
logits are not supported.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

# Every kernel: cached machine code, and numpy's error model (no ZeroDivisionError branch, which would
# stop LLVM from vectorizing any loop that divides).
jit = partial(njit, cache=True, error_model="numpy")

ELEMENTWISE = {"contract", "nsz", "arcp", "afn"}
REDUCTION = ELEMENTWISE | {"reassoc"}
MAXIMUM = REDUCTION | {"nnan"}

_F32 = np.float32
_ONE32 = _F32(1.0)
_HALF32 = _F32(0.5)
_LOG2E32 = _F32(1.4426950408889634)
_LN2_HI32 = _F32(0.693145751953125)  # ln 2 split so k * hi is exact for |k| < 2^11
_LN2_LO32 = _F32(1.428606765330187e-06)
_EXP_MIN32 = _F32(-87.0)  # exp(-87) = 1.6e-38, the smallest normal float32 is 1.2e-38
_E2, _E3, _E4, _E5, _E6, _E7 = (_F32(1.0 / math.factorial(i)) for i in range(2, 8))
_TWO32 = _F32(2.0)
_L3, _L5, _L7, _L9, _L11, _L13 = (_F32(1.0 / d) for d in (3, 5, 7, 9, 11, 13))

_LOG2E64 = 1.4426950408889634
_LN2_HI64 = 6.93147180369123816490e-01  # fdlibm's split of ln 2
_LN2_LO64 = 1.90821492927058770002e-10
_EXP_MIN64 = -708.0
_Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9, _Q10, _Q11, _Q12, _Q13 = (
    1.0 / math.factorial(i) for i in range(2, 14)
)


@intrinsic
def _int32_as_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (an LLVM bitcast, free in a vector lane)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _int64_as_float64(typingctx, bits):
    """Reinterpret the bits of an integer (as int64) as a float64."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@jit(fastmath=ELEMENTWISE, inline="always")
def exp_f32(x):
    """exp(x) for float32 x <= 0; inputs below -87 (and -inf) give exp(-87) = 1.6e-38 instead of 0."""
    x = max(x, _EXP_MIN32)
    k = np.floor(x * _LOG2E32 + _HALF32)
    r = x - k * _LN2_HI32 - k * _LN2_LO32
    p = _ONE32 + r * (_ONE32 + r * (_E2 + r * (_E3 + r * (_E4 + r * (_E5 + r * (_E6 + r * _E7))))))
    return p * _int32_as_float32((np.int32(k) + np.int32(127)) << np.int32(23))


@jit(fastmath=ELEMENTWISE, inline="always")
def log1p_f32(e):
    """log(1 + e) for float32 e in [0, 1], as 2 atanh(e / (2 + e)) by its odd series (s <= 1/3)."""
    s = e / (_TWO32 + e)
    z = s * s
    return _TWO32 * s * (_ONE32 + z * (_L3 + z * (_L5 + z * (_L7 + z * (_L9 + z * (_L11 + z * _L13))))))


@jit(fastmath=ELEMENTWISE, inline="always")
def exp_f64(x):
    """exp(x) for float64 x <= 0; inputs below -708 (and -inf) give exp(-708) = 3.3e-308 instead of 0."""
    x = max(x, _EXP_MIN64)
    k = np.floor(x * _LOG2E64 + 0.5)
    r = x - k * _LN2_HI64 - k * _LN2_LO64
    p = _Q10 + r * (_Q11 + r * (_Q12 + r * _Q13))
    p = 1.0 + r * (
        1.0
        + r
        * (_Q2 + r * (_Q3 + r * (_Q4 + r * (_Q5 + r * (_Q6 + r * (_Q7 + r * (_Q8 + r * (_Q9 + r * p))))))))
    )
    return p * _int64_as_float64((np.int64(k) + np.int64(1023)) << np.int64(52))


@intrinsic
def fmax_f32(typingctx, a, b):
    """max(a, b) of two float32 as LLVM's maxnum, which the vectorizer turns into vmaxps reductions."""
    if not (a == types.float32 and b == types.float32):
        return None

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ir.FloatType()], fnty)
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32), codegen
