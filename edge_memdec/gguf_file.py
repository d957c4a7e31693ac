"""Our own bounds-checked GGUF reader: every file is validated here before llama.cpp opens it.

llama.cpp aborts the whole process on some malformed files (duplicate tokens, absurd layer counts) and
the gguf package trusts the lengths it reads; this reader trusts nothing. Every length is checked against the
bytes left in the file before anything is allocated, and only the header region is read (never the tensor
data), so a 100 MB model parses in a fraction of a second. Any problem raises one `UserError` sentence
naming the file and what is wrong.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
    LlamaFileType,
)

from edge_memdec.errors import UserError

MAGIC = struct.pack("<I", GGUF_MAGIC)  # b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME minus the terminating NUL
MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: llama.cpp aborts above it
MAX_ARRAY_LEN = 1 << 22  # elements per metadata array; real vocabularies stay under 300k
INT64_MAX = (1 << 63) - 1
READ_CHUNK = 1 << 22  # bytes read at a time while walking the header

V = GGUFValueType  # compared as plain ints below: IntEnum members slow the per-token loops by ~25%
STRING, ARRAY, BOOL = int(V.STRING), int(V.ARRAY), int(V.BOOL)
# GGUF value type -> struct format of one element; STRING and ARRAY are handled apart.
SCALAR_TYPES: dict[int, struct.Struct] = {
    int(vtype): struct.Struct("<" + code)
    for vtype, code in {
        V.UINT8: "B",
        V.INT8: "b",
        V.UINT16: "H",
        V.INT16: "h",
        V.UINT32: "I",
        V.INT32: "i",
        V.FLOAT32: "f",
        V.BOOL: "B",
        V.UINT64: "Q",
        V.INT64: "q",
        V.FLOAT64: "d",
    }.items()
}
INTEGER_TYPES = tuple(int(t) for t in (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64))
FLOAT_TYPES = (int(V.FLOAT32), int(V.FLOAT64))
ARCHITECTURE, ALIGNMENT, FILE_TYPE, TYPE = (
    Keys.General.ARCHITECTURE,
    Keys.General.ALIGNMENT,
    Keys.General.FILE_TYPE,
    Keys.General.TYPE,
)
TOKENS, TOKEN_TYPES, SCORES, MERGES, TOKENIZER_MODEL = (
    Keys.Tokenizer.LIST,
    Keys.Tokenizer.TOKEN_TYPE,
    Keys.Tokenizer.SCORES,
    Keys.Tokenizer.MERGES,
    Keys.Tokenizer.MODEL,
)


@dataclass(frozen=True)
class ArchRules:
    """What one architecture's GGUF must hold beyond the common keys; llama.cpp checks tensor shapes itself."""

    top_tensors: tuple[str, ...]  # needed beside token_embd (".weight" appended)
    block_tensors: tuple[str, ...]  # needed in every block (".weight" appended)
    norm_eps_key: str  # the normalisation epsilon, after "<arch>."


_LLAMA_RULES = ArchRules(
    ("output_norm",),
    ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"),
    "attention.layer_norm_rms_epsilon",
)
ARCH_RULES = {
    "llama": _LLAMA_RULES,
    "qwen2": _LLAMA_RULES,
    "gpt2": ArchRules(
        ("output_norm", "position_embd"),
        ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"),
        "attention.layer_norm_epsilon",
    ),
}
SUPPORTED_ARCHS = tuple(ARCH_RULES)
TOKENIZER_MODELS = ("gpt2", "llama")

# llama.cpp's split GGUF: NAME-00001-of-0000N.gguf holds the metadata, every part its own tensors; llama.cpp
# opens the first part and finds the others beside it by name.
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = (
    Keys.Split.LLM_KV_SPLIT_NO,
    Keys.Split.LLM_KV_SPLIT_COUNT,
    Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT,
)
SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_name(prefix: str, no: int, count: int) -> str:
    """The file name of part `no` (1-based) of a `count`-part split GGUF, as llama.cpp builds it."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the GGUF header."""

    name: str  # e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first (the PyTorch shape reversed)
    dtype: str  # ggml type name, e.g. "F32", "Q4_1"
    offset: int  # bytes from the start of its file to the tensor's data
    n_bytes: int  # bytes of data
    part: int = 0  # index of its file in GGUFInfo.files (0 unless the GGUF is split)

    @property
    def n_elements(self) -> int:
        """Number of weights in the tensor."""
        return int(np.prod(self.shape, dtype=object))


