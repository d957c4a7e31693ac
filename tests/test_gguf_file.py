"""The GGUF reader: the real SmolLM2 file, hand-made broken files, and fuzzed mutations of a tiny real GGUF.

Broken files are made with a small GGUF serializer written here from the format description (its type ids are
gguf-py's), so every field can be set to a value a writer library would refuse.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_memdec.errors import UserError
from edge_memdec.gguf_file import SCALAR_TYPES, GGUFInfo, read_gguf
from edge_memdec.paths import default_memdec_gguf

STRING, ARRAY, UINT32, UINT64, INT32 = (int(GGUFValueType[t]) for t in ("STRING", "ARRAY", "UINT32", "UINT64", "INT32"))
GGML_TYPE_IDS = {t.name: int(t) for t in GGMLQuantizationType}
FUZZ_EXAMPLES = int(os.environ.get("GGUF_FUZZ_EXAMPLES", "300"))

KeyValue = tuple[str, int, Any, int | None]  # key, GGUF type, value, array element type
Tensor = tuple[str, tuple[int, ...], int, bytes]  # name, GGUF shape, ggml type id, data


def pack_string(text: str | bytes) -> bytes:
    raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def pack_value(vtype: int, value: Any, sub: int | None = None) -> bytes:
    """One value in GGUF encoding; raw bytes are written as given (for types no reader knows)."""
    if isinstance(value, bytes):
        return value
    if vtype == STRING:
        return pack_string(value)
    if vtype == ARRAY:
        return struct.pack("<IQ", sub, len(value)) + b"".join(pack_value(sub, v) for v in value)
    return SCALAR_TYPES[vtype].pack(value)


def gguf_bytes(kvs: list[KeyValue], tensors: list[Tensor], version: int = 3, alignment: int = 32) -> bytes:
    """A GGUF file: header, metadata, tensor table, then each tensor's data padded to the alignment."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)))
    for key, vtype, value, sub in kvs:
        out += pack_string(key) + struct.pack("<I", vtype) + pack_value(vtype, value, sub)
    offset = 0
    for name, shape, type_id, data in tensors:
        out += pack_string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        out += struct.pack("<IQ", type_id, offset)
        offset += -(-len(data) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % alignment)
    return bytes(out)


def gguf_parts(info: GGUFInfo) -> tuple[list[KeyValue], list[Tensor]]:
    """The metadata and tensors of a parsed file, ready to edit and serialize again."""
    kvs = [(k, *info.value_types[k][:1], v, info.value_types[k][1]) for k, v in info.metadata.items()]
    raw = info.path.read_bytes()
    tensors = [
        (t.name, t.shape, GGML_TYPE_IDS[t.dtype], raw[t.offset : t.offset + t.n_bytes]) for t in info.tensors
    ]
    return kvs, tensors


def with_kv(
    kvs: list[KeyValue], key: str, vtype: int | None = None, value: Any = None, sub=None
) -> list[KeyValue]:
    """kvs with `key` replaced (or removed when vtype is None)."""
    edited = [kv for kv in kvs if kv[0] != key]
    if vtype is not None:
        index = next((i for i, kv in enumerate(kvs) if kv[0] == key), len(edited))
        edited.insert(index, (key, vtype, value, sub))
    return edited


@pytest.fixture(scope="module")
def tiny(tiny_llama_gguf) -> tuple[list[KeyValue], list[Tensor]]:
    return gguf_parts(read_gguf(tiny_llama_gguf))


def test_real_smollm2_parses_quickly(smollm2_gguf):
    start = time.perf_counter()
    info = read_gguf(smollm2_gguf)
    seconds = time.perf_counter() - start
    assert (info.arch, info.file_type, info.version) == ("llama", "Q4_1", 3)
    assert (info.n_vocab, info.n_ctx_train, len(info.tensors)) == (49152, 8192, 272)
    assert info.n_params == 134_515_008
    assert len(info.get("tokenizer.ggml.merges")) == 48900
    assert info.get("tokenizer.ggml.bos_token_id") == 1 and info.get("tokenizer.ggml.eos_token_id") == 2
    assert info.memdec == {}
    embd = info.tensors[0]
    assert (embd.name, embd.shape, embd.dtype, embd.offset) == (
        "token_embd.weight",
        (576, 49152),
        "Q8_0",
        1785664,
    )
    assert embd.n_bytes == 576 * 49152 // 32 * 34
    assert seconds < 1.0


