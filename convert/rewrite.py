"""Rewriting a finished GGUF tensor for tensor: keep another GGUF's encoding of equal tensors, split into parts.

- `keep_equal_tensors`: every tensor whose values equal the same-named tensor of a donor GGUF (a memory decoder's
  frozen blocks and tied embedding equal the base's) takes the donor's bytes and type, so those tensors are the
  base's exactly, at the base's size, whatever `--outtype` the trained ones got.
- `split_gguf`: llama.cpp's split convention, NAME-00001-of-0000N.gguf, each part at most `max_bytes` (git hosts
  refuse files over 100 MB); the first part holds the metadata, and llama.cpp loads the set from it.
- `join_gguf`: the inverse, one file from a split set (readers other than llama.cpp's take single files).

Both copy raw tensor bytes (memory-mapped, one tensor at a time) and write every file under a temp name first.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quant_shape_to_byte_shape
from tqdm import tqdm

from edge_memdec.errors import UserError
from edge_memdec.files import atomic_path
from edge_memdec.gguf_file import (
    SPLIT_COUNT,
    SPLIT_NO,
    SPLIT_TENSORS,
    GGUFInfo,
    TensorInfo,
    read_gguf,
    split_part_name,
)

Q = GGMLQuantizationType
# Keys the gguf writer adds itself.
WRITER_KEYS = ("general.architecture", SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
ALIGNMENT = 32  # general.alignment of the files we write (the gguf writer's default)
TENSOR_INFO_BYTES = 160  # a tensor-table entry (name up to 63 bytes, 4 dims, type, offset), rounded up
SPLIT_KEYS_BYTES = 4096  # a part's fixed header and split.* keys, rounded up
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes of a size such as 95M or 2G (decimal units, as llama.cpp's gguf-split reads them)."""
    match = _SIZE.match(text)
    if match is None or float(match[1]) <= 0:
        raise UserError(f"--split-max-size must be a size such as 95M or 2G, got {text!r}")
    return int(float(match[1]) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match[2].upper()])


def tensor_values(info: GGUFInfo, tensor: TensorInfo) -> np.ndarray:
    """A tensor's values as float32, in PyTorch shape order (the GGUF shape reversed)."""
    raw = np.asarray(info.tensor_bytes(tensor))
    qtype = Q[tensor.dtype]
    shape = tuple(reversed(tensor.shape))
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype).astype(np.float32)


def equal_tensors(model: GGUFInfo, donor: GGUFInfo, values) -> set[str]:
    """Names of `model`'s tensors whose exact float32 values (`values(name)`, PyTorch shape order) equal the
    same-named, same-shaped tensor of `donor`, dequantized."""
    theirs = {t.name: t for t in donor.tensors}
    same = set()
    for tensor in model.tensors:
        other = theirs.get(tensor.name)
        if other is None or other.shape != tensor.shape or other.dtype == tensor.dtype == "F32":
            continue  # a norm kept at f32 either way gains nothing
        if np.array_equal(values(tensor.name), tensor_values(donor, other)):
            same.add(tensor.name)
    return same


def keep_equal_tensors(source: Path, out: Path, donor: Path, values) -> list[str]:
    """Rewrite the GGUF `source` as `out` with the donor's bytes for every tensor `equal_tensors` finds; returns
    their names. `values(name)` gives the float32 values the tensor was written from (before quantization)."""
    model, base = read_gguf(source), read_gguf(donor)
    same = equal_tensors(model, base, values)
    theirs = {t.name: t for t in base.tensors}
    plan = [(base, theirs[t.name]) if t.name in same else (model, t) for t in model.tensors]
    _write_parts(model, plan, [len(plan)], [out])
    return sorted(same)


def split_gguf(source: Path, out: Path, max_bytes: int) -> list[Path]:
    """Write `source` as `out` if it fits in `max_bytes`, else as llama.cpp split parts named after `out`'s stem,
    each at most `max_bytes`; returns the files written. Every part but the first holds only `split.*` keys."""
    info = read_gguf(source)
    plan = [(info, t) for t in info.tensors]
    if info.n_bytes <= max_bytes:
        _write_parts(info, plan, [len(plan)], [out])
        return [out]
    counts = _plan_parts([t.n_bytes for t in info.tensors], info.data_offset + SPLIT_KEYS_BYTES, max_bytes)
    names = [out.with_name(split_part_name(out.stem, i + 1, len(counts))) for i in range(len(counts))]
    _write_parts(info, plan, counts, names)
    for name in names:
        if name.stat().st_size > max_bytes:  # the plan's header estimates are generous; this never fires
            raise UserError(f"{name} came out at {name.stat().st_size} bytes, over the {max_bytes} asked for")
    return names