@dataclass
class GGUFInfo:
    """Everything in a GGUF file except the tensor data."""

    path: Path
    version: int
    arch: str
    metadata: dict[str, Any]  # scalars as Python values, arrays as lists
    tensors: list[TensorInfo]
    file_type: str  # e.g. "Q4_1", "F32", "Q4_K_M"
    n_params: int
    value_types: dict[str, tuple[int, int | None]] = field(
        repr=False
    )  # key -> (GGUF type, array element type)
    data_offset: int = 0  # bytes from the start of the (first) file to the tensor data section
    parts: tuple[Path, ...] = ()  # every file of a split GGUF, first to last; empty for one file

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value, or `default` when the key is absent."""
        return self.metadata.get(key, default)

    @property
    def tokens(self) -> list[str]:
        """The token texts, indexed by token id."""
        return self.metadata[TOKENS]

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the tokenizer."""
        return len(self.tokens)

    @property
    def n_ctx_train(self) -> int:
        """Context length the model was trained with, in tokens."""
        return int(self.metadata[f"{self.arch}.context_length"])

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return int(self.metadata[f"{self.arch}.block_count"])

    @property
    def files(self) -> tuple[Path, ...]:
        """The files holding the model: `path` alone, or every part of a split GGUF."""
        return self.parts or (self.path,)

    @property
    def n_bytes(self) -> int:
        """Size of the model in bytes (every part of a split GGUF)."""
        return sum(f.stat().st_size for f in self.files)

    def tensor_bytes(self, tensor: TensorInfo) -> np.ndarray:
        """The raw bytes of one tensor's data, uint8 [n_bytes], memory-mapped read-only from its file."""
        return np.memmap(self.files[tensor.part], np.uint8, "r", tensor.offset, (tensor.n_bytes,))

    @property
    def memdec(self) -> dict[str, Any]:
        """The memory-decoder metadata (`memdec.*` keys) without the prefix; empty for an ordinary model."""
        return {k.removeprefix("memdec."): v for k, v in self.metadata.items() if k.startswith("memdec.")}