def _gguf_py_view(path: Path) -> tuple[dict, dict, list[tuple]]:
    """gguf-py's reading of a file: metadata values, their (type, array element type) and the tensor table."""
    reader = GGUFReader(path)
    values, types = {}, {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):  # the header's own counts, not metadata
            continue
        value = f.contents()
        values[key] = value.tolist() if isinstance(value, np.ndarray) else value
        types[key] = (int(f.types[0]), int(f.types[-1]) if f.types[0] == GGUFValueType.ARRAY else None)
    tensors = [
        (t.name, tuple(int(d) for d in t.shape), t.tensor_type.name, t.data_offset, t.n_bytes)
        for t in reader.tensors
    ]
    return values, types, tensors


def test_reader_agrees_with_gguf_py_on_real_files(smollm2_gguf):
    """Our bounds-checked reader stands beside gguf-py's GGUFReader (which trusts the lengths it reads): on the
    real SmolLM2 base and the shipped memory decoder both read the same metadata, value types and tensors (the
    decoder ships as llama.cpp split parts: gguf-py reads each part alone, ours the set, tensors tagged by part)."""
    for path in (smollm2_gguf, default_memdec_gguf()):
        info = read_gguf(path)
        values, types, _ = _gguf_py_view(path)
        assert info.metadata == values and info.value_types == types
        tensors = [row for part in info.files for row in _gguf_py_view(part)[2]]
        assert [(t.name, t.shape, t.dtype, t.offset, t.n_bytes) for t in info.tensors] == tensors
        assert [t.part for t in info.tensors] == sorted(t.part for t in info.tensors)
        assert len(tensors) >= 38 and len(values) > 20  # the whole table was compared, not an empty one


def test_serializer_round_trips_a_converted_file_byte_for_byte(tiny_llama_gguf, tiny):
    assert gguf_bytes(*tiny) == tiny_llama_gguf.read_bytes()