def join_gguf(source: Path, out: Path) -> Path:
    """Write the GGUF `source` (a single file, or the first part of a split set) as the single file `out`, with
    its metadata less the `split.*` keys and every tensor's bytes unchanged; returns `out`."""
    info = read_gguf(source)
    _write_parts(info, [(info, t) for t in info.tensors], [len(info.tensors)], [out])
    return out


def _plan_parts(sizes: list[int], first_header: int, max_bytes: int) -> list[int]:
    """Tensors per part, in order, so that no part passes `max_bytes`. The first carries the metadata and may
    hold no tensor at all (as gguf-split's --no-tensor-first-split writes) when the first does not fit beside it."""
    counts, n, used = [], 0, first_header
    for size in sizes:
        need = -(-size // ALIGNMENT) * ALIGNMENT + TENSOR_INFO_BYTES
        if used + need > max_bytes and (n or not counts):
            counts.append(n)
            n, used = 0, SPLIT_KEYS_BYTES
        if used + need > max_bytes:
            raise UserError(
                f"a tensor of {size} bytes does not fit a part of {max_bytes} bytes; allow larger parts"
            )
        used += need
        n += 1
    return [*counts, n]


def write_top_blocks(model: GGUFInfo, first: int, out: Path) -> Path:
    """`model` without its blocks below `first`: blocks first.. renumbered from 0, every other tensor (embedding,
    final norm, head) kept. Fed the residual stream entering block `first` (llama.cpp's batch embeddings), it
    computes what `model` computes from tokens."""
    plan = []
    for tensor in model.tensors:
        name = tensor.name
        if name.startswith("blk."):
            index, rest = name.removeprefix("blk.").split(".", 1)
            if int(index) < first:
                continue
            name = f"blk.{int(index) - first}.{rest}"
        plan.append((model, replace(tensor, name=name)))
    blocks = f"{model.arch}.block_count"
    _write_parts(model, plan, [len(plan)], [out], {blocks: model.n_layers - first})
    return out


def _write_parts(
    model: GGUFInfo,
    plan: list[tuple[GGUFInfo, TensorInfo]],
    counts: list[int],
    names: list[Path],
    changed: dict | None = None,
) -> None:
    """Write `model`'s metadata (with the `changed` values) and the planned tensors (each pair: the GGUF holding
    its bytes, the tensor under the name to write) into `names`, `counts[i]` tensors in file i. The files appear
    under their names only once all are written, the first part (the one llama.cpp opens) last."""
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_path(name)) for name in names]  # renamed in reverse order
        start = 0
        for i, (temp, count) in enumerate(zip(temps, counts, strict=True)):
            part = plan[start : start + count]
            start += count
            writer = GGUFWriter(temp, model.arch)
            if i == 0:
                for key, value in {**model.metadata, **(changed or {})}.items():
                    if key not in WRITER_KEYS:
                        vtype, etype = model.value_types[key]
                        sub = GGUFValueType(etype) if etype is not None else None
                        writer.add_key_value(key, value, GGUFValueType(vtype), sub)
            if len(names) > 1:
                writer.add_uint16(SPLIT_NO, i)
                writer.add_uint16(SPLIT_COUNT, len(names))
                writer.add_int32(SPLIT_TENSORS, len(plan))
            for _, tensor in part:
                _add_info(writer, tensor)
            try:
                writer.write_header_to_file()
                writer.write_kv_data_to_file()
                writer.write_ti_data_to_file()
                for owner, tensor in tqdm(part, desc=f"writing {names[i].name}", unit="tensor", leave=False):
                    writer.write_tensor_data(_typed(owner, tensor))
            finally:
                writer.close()


def _add_info(writer: GGUFWriter, tensor: TensorInfo) -> None:
    qtype, shape = Q[tensor.dtype], tuple(reversed(tensor.shape))
    if qtype in (Q.F32, Q.F16):
        dtype = np.float32 if qtype == Q.F32 else np.float16
        writer.add_tensor_info(tensor.name, shape, np.dtype(dtype), tensor.n_bytes)
    else:
        byte_shape = quant_shape_to_byte_shape(shape, qtype)
        writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), tensor.n_bytes, raw_dtype=qtype)


def _typed(owner: GGUFInfo, tensor: TensorInfo) -> np.ndarray:
    raw = np.asarray(owner.tensor_bytes(tensor))  # offset and part locate the bytes; the name may be new
    qtype = Q[tensor.dtype]
    return raw.view(np.float32 if qtype == Q.F32 else np.float16 if qtype == Q.F16 else np.uint8)