class _Header:
    """A cursor over the start of a file that reads more bytes only when needed, never past the end."""

    def __init__(self, path: Path, handle: BinaryIO, size: int) -> None:
        self.path = path
        self.handle = handle
        self.size = size
        self.buf = bytearray()
        self.pos = 0

    def fail(self, problem: str) -> UserError:
        return UserError(f"{self.path} is not a valid GGUF file: {problem}; re-download or re-convert it")

    def need(self, n: int, what: str) -> None:
        """Make sure n more bytes are buffered, or fail when the file ends first."""
        end = self.pos + n
        if end > self.size:
            raise self.fail(f"the file ends inside {what} (at byte {self.pos} of {self.size})")
        if end > len(self.buf):
            want = min(self.size, max(end, 2 * len(self.buf), READ_CHUNK)) - len(self.buf)
            chunk = self.handle.read(want)
            if len(chunk) != want:
                raise self.fail(f"the file ends inside {what} (it shrank while being read)")
            self.buf += chunk

    def scalar(self, vtype: int, what: str) -> Any:
        fmt = SCALAR_TYPES[vtype]
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return bool(value) if vtype == BOOL else value

    def u32(self, what: str) -> int:
        return self.scalar(4, what)

    def u64(self, what: str) -> int:
        return self.scalar(10, what)

    def string(self, what: str, strict: bool = False) -> str:
        length = self.u64(f"the length of {what}")
        if length > self.size - self.pos:
            raise self.fail(f"{what} claims {length} bytes but only {self.size - self.pos} remain")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8", "strict" if strict else "surrogateescape")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row; the hot loop of the reader (a vocabulary holds ~100k of them).

        Locals instead of attributes and one bounds check per string: ~3x faster than calling `string`."""
        out: list[str] = [""] * count
        unpack = SCALAR_TYPES[V.UINT64].unpack_from
        buf, pos, have = self.buf, self.pos, len(self.buf)
        for i in range(count):
            start = pos + 8
            if start > have:
                self.pos = pos
                self.need(8, f"element {i} of {what}")
                buf, have = self.buf, len(self.buf)
            (length,) = unpack(buf, pos)
            stop = start + length
            if stop > have:
                if length > self.size - start:
                    raise self.fail(
                        f"element {i} of {what} claims {length} bytes but only {self.size - start} remain"
                    )
                self.pos = start
                self.need(length, f"element {i} of {what}")
                buf, have = self.buf, len(self.buf)
            out[i] = buf[start:stop].decode("utf-8", "surrogateescape")
            pos = stop
        self.pos = pos
        return out

    def array(self, what: str) -> tuple[list[Any], int]:
        etype = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        if etype == ARRAY:
            raise self.fail(f"{what} is an array of arrays, which llama.cpp does not read")
        if etype != STRING and etype not in SCALAR_TYPES:
            raise self.fail(f"{what} has unknown element type {etype}")
        item_size = 8 if etype == STRING else SCALAR_TYPES[etype].size
        if count > (self.size - self.pos) // item_size:
            raise self.fail(f"{what} claims {count} elements but the file is too short for them")
        if count > MAX_ARRAY_LEN:
            raise self.fail(f"{what} has {count} elements, more than the limit of {MAX_ARRAY_LEN}")
        if etype == STRING:
            return self.strings(count, what), etype
        self.need(count * item_size, what)
        values = np.frombuffer(self.buf, np.dtype(SCALAR_TYPES[etype].format), count, self.pos)
        self.pos += count * item_size
        return (values.astype(bool) if etype == BOOL else values).tolist(), etype

    def value(self, vtype: int, what: str) -> tuple[Any, int | None]:
        """One metadata value and, for arrays, its element type."""
        if vtype == STRING:
            return self.string(what), None
        if vtype == ARRAY:
            return self.array(what)
        if vtype in SCALAR_TYPES:
            return self.scalar(vtype, what), None
        raise self.fail(f"{what} has unknown value type {vtype}")


def read_gguf(path: str | Path) -> GGUFInfo:
    """Read and validate a model GGUF's header (metadata and tensor table) without reading tensor data.

    A split GGUF is read from its first part (NAME-00001-of-0000N.gguf), with every other part beside it.
    Raises UserError when the file is missing, is not a GGUF, is truncated or corrupted, is a LoRA adapter,
    holds an architecture other than llama, qwen2 or gpt2, lacks what llama.cpp needs to load it, or is a split
    GGUF missing a part.
    """
    return _read(Path(path), adapter=False)


def read_adapter_gguf(path: str | Path) -> GGUFInfo:
    """Read a LoRA adapter GGUF's header (general.type = adapter), checked as far as any GGUF is; what makes
    it a LoRA llama.cpp loads is checked by `edge_memdec.lora_file`."""
    return _read(Path(path), adapter=True)


def read_any_gguf(path: str | Path) -> GGUFInfo:
    """A model or a LoRA adapter GGUF, each checked as `read_gguf` or `read_adapter_gguf` checks it."""
    return _read(Path(path), adapter=None)


def _read(path: Path, adapter: bool | None) -> GGUFInfo:
    """One GGUF (every part of a split one) read and checked as a model, an adapter, or whichever it says."""
    h, table = _read_table(path)
    parts: tuple[Path, ...] = ()
    tensors = table.tensors
    if SPLIT_COUNT in table.metadata:
        parts, tensors = _read_split(h, table)
    if adapter is None:
        adapter = table.metadata.get(TYPE) == "adapter"
    arch = _check_kind(h, table.metadata, table.value_types, adapter)
    if not adapter:
        _check_model(h, table.metadata, table.value_types, {t.name: t for t in tensors})
    return GGUFInfo(
        path=h.path,
        version=table.version,
        arch=arch,
        metadata=table.metadata,
        tensors=tensors,
        file_type=_file_type(table.metadata, tensors),
        n_params=sum(t.n_elements for t in tensors),
        value_types=table.value_types,
        data_offset=table.data_offset,
        parts=parts,
    )


@dataclass
class _Table:
    """One file's header: version, metadata (with value types), and its tensors placed in its data section."""

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, tuple[int, int | None]]
    tensors: list[TensorInfo]
    data_offset: int


def _read_table(path: Path, part: int = 0) -> tuple[_Header, _Table]:
    """Open `path` and parse its header; file-system problems become one sentence."""
    if not path.exists():
        raise UserError(f"{path} does not exist; check the path")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the path of a .gguf model file")
    try:
        with path.open("rb") as handle:
            header = _Header(path, handle, path.stat().st_size)
            return header, _parse(header, part)
    except PermissionError:
        raise UserError(f"{path} cannot be read (permission denied); check its permissions") from None
    except IsADirectoryError:
        raise UserError(f"{path} is not a file; give the path of a .gguf model file") from None


