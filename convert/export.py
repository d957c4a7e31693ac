"""`convert_checkpoint`: a Hugging Face llama / qwen2 / GPT-2 checkpoint -> one GGUF that stock llama.cpp runs.

Tensors are streamed: the header is written from shapes alone, then each tensor is read, permuted, encoded
and written in turn, so memory holds one tensor at a time. The file appears under its final name only when
complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import quant_shape_to_byte_shape
from tqdm import tqdm

from edge_memdec.files import atomic_path, check_output_path
from edge_memdec.gguf_file import read_gguf

from . import gpt2
from .arch import (
    Hparams,
    TensorPlan,
    architecture,
    llama3_rope_factors,
    permute_rotary,
    plan_tensors,
    read_hparams,
)
from .checkpoint import Checkpoint
from .metadata import VOCAB_FINGERPRINT, memdec_fields, vocab_fingerprint
from .quantize import OutType, encode, encoded_bytes, llama_quantize, out_type, tensor_type
from .rewrite import keep_equal_tensors, split_gguf
from .tokenizer import TokenizerKeys, tokenizer_from_folder, tokenizer_from_gguf


def convert_checkpoint(
    checkpoint: Path,
    out: Path,
    outtype: str = "f16",
    tokenizer_from: Path | None = None,
    memdec: dict[str, object] | None = None,
    keep_equal_from: Path | None = None,
    split_max_bytes: int | None = None,
) -> Path:
    """Write `checkpoint` (a LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel folder) as a GGUF at `out`;
    return the file llama.cpp opens (`out`, or the first part of a split).

    outtype: f32 | f16 | bf16 | q8_0 | q5_1 | q5_0 | q4_1 | q4_0 | q4_k_m | q5_k_m | q6_k | iq4_nl.
    tokenizer_from: a base GGUF whose `tokenizer.*` keys are copied verbatim (a memory decoder then pairs with
    that base by construction); without it the tokenizer comes from the checkpoint's tokenizer.json.
    memdec: memory-decoder facts stored as `memdec.*` keys ("lambda", "domain", "base_model", "train": {...});
    `memdec.vocab_fingerprint` is always written.
    keep_equal_from: a GGUF (the base) whose encoding every tensor equal to its own keeps (a decoder's frozen
    blocks and tied embedding are then the base's bytes, exact and at the base's size).
    split_max_bytes: above this size the GGUF is written as llama.cpp split parts, NAME-00001-of-0000N.gguf.
    """
    kind = out_type(outtype)
    out = check_output_path(out, suffix=".gguf")
    extra = memdec_fields(memdec)
    ckpt = Checkpoint(Path(checkpoint))
    hp, plans = _plan(ckpt)
    if tokenizer_from is not None:
        tokenizer, source = tokenizer_from_gguf(read_gguf(tokenizer_from)), Path(tokenizer_from)
    else:
        tokenizer, source = tokenizer_from_folder(ckpt.folder), ckpt.folder / "tokenizer.json"
    tokenizer.pad_to(hp.n_vocab, source)
    extra[VOCAB_FINGERPRINT] = (vocab_fingerprint(tokenizer.tokens), GGUFValueType.STRING)
    name = _model_name(ckpt, memdec)

    with atomic_path(out) as target:  # the f32 temp of a quantized convert is swept with it if killed
        if kind.llama_ftype is None:
            _write(target, ckpt, hp, plans, tokenizer, extra, kind, name)
        else:
            f32_path = target.with_name(target.name + ".f32")
            try:
                _write(f32_path, ckpt, hp, plans, tokenizer, extra, kind, name)
                llama_quantize(f32_path, target, kind.llama_ftype)
            finally:
                f32_path.unlink(missing_ok=True)
        if keep_equal_from is not None:
            by_name = {plan.gguf_name: plan for plan in plans}
            kept = target.with_name(target.name + ".kept")
            keep_equal_tensors(target, kept, Path(keep_equal_from), lambda n: _values(ckpt, hp, by_name[n]))
            kept.replace(target)
    if split_max_bytes is not None and out.stat().st_size > split_max_bytes:
        parts = split_gguf(out, out, split_max_bytes)
        out.unlink()
        return parts[0]
    return out


def _plan(ckpt: Checkpoint) -> tuple[Hparams | gpt2.Gpt2Hparams, list[TensorPlan]]:
    """The checkpoint's hyperparameters and the GGUF tensors to write, by its architecture's rules."""
    shapes = {name: ckpt.shape(name) for name in ckpt.names}
    if architecture(ckpt.config, ckpt.folder) == "gpt2":
        gpt2_hp = gpt2.read_hparams(ckpt.config, ckpt.folder)
        return gpt2_hp, gpt2.plan_tensors(gpt2_hp, ckpt.names, shapes, ckpt.folder)
    hp = read_hparams(ckpt.config, ckpt.folder)
    return hp, plan_tensors(hp, ckpt.names, shapes, ckpt.folder)


def _write(
    path: Path,
    ckpt: Checkpoint,
    hp: Hparams | gpt2.Gpt2Hparams,
    plans: list[TensorPlan],
    tokenizer: TokenizerKeys,
    extra: dict,
    kind: OutType,
    name: str,
) -> None:
    writer = GGUFWriter(path, hp.arch)
    writer.add_name(name)
    writer.add_file_type(int(kind.file_type if kind.llama_ftype is None else 0))
    if kind.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        writer.add_quantization_version(GGML_QUANT_VERSION)
    hp.write(writer)
    for key, (value, vtype, sub) in tokenizer.fields.items():
        writer.add_key_value(key, value, vtype, sub)
    for key, (value, vtype) in extra.items():
        writer.add_key_value(key, value, vtype)

    types = []
    for plan in plans:
        qtype = tensor_type(plan.gguf_name, plan.shape, kind.tensor_type)
        types.append(qtype)
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            writer.add_tensor_info(
                plan.gguf_name, plan.shape, np.dtype(dtype), encoded_bytes(plan.shape, qtype)
            )
        else:
            byte_shape = quant_shape_to_byte_shape(plan.shape, qtype)
            writer.add_tensor_info(
                plan.gguf_name,
                byte_shape,
                np.dtype(np.uint8),
                encoded_bytes(plan.shape, qtype),
                raw_dtype=qtype,
            )
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for plan, qtype in tqdm(
            list(zip(plans, types, strict=True)),
            desc=f"converting to {kind.file_type.name.removeprefix('MOSTLY_').removeprefix('ALL_')}",
            unit="tensor",
            leave=False,
        ):
            writer.write_tensor_data(encode(_values(ckpt, hp, plan), qtype))
    finally:
        writer.close()


def _values(ckpt: Checkpoint, hp: Hparams | gpt2.Gpt2Hparams, plan: TensorPlan) -> np.ndarray:
    """The float32 values of one GGUF tensor, in PyTorch shape order."""
    if not plan.hf_name:  # only llama3-scaled llama / qwen2 plans hold one
        return llama3_rope_factors(hp)
    values = ckpt.tensor(plan.hf_name)
    if plan.transpose:
        return values.T
    return permute_rotary(values, plan.permute_heads) if plan.permute_heads else values


def _model_name(ckpt: Checkpoint, memdec: dict[str, object] | None) -> str:
    """general.name: the checkpoint's own name, else "<domain>-memdec" for a memory decoder, else its folder."""
    own = str(ckpt.config.get("_name_or_path") or "").rstrip("/")
    if own:
        return own.rsplit("/", 1)[-1]
    domain = (memdec or {}).get("domain")
    return f"{domain}-memdec" if domain else ckpt.folder.resolve().name
