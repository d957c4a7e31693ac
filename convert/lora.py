"""`convert_lora`: a peft LoRA adapter folder -> a GGUF LoRA adapter that stock llama.cpp loads beside its base.

Laid out as llama.cpp's own converter (convert_lora_to_gguf.py) lays it out: each adapted base matrix, e.g.
`blk.0.attn_q.weight`, gets `blk.0.attn_q.weight.lora_a` (PyTorch order [rank, n_in]) and `.lora_b`
([n_out, rank]); general.type = adapter, adapter.type = lora, adapter.lora.alpha = peft's lora_alpha, since
llama.cpp scales B @ A by alpha / rank as peft does. The llama arch's Q and K rows are permuted in the base GGUF
(arch.py), so the lora_b of those gets the same permutation; lora_a acts on the input and stays as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFType, GGUFWriter, Keys

from edge_memdec.errors import UserError
from edge_memdec.files import atomic_path, check_output_path
from edge_memdec.gguf_file import GGUFInfo, read_gguf
from edge_memdec.lora_file import LORA_A, LORA_B, check_lora, read_lora

from .arch import BLOCK_NAME, BLOCK_TENSORS, TOP_TENSORS, permute_rotary
from .checkpoint import Checkpoint
from .metadata import memdec_fields
from .quantize import encode, out_type, tensor_type

ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # peft's name of the wrapped model in its saved keys
PEFT_HALVES = {".lora_A.weight": LORA_A, ".lora_B.weight": LORA_B}
LORA_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # llama.cpp's converter offers these
PLAIN = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def convert_lora(
    adapter: Path, base_gguf: Path, out: Path, outtype: str = "f16", train: Mapping[str, object] | None = None
) -> Path:
    """Write the peft adapter folder `adapter` (adapter_config.json + safetensors) as a GGUF LoRA for the
    model `base_gguf` at `out`, check that the written file fits that base, and return `out`. `train`: training
    facts stored as `memdec.train.*` keys (llama.cpp ignores them)."""
    if outtype.lower() not in LORA_OUTTYPES:
        raise UserError(f"a LoRA adapter is written as {', '.join(LORA_OUTTYPES)}; got --outtype {outtype}")
    kind = out_type(outtype)
    out = check_output_path(out, suffix=".gguf")
    base = read_gguf(base_gguf)
    ckpt = Checkpoint(Path(adapter), ADAPTER_CONFIG)
    alpha = _check_config(ckpt.config, ckpt.folder)
    tensors = _plan(ckpt, base)
    with atomic_path(out) as target:
        writer = GGUFWriter(target, base.arch)
        writer.add_type(GGUFType.ADAPTER)
        writer.add_string(Keys.Adapter.TYPE, "lora")
        writer.add_float32(Keys.Adapter.LORA_ALPHA, alpha)
        base_name = str(base.get("general.name") or base.path.stem)
        writer.add_name(f"{base_name}-lora")
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_name)
        for key, (value, vtype) in memdec_fields({"train": train or {}}).items():
            writer.add_key_value(key, value, vtype)
        for name, hf_name, heads in tensors:
            values = ckpt.tensor(hf_name)
            if heads:
                values = permute_rotary(values, heads)
            qtype = tensor_type(name, values.shape, kind.tensor_type)
            writer.add_tensor(name, encode(values, qtype), raw_dtype=None if qtype in PLAIN else qtype)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        check_lora(base, read_lora(target))
    return out


def _check_config(config: dict, folder: Path) -> float:
    """The adapter's alpha, after checking it is a plain LoRA a GGUF adapter can hold."""

    def refuse(what: str) -> UserError:
        return UserError(f"{folder} is {what}, which a GGUF LoRA adapter cannot hold; train a plain LoRA")

    if config.get("peft_type") != "LORA":
        raise refuse(f"a {config.get('peft_type')} adapter, not a LoRA")
    if config.get("use_dora") or config.get("use_rslora"):
        raise refuse("a DoRA or rsLoRA")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise refuse("a LoRA with per-module ranks or alphas")
    if config.get("modules_to_save") or config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise refuse("a LoRA that also trains whole modules or biases")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise UserError(f"{folder}/{ADAPTER_CONFIG} has lora_alpha = {alpha!r}; it needs a positive number")
    return float(alpha)


def _plan(ckpt: Checkpoint, base: GGUFInfo) -> list[tuple[str, str, int]]:
    """(GGUF tensor name, the adapter's tensor name, heads to permute over or 0) for every LoRA half."""
    plan = []
    for hf_name in ckpt.names:
        half = next((h for h in PEFT_HALVES if hf_name.endswith(h)), None)
        module = hf_name.removeprefix(PEFT_PREFIX)[: -len(half)] if half else ""
        weight = f"{module}.weight"
        match = BLOCK_NAME.fullmatch(weight)
        if weight in TOP_TENSORS:
            target = TOP_TENSORS[weight]
        elif match and match[2] in BLOCK_TENSORS:
            target = f"blk.{match[1]}.{BLOCK_TENSORS[match[2]]}"
        else:
            raise UserError(f"{ckpt.folder} has the tensor {hf_name}, which a GGUF LoRA adapter cannot hold")
        heads = 0
        if base.arch == "llama" and half == ".lora_B.weight" and ".attn_q." in target:
            heads = int(base.get("llama.attention.head_count"))
        elif base.arch == "llama" and half == ".lora_B.weight" and ".attn_k." in target:
            heads = int(base.get("llama.attention.head_count_kv", base.get("llama.attention.head_count")))
        plan.append((target + PEFT_HALVES[half], hf_name, heads))
    if not plan:
        raise UserError(f"{ckpt.folder} holds no LoRA weights; train an adapter first")
    return plan