def _parse(h: _Header, part: int = 0) -> _Table:
    if h.size < 4 or _peek(h, 4) != MAGIC:
        raise UserError(
            f"{h.path} is not a GGUF file (it does not start with the bytes 'GGUF'); give a .gguf model"
        )
    h.pos = 4
    version = h.u32("the version number")
    if version not in SUPPORTED_VERSIONS:
        if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
            raise UserError(
                f"{h.path} is a big-endian GGUF file, which is not supported; use a little-endian one"
            )
        raise h.fail(f"its format version is {version}, but only versions 2 and 3 are supported")
    n_tensors = h.u64("the tensor count")
    n_kv = h.u64("the metadata count")
    if n_kv > (h.size - h.pos) // 13:
        raise h.fail(f"it claims {n_kv} metadata entries, more than the file can hold")
    if n_tensors > (h.size - h.pos) // 32:
        raise h.fail(f"it claims {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = h.string(f"the name of metadata entry {i}", strict=True)
        if key in metadata:
            raise h.fail(f"the metadata key {_short(key)} appears twice")
        vtype = h.u32(f"the type of metadata key {_short(key)}")
        metadata[key], etype = h.value(vtype, f"metadata key {_short(key)}")
        value_types[key] = (vtype, etype)

    alignment = metadata.get(ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if ALIGNMENT in metadata and (
        value_types[ALIGNMENT][0] != V.UINT32 or alignment <= 0 or alignment & (alignment - 1)
    ):
        raise h.fail(f"general.alignment is {_short(alignment)}, not a power of two stored as uint32")

    entries = [_tensor_entry(h, i) for i in range(n_tensors)]
    data_offset = -(-h.pos // alignment) * alignment
    tensors = _place_tensors(h, entries, data_offset, alignment, part)
    return _Table(version, metadata, value_types, tensors, data_offset)


def _split_field(h: _Header, table: _Table, key: str, high: int) -> int:
    value = table.metadata.get(key)
    if key not in table.metadata or table.value_types[key][0] not in INTEGER_TYPES or not 0 <= value <= high:
        raise h.fail(f"{key} is {_short(value)}, not an integer from 0 to {high}")
    return value


def _read_split(h: _Header, first: _Table) -> tuple[tuple[Path, ...], list[TensorInfo]]:
    """The files and the tensors of a split GGUF given by its first part; every part is checked."""
    count = _split_field(h, first, SPLIT_COUNT, 0xFFFF)
    no = _split_field(h, first, SPLIT_NO, 0xFFFF) if SPLIT_NO in first.metadata else 0
    name = SPLIT_NAME.match(h.path.name)
    if count <= 1:
        return (), first.tensors
    if name is None or int(name["count"]) != count:
        raise h.fail(
            f"it is part of a {count}-part split GGUF but is not named NAME-{1:05d}-of-{count:05d}.gguf, so "
            "llama.cpp cannot find its other parts"
        )
    prefix = name["prefix"]
    if no != 0:
        first_name = split_part_name(prefix, 1, count)
        raise UserError(
            f"{h.path} is part {no + 1} of a {count}-part split GGUF; give its first part, {first_name}"
        )
    files, tensors = [h.path], list(first.tensors)
    for i in range(1, count):
        path = h.path.with_name(split_part_name(prefix, i + 1, count))
        if not path.is_file():
            raise UserError(
                f"{h.path} is the first of {count} parts of a split GGUF, but {path.name} is not beside it; "
                "download every part into the same folder"
            )
        part_h, table = _read_table(path, part=i)
        if _split_field(part_h, table, SPLIT_NO, 0xFFFF) != i or table.metadata.get(SPLIT_COUNT) != count:
            raise part_h.fail(f"its split.no / split.count do not say part {i + 1} of {count}")
        files.append(path)
        tensors += table.tensors
    total = first.metadata.get(SPLIT_TENSORS, len(tensors))
    if total != len(tensors):
        raise h.fail(
            f"split.tensors.count is {_short(total)}, but its {count} parts hold {len(tensors)} tensors"
        )
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise h.fail(f"the tensor name {t.name!r} appears in two of its parts")
        seen.add(t.name)
    return tuple(files), tensors


def _peek(h: _Header, n: int) -> bytes:
    h.need(n, "the file magic")
    return bytes(h.buf[:n])


def _tensor_entry(h: _Header, i: int) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    """One tensor-table entry: name, shape (GGUF order), ggml type, offset within the data section."""
    name = h.string(f"the name of tensor {i}", strict=True)
    if len(name.encode()) > MAX_TENSOR_NAME:
        raise h.fail(f"tensor {i} has a name longer than {MAX_TENSOR_NAME} bytes")
    n_dims = h.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise h.fail(f"tensor {name!r} has {n_dims} dimensions; ggml allows 1 to {MAX_DIMS}")
    shape = tuple(h.u64(f"the shape of tensor {name!r}") for _ in range(n_dims))
    n_elements = 1
    for dim in shape:
        n_elements *= dim
        if dim > INT64_MAX or n_elements > INT64_MAX:
            raise h.fail(f"tensor {name!r} has shape {list(shape)}, too large for ggml")
    type_id = h.u32(f"the type of tensor {name!r}")
    try:
        ggml_type = GGMLQuantizationType(type_id)
    except ValueError:
        raise h.fail(f"tensor {name!r} has unknown ggml type {type_id}") from None
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    if shape[0] % block_size:
        raise h.fail(
            f"tensor {name!r} has a first dimension of {shape[0]}, not a multiple of the "
            f"{ggml_type.name} block size {block_size}"
        )
    offset = h.u64(f"the data offset of tensor {name!r}")
    return name, shape, ggml_type, offset


def _place_tensors(
    h: _Header,
    entries: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]],
    data_offset: int,
    align: int,
    part: int = 0,
) -> list[TensorInfo]:
    """Check that tensors follow each other in the data section as llama.cpp requires and end in the file."""
    tensors = []
    expected = 0
    seen: set[str] = set()
    for name, shape, ggml_type, offset in entries:
        if name in seen:
            raise h.fail(f"the tensor name {name!r} appears twice")
        seen.add(name)
        if offset != expected:
            raise h.fail(f"tensor {name!r} starts at data offset {offset}, but llama.cpp expects {expected}")
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_elements = int(np.prod(shape, dtype=object))
        n_bytes = n_elements // block_size * type_size
        if data_offset + offset + n_bytes > h.size:
            raise h.fail(f"the data of tensor {name!r} runs past the end of the file (truncated download?)")
        tensors.append(TensorInfo(name, shape, ggml_type.name, data_offset + offset, n_bytes, part))
        expected = offset + -(-n_bytes // align) * align
    return tensors


def _check_kind(h: _Header, meta: dict[str, Any], types: dict[str, tuple[int, int | None]], adapter: bool) -> str:
    """Check that the file is the kind asked for (a model, or an adapter: general.type, a string llama.cpp
    reads unchecked) of a supported architecture; return the architecture."""
    if TYPE in meta and types[TYPE][0] != STRING:
        raise h.fail("general.type is not a string")
    if (meta.get(TYPE) == "adapter") != adapter:
        raise UserError(
            f"{h.path} is a LoRA adapter, not a model; give the base model's GGUF here and the adapter to --lora"
            if not adapter
            else f"{h.path} is not a LoRA adapter (its general.type is not 'adapter'); pass a GGUF LoRA adapter"
        )
    arch = meta.get(ARCHITECTURE)
    if not isinstance(arch, str):
        raise h.fail("it has no general.architecture string")
    if arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"{h.path} is a {_short(arch)} {'adapter' if adapter else 'model'}, but only "
            f"{', '.join(SUPPORTED_ARCHS)} models are supported; use a GGUF of one of those"
        )
    return arch


def _check_model(
    h: _Header, meta: dict[str, Any], types: dict[str, tuple[int, int | None]], tensors: dict[str, TensorInfo]
) -> None:
    """Check the architecture's hyperparameters, the tokenizer and the core tensors."""
    arch = meta[ARCHITECTURE]

    def integer(key: str, low: int, high: int = INT64_MAX) -> int:
        if key not in meta:
            raise h.fail(f"the required key {key} is missing")
        value = meta[key]
        if types[key][0] not in INTEGER_TYPES or not low <= value <= high:
            raise h.fail(f"{key} is {_short(value)}, not an integer from {low} to {high}")
        return value

    integer(f"{arch}.context_length", 1)
    integer(f"{arch}.feed_forward_length", 1)
    n_embd = integer(f"{arch}.embedding_length", 1)
    n_layer = integer(f"{arch}.block_count", 1, MAX_LAYERS)
    n_head = integer(f"{arch}.attention.head_count", 1, n_embd)
    n_head_kv = (
        integer(f"{arch}.attention.head_count_kv", 1, n_head)
        if f"{arch}.attention.head_count_kv" in meta
        else n_head
    )
    if n_head % n_head_kv:
        raise h.fail(f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if f"{arch}.attention.key_length" not in meta and n_embd % n_head:
        raise h.fail(f"{arch}.embedding_length is not a multiple of {arch}.attention.head_count")
    head_dim = n_embd // n_head
    sizes = {
        name: integer(f"{arch}.{name}", 1) if f"{arch}.{name}" in meta else head_dim
        for name in ("attention.key_length", "attention.value_length", "rope.dimension_count")
    }
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise h.fail(f"the head sizes disagree ({shown}); llama.cpp needs them equal")
    eps_key = f"{arch}.{ARCH_RULES[arch].norm_eps_key}"
    if eps_key not in meta or types[eps_key][0] not in FLOAT_TYPES:
        raise h.fail(f"the required float key {eps_key} is missing")

    tokens = _check_tokenizer(h, meta, types)
    _check_tensors(h, arch, tensors, n_layer, n_embd, len(tokens))


def _check_tokenizer(h: _Header, meta: dict[str, Any], types: dict[str, tuple[int, int | None]]) -> list[str]:
    model = meta.get(TOKENIZER_MODEL)
    if model not in TOKENIZER_MODELS:
        raise h.fail(f"tokenizer.ggml.model is {_short(model)}, not one of {', '.join(TOKENIZER_MODELS)}")
    tokens = meta.get(TOKENS)
    if types.get(TOKENS) != (ARRAY, STRING) or not tokens:
        raise h.fail("tokenizer.ggml.tokens is missing or is not a list of strings")
    if "\x00" in "".join(tokens):
        token_id = next(i for i, text in enumerate(tokens) if "\x00" in text)
        raise h.fail(f"token {token_id} contains a NUL byte, which llama.cpp cannot read")
    if len(set(tokens)) != len(tokens):
        text, _ = Counter(tokens).most_common(1)[0]
        raise h.fail(f"the token text {_short(text)} appears more than once in tokenizer.ggml.tokens")
    for key in (TOKEN_TYPES, SCORES):
        if key in meta and (types[key][0] != ARRAY or len(meta[key]) != len(tokens)):
            raise h.fail(f"{key} does not have one entry per token ({len(tokens)})")
    if model == "gpt2" and types.get(MERGES) != (ARRAY, STRING):
        raise h.fail("a BPE (gpt2) tokenizer needs tokenizer.ggml.merges as a list of strings")
    return tokens


def _check_tensors(
    h: _Header, arch: str, tensors: dict[str, TensorInfo], n_layer: int, n_embd: int, n_vocab: int
) -> None:
    embd = tensors.get("token_embd.weight")
    if embd is None or embd.shape != (n_embd, n_vocab):
        found = "missing" if embd is None else f"of shape {list(embd.shape)}"
        raise h.fail(f"token_embd.weight is {found}, expected shape [{n_embd}, {n_vocab}]")
    rules = ARCH_RULES[arch]
    names = [f"{t}.weight" for t in rules.top_tensors]
    names += [f"blk.{i}.{t}.weight" for i in range(n_layer) for t in rules.block_tensors]
    missing = [name for name in names if name not in tensors]
    if missing:
        raise h.fail(f"the tensor {missing[0]} is missing")


def _short(value: Any) -> str:
    """A value for an error message, cut short: hostile files hold megabyte-long strings."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _file_type(meta: dict[str, Any], tensors: list[TensorInfo]) -> str:
    """The quantization name: from general.file_type when present, else the commonest 2-D tensor type."""
    code = meta.get(FILE_TYPE)
    if isinstance(code, int) and not isinstance(code, bool):
        try:
            return LlamaFileType(code).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"unknown ({code})"
    matrices = [t.dtype for t in tensors if len(t.shape) >= 2] or [t.dtype for t in tensors]
    return Counter(matrices).most_common(1)[0][0] if matrices else "unknown"