def _broken(tiny: tuple[list[KeyValue], list[Tensor]], case: str) -> bytes:
    kvs, tensors = tiny
    good = gguf_bytes(kvs, tensors)
    header_end = len(gguf_bytes(kvs, []))
    tokens = next(kv for kv in kvs if kv[0] == "tokenizer.ggml.tokens")[2]
    first_key_length = 24
    big_array = struct.pack("<IIQ", ARRAY, 0, (1 << 22) + 1) + bytes((1 << 22) + 1)
    edits = {
        "empty": lambda: b"",
        "text file": lambda: b"This is a licence text, not a model.\n" * 20,
        "wrong magic": lambda: b"GGML" + good[4:],
        "truncated header": lambda: good[:20],
        "truncated tokens": lambda: good[: header_end // 2],
        "truncated data": lambda: good[:-100],
        "version 1": lambda: good[:4] + struct.pack("<I", 1) + good[8:],
        "big-endian": lambda: good[:4] + struct.pack(">I", 3) + good[8:],
        "huge kv count": lambda: good[:16] + struct.pack("<Q", 1 << 60) + good[24:],
        "huge tensor count": lambda: good[:8] + struct.pack("<Q", 1 << 60) + good[16:],
        "huge key length": lambda: good[:first_key_length] + struct.pack("<Q", 1 << 62) + good[32:],
        "huge array": lambda: b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + pack_string("x.big") + big_array,
        "unknown value type": lambda: gguf_bytes(with_kv(kvs, "general.name", 13, bytes(4)), tensors),
        "nested array": lambda: gguf_bytes(kvs + [("x.nested", ARRAY, [], ARRAY)], tensors),
        "unknown ggml type": lambda: gguf_bytes(kvs, [(n, s, 99, d) for n, s, _, d in tensors]),
        "five dims": lambda: gguf_bytes(kvs, [(n, (*s, 1, 1, 1, 1)[:5], t, d) for n, s, t, d in tensors]),
        "duplicate key": lambda: gguf_bytes(kvs + kvs[:1], tensors),
        "duplicate tensor": lambda: gguf_bytes(kvs, tensors + tensors[-1:]),
        "long tensor name": lambda: gguf_bytes(kvs, [("x" * 64, *tensors[0][1:])] + tensors[1:]),
        "non-UTF-8 key": lambda: gguf_bytes(
            [(b"\xff\xfe".decode("utf-8", "surrogateescape"), UINT32, 1, None)], []
        ),
        "bad alignment": lambda: gguf_bytes(kvs + [("general.alignment", UINT32, 24, None)], tensors),
        "alignment as u64": lambda: gguf_bytes(kvs + [("general.alignment", UINT64, 32, None)], tensors),
        "falcon arch": lambda: gguf_bytes(with_kv(kvs, "general.architecture", STRING, "falcon"), tensors),
        "missing embedding length": lambda: gguf_bytes(with_kv(kvs, "llama.embedding_length"), tensors),
        "zero heads": lambda: gguf_bytes(with_kv(kvs, "llama.attention.head_count", UINT32, 0), tensors),
        "too many layers": lambda: gguf_bytes(with_kv(kvs, "llama.block_count", UINT32, 100_000), tensors),
        "kv heads not dividing": lambda: gguf_bytes(
            with_kv(kvs, "llama.attention.head_count_kv", UINT32, 3), tensors
        ),
        "context as string": lambda: gguf_bytes(
            with_kv(kvs, "llama.context_length", STRING, "2048"), tensors
        ),
        "duplicate token": lambda: gguf_bytes(
            with_kv(kvs, "tokenizer.ggml.tokens", ARRAY, [tokens[0], *tokens[:-1]], STRING), tensors
        ),
        "NUL in a token": lambda: gguf_bytes(
            with_kv(kvs, "tokenizer.ggml.tokens", ARRAY, [*tokens[:-1], tokens[3] + "\x00x"], STRING), tensors
        ),
        "rope dimensions": lambda: gguf_bytes(
            with_kv(kvs, "llama.rope.dimension_count", UINT32, 4112), tensors
        ),
        "short token types": lambda: gguf_bytes(
            with_kv(kvs, "tokenizer.ggml.token_type", ARRAY, [1], INT32), tensors
        ),
        "no merges": lambda: gguf_bytes(with_kv(kvs, "tokenizer.ggml.merges"), tensors),
        "missing tensor": lambda: gguf_bytes(kvs, [t for t in tensors if t[0] != "blk.1.ffn_up.weight"]),
        "embedding shape": lambda: gguf_bytes(
            with_kv(
                with_kv(kvs, "llama.embedding_length", UINT32, 128), "llama.attention.head_count", UINT32, 8
            ),
            tensors,
        ),
    }
    return edits[case]()


BROKEN_CASES = {
    "empty": "not a GGUF file",
    "text file": "not a GGUF file",
    "wrong magic": "not a GGUF file",
    "truncated header": "ends inside",
    "truncated tokens": "ends inside|claims|too short",
    "truncated data": "runs past the end",
    "version 1": "version is 1",
    "big-endian": "big-endian",
    "huge kv count": "more than the file can hold",
    "huge tensor count": "more than the file can hold",
    "huge key length": "claims 4611686018427387904 bytes",
    "huge array": "more than the limit",
    "unknown value type": "unknown value type 13",
    "nested array": "array of arrays",
    "unknown ggml type": "unknown ggml type 99",
    "five dims": "5 dimensions",
    "duplicate key": "appears twice",
    "duplicate tensor": "appears twice",
    "long tensor name": "longer than 63 bytes",
    "non-UTF-8 key": "not valid UTF-8",
    "bad alignment": "general.alignment",
    "alignment as u64": "general.alignment",
    "falcon arch": "only llama, qwen2, gpt2 models",
    "missing embedding length": "llama.embedding_length is missing",
    "zero heads": "head_count is 0",
    "too many layers": "block_count is 100000",
    "kv heads not dividing": "not a multiple",
    "context as string": "llama.context_length",
    "duplicate token": "appears more than once",
    "NUL in a token": "token 511 contains a NUL byte",
    "rope dimensions": "head sizes disagree",
    "short token types": "one entry per token",
    "no merges": "merges",
    "missing tensor": r"blk\.1\.ffn_up\.weight is missing",
    "embedding shape": "token_embd.weight",
}


@pytest.mark.parametrize("case", BROKEN_CASES)
def test_broken_file_is_one_sentence_naming_file_and_problem(case, tiny, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(_broken(tiny, case))
    with pytest.raises(UserError, match=BROKEN_CASES[case]) as err:
        read_gguf(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message and len(message) < 400


def test_gpt2_files_are_checked_by_gpt2_rules(tiny_gpt2_gguf, tmp_path):
    """A gpt2 GGUF needs LayerNorm's epsilon, the position embedding and fused attn_qkv, not llama's tensors."""
    info = read_gguf(tiny_gpt2_gguf)
    assert (info.arch, info.n_ctx_train, info.n_layers) == ("gpt2", 512, 2)
    kvs, tensors = gguf_parts(info)
    broken = {
        "gpt2.attention.layer_norm_epsilon is missing": (
            with_kv(kvs, "gpt2.attention.layer_norm_epsilon"),
            tensors,
        ),
        r"position_embd\.weight is missing": (kvs, [t for t in tensors if t[0] != "position_embd.weight"]),
        r"blk\.1\.attn_qkv\.weight is missing": (
            kvs,
            [t for t in tensors if t[0] != "blk.1.attn_qkv.weight"],
        ),
    }
    path = tmp_path / "model.gguf"
    for message, parts in broken.items():
        path.write_bytes(gguf_bytes(*parts))
        with pytest.raises(UserError, match=message):
            read_gguf(path)


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_gguf(tmp_path / "absent.gguf")
    with pytest.raises(UserError, match="not a file"):
        read_gguf(tmp_path)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "mutant.gguf"


class Original:
    """The tiny GGUF's bytes and where its header region ends (mutations land there)."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        self.header_end = read_gguf(path).data_offset

    def __repr__(self) -> str:
        return f"Original({len(self.data)} bytes, header {self.header_end} bytes)"


@pytest.fixture(scope="module")
def original(tiny_llama_gguf) -> Original:
    return Original(tiny_llama_gguf)


MUTATION = st.tuples(
    st.sampled_from(["flip", "u64", "u32", "truncate", "delete"]),
    st.floats(0.0, 1.0, exclude_max=True),  # position, as a fraction of the header region
    st.integers(0, (1 << 64) - 1),
)


def mutate(original: Original, mutations: list[tuple[str, float, int]]) -> bytes:
    """Apply bit flips, overwritten integers, truncations and deletions, all inside the header region."""
    data = bytearray(original.data)
    for kind, where, value in mutations:
        if not data:
            break
        pos = int(where * min(original.header_end, len(data)))
        if kind == "flip":
            data[pos] ^= 1 << (value % 8)
        elif kind == "u64":
            data[pos : pos + 8] = (value if value % 3 else value % 1024).to_bytes(8, "little")
        elif kind == "u32":
            data[pos : pos + 4] = (value % (1 << 32)).to_bytes(4, "little")
        elif kind == "truncate":
            del data[pos:]
        else:
            del data[pos : pos + 1 + value % 16]
    return bytes(data)


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_fuzzed_files_parse_or_fail_with_one_sentence(original, fuzz_target, mutations):
    fuzz_target.write_bytes(mutate(original, mutations))
    try:
        read_gguf(fuzz_target)
    except UserError as err:
        message = str(err)
        assert str(fuzz_target) in message and "\n" not in message and len(message) < 400


LOADER = """
import sys
from llama_cpp import Llama
for path in sys.argv[1:]:
    try:
        Llama(path, n_ctx=32, verbose=False).close()
    except ValueError:
        pass
print("survived", len(sys.argv) - 1)
"""


def test_files_the_reader_accepts_do_not_crash_llama_cpp(original, tmp_path):
    """Mutants that pass validation go to llama.cpp in a child process: it may refuse them but must not die."""
    accepted = []
    for example in range(4000):
        if len(accepted) == 40:
            break
        seed = example * 2654435761 % (1 << 64)
        mutations = [("flip", (seed % 100_003) / 100_003, seed), ("u32", (seed % 7919) / 7919, seed >> 20)]
        path = tmp_path / f"mutant{len(accepted)}.gguf"
        path.write_bytes(mutate(original, mutations[: 1 + example % 2]))
        try:
            read_gguf(path)
            accepted.append(str(path))
        except UserError:
            path.unlink()
    result = subprocess.run(
        [sys.executable, "-c", LOADER, *accepted], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"survived {len(accepted)}" in result.stdout
