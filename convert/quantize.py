"""Output types: how each tensor is encoded for an `--outtype`, and llama.cpp's quantizer for the K-quants.

The gguf package encodes f32, f16, bf16, q8_0, q5_1, q5_0, q4_1 and q4_0 directly; K-quants (q4_k_m, q5_k_m, q6_k) and
iq4_nl need llama.cpp's own quantizer with its per-tensor type mix, so those are made from an f32 GGUF written first.
iq4_nl (4.5 bits a weight on a non-uniform grid, blocks of 32) keeps 4-bit matrices whose rows are not a multiple of
256 (SmolLM2's 576), where llama.cpp stores q4_k_m's Q4_K matrices as Q5_0 and its Q6_K ones as Q8_0.
1-D tensors (norms, biases, rope factors) and GPT-2's position embedding stay f32, as llama.cpp's own quantizer
keeps them.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType, quants

from edge_memdec.errors import UserError

Q = GGMLQuantizationType


@dataclass(frozen=True)
class OutType:
    """One `--outtype`: the ggml type of 2-D tensors and the file type recorded in general.file_type."""

    tensor_type: GGMLQuantizationType
    file_type: LlamaFileType
    llama_ftype: int | None = None  # set when llama.cpp's quantizer makes the file from an f32 one


OUTTYPES = {
    "f32": OutType(Q.F32, LlamaFileType.ALL_F32),
    "f16": OutType(Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": OutType(Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": OutType(Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q5_1": OutType(Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "q5_0": OutType(Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q4_1": OutType(Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q4_0": OutType(Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": OutType(Q.F32, LlamaFileType.MOSTLY_Q4_K_M, int(LlamaFileType.MOSTLY_Q4_K_M)),
    "q5_k_m": OutType(Q.F32, LlamaFileType.MOSTLY_Q5_K_M, int(LlamaFileType.MOSTLY_Q5_K_M)),
    "q6_k": OutType(Q.F32, LlamaFileType.MOSTLY_Q6_K, int(LlamaFileType.MOSTLY_Q6_K)),
    "iq4_nl": OutType(Q.F32, LlamaFileType.MOSTLY_IQ4_NL, int(LlamaFileType.MOSTLY_IQ4_NL)),
}


def out_type(name: str) -> OutType:
    """The OutType for a user-given name, case-insensitive."""
    key = name.strip().lower()
    if key not in OUTTYPES:
        raise UserError(f"unknown outtype {name!r}; choose one of {', '.join(OUTTYPES)}")
    return OUTTYPES[key]


UNQUANTIZED = ("position_embd.weight",)  # 2-D tensors llama.cpp's quantizer leaves in f32


def tensor_type(name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a GGUF tensor of this PyTorch shape gets: f32 for 1-D and UNQUANTIZED ones, f16 when rows do
    not fill whole blocks."""
    if len(shape) == 1 or name in UNQUANTIZED:
        return Q.F32
    if shape[-1] % GGML_QUANT_SIZES[wanted][0]:
        return Q.F16
    return wanted


def encoded_bytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Bytes of a tensor of this shape stored as qtype."""
    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def encode(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values -> the array the gguf writer stores: f32/f16 as such, other types as raw uint8 bytes."""
    if qtype == Q.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(values, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


def llama_quantize(source: Path, target: Path, ftype: int) -> None:
    """Quantize an f32 GGUF with llama.cpp's quantizer (keeps every metadata key, sets general.file_type)."""
    import llama_cpp
    import llama_cpp._logger

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    logger = llama_cpp._logger.logger
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        status = llama_cpp.llama_model_quantize(
            str(source).encode(), str(target).encode(), ctypes.byref(params)
        )
    finally:
        logger.setLevel(level)
    if status != 0:
        raise UserError(f"llama.cpp could not quantize {source.name} (status {status}); try --outtype q8_0")
