"""A Hugging Face checkpoint directory read with numpy only: config.json and (sharded) safetensors.

The safetensors header is read here rather than through `safetensors.numpy`, because numpy has no bfloat16:
bf16 tensors are read as raw 16-bit words and widened to float32 exactly (bf16 is the top half of an f32).
Tensor data is memory-mapped, so only the tensor being converted is in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_memdec.errors import UserError

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
}
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]  # PyTorch order
    start: int  # byte offset of the data in the file


class Checkpoint:
    """The config and the tensors of one checkpoint directory, by their Hugging Face names."""

    def __init__(self, folder: Path, config: str = "config.json") -> None:
        """`config`: the folder's JSON settings file (a peft adapter's is adapter_config.json)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(
                f"the checkpoint folder {folder} does not exist; give a Hugging Face model folder"
            )
        config_path = folder / config
        if not config_path.is_file():
            raise UserError(
                f"{folder} has no {config}; give a Hugging Face model folder saved with save_pretrained"
            )
        self.folder = folder
        self.config: dict[str, Any] = _read_json(config_path)
        self._entries: dict[str, _Entry] = {}
        for file in _safetensors_files(folder):
            self._entries.update(_read_header(file))

    @property
    def names(self) -> list[str]:
        """Tensor names in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in PyTorch order."""
        return self._entries[name].shape

    def tensor(self, name: str) -> np.ndarray:
        """A tensor widened to float32, in PyTorch shape order."""
        entry = self._entries[name]
        count = int(np.prod(entry.shape, dtype=np.int64))
        raw = np.memmap(entry.file, SAFETENSORS_DTYPES[entry.dtype], "r", entry.start, (count,))
        if entry.dtype == "BF16":
            values = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.astype(np.float32)
        return values.reshape(entry.shape)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); re-save the checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object; re-save the checkpoint")
    return data


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files: those named by model.safetensors.index.json, else every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map; re-save the checkpoint")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{folder} lacks the shard {missing[0]} named in {index.name}; copy every shard")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no .safetensors weights; save the model with save_pretrained")
    return files


def _read_header(file: Path) -> dict[str, _Entry]:
    """Parse one safetensors header, checking every tensor lies inside the file."""
    size = file.stat().st_size

    def bad(problem: str) -> UserError:
        return UserError(f"{file} is not a valid safetensors file: {problem}; re-save the checkpoint")

    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise bad("it is shorter than its 8-byte header length")
        (n_header,) = struct.unpack("<Q", head)
        if n_header > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"its header claims {n_header} bytes")
        try:
            header = json.loads(handle.read(n_header))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    entries = {}
    data_start = 8 + n_header
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = (
                info["dtype"],
                tuple(int(d) for d in info["shape"]),
                info["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise bad(f"the entry of {name!r} is malformed") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{file}: tensor {name} has dtype {dtype}, which the converter does not read")
        if any(d < 0 for d in shape) or not (isinstance(begin, int) and isinstance(end, int)) or begin < 0:
            raise bad(f"the entry of {name!r} is malformed")
        n_bytes = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != n_bytes or data_start + end > size:
            raise bad(f"the data of {name!r} does not match its shape or lies outside the file")
        entries[name] = _Entry(file, dtype, shape, data_start + begin)
    return entries
