"""The memory decoder: an ordinary llama-architecture causal LM that shares the base model's tokenizer.

Four starting points: the base model's own weights (its embeddings, first N layers and final norm, with the
LM head tied to the embeddings), a Hugging Face checkpoint, a memory decoder's GGUF (dequantized; to continue
training a published decoder), or random weights of a given size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from edge_memdec.errors import UserError


@dataclass(frozen=True)
class MemdecShape:
    """Size of a memory decoder started from scratch (ignored for `base` and checkpoint starts except layers)."""

    layers: int = 10  # decoder blocks; from the base: its first `layers` blocks (0: all of them)
    hidden: int = 576  # model width
    ffn: int = 1536  # feed-forward width
    heads: int = 9  # attention heads
    kv_heads: int = 3  # key/value heads (grouped-query attention)
    base_layers: tuple[int, ...] | None = None  # which base blocks to copy (default: the first `layers`)


def parse_layers(spec: str) -> tuple[int, ...]:
    """Block indices from a spec such as "0-2,23-29"."""
    picked: list[int] = []
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            picked.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise UserError(f"cannot read the layer list {spec!r}; write it like 0-2,23-29") from None
    return tuple(picked)


def config_from_base(base_config, layers: int) -> LlamaConfig:
    """The base's llama config cut to `layers` blocks, with a tied LM head, and without the record of the GGUF the
    base was read from (a checkpoint carrying it cannot be loaded again as `--init`)."""
    settings = base_config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig(**settings)
    config.num_hidden_layers = layers
    config.tie_word_embeddings = True
    config.architectures = ["LlamaForCausalLM"]
    config.layer_types = None
    return config


def memdec_from_base(base_model: PreTrainedModel, blocks: tuple[int, ...]) -> LlamaForCausalLM:
    """A memory decoder holding copies of the base's embeddings, its blocks `blocks` (in order) and final norm.

    Keeping the last blocks matters: the base's final norm and LM head expect their output (measured on legal
    text: the first 10 of SmolLM2's 30 blocks give cross-entropy 22.4, blocks 0-2 + 23-29 give 10.0).
    """
    if base_model.config.model_type != "llama":
        raise UserError("starting a memory decoder from base weights needs a llama base; use --init scratch")
    n_base = base_model.config.num_hidden_layers
    if not blocks or any(not 0 <= b < n_base for b in blocks):
        raise UserError(f"base layers must be between 0 and {n_base - 1} for this base")
    model = LlamaForCausalLM(config_from_base(base_model.config, len(blocks)))
    source = base_model.state_dict()
    renamed = {}
    for name in model.state_dict():
        if name == "lm_head.weight":
            continue
        src = name
        if name.startswith("model.layers."):
            index, rest = name.removeprefix("model.layers.").split(".", 1)
            src = f"model.layers.{blocks[int(index)]}.{rest}"
        if src not in source:
            raise UserError(f"the base has no weight {src}; use --init scratch")
        renamed[name] = source[src].float().clone()
    model.load_state_dict(renamed, strict=False)
    model.tie_weights()
    return model


def memdec_from_scratch(base_config, shape: MemdecShape, seed: int) -> LlamaForCausalLM:
    """A randomly initialised llama memory decoder with the base's vocabulary and special token ids."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=base_config.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=base_config.max_position_embeddings,
        rms_norm_eps=base_config.rms_norm_eps,
        rope_parameters=getattr(base_config, "rope_parameters", None),
        bos_token_id=base_config.bos_token_id,
        eos_token_id=base_config.eos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def make_memdec(
    init: str, base_model: PreTrainedModel, shape: MemdecShape, seed: int = 0
) -> LlamaForCausalLM:
    """`init` is "base" (the base's first layers), "scratch", a Hugging Face checkpoint folder, or a decoder GGUF."""
    if init == "base":
        every = base_model.config.num_hidden_layers
        model = memdec_from_base(base_model, shape.base_layers or tuple(range(shape.layers or every)))
    elif init == "scratch":
        model = memdec_from_scratch(base_model.config, shape, seed)
    elif Path(init).is_dir():
        config = LlamaConfig.from_pretrained(init)
        if hasattr(config, "quantization_config"):  # earlier checkpoints copied it from the base GGUF; their weights are plain
            del config.quantization_config
        model = LlamaForCausalLM.from_pretrained(init, config=config, dtype=torch.float32)
    elif init.endswith(".gguf") and Path(init).is_file():
        model = memdec_from_gguf(Path(init))
    else:
        raise UserError(
            f"--init must be base, scratch, a checkpoint folder or a decoder GGUF; {init!r} is none of these"
        )
    if model.config.vocab_size < base_model.config.vocab_size:
        raise UserError(f"the checkpoint {init} has a smaller vocabulary than the base; it cannot share tokens")
    return model.float()


def memdec_from_gguf(path: Path) -> LlamaForCausalLM:
    """A llama-architecture decoder read back from its GGUF (one file or the first of a split set), every tensor
    dequantized to float32: a q8_0 export's trained blocks come back within its rounding, tensors written with the
    base's own bytes (frozen blocks, tied embedding) come back equal to the base's dequantized weights."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from edge_memdec.convert.rewrite import join_gguf
    from edge_memdec.gguf_file import read_gguf

    info = read_gguf(path)  # our parser first: a broken file is one sentence, not the gguf package's ValueError
    if info.arch != "llama":
        raise UserError(f"{path} is a {info.arch} model; --init reads llama-architecture decoder GGUFs")
    with tempfile.TemporaryDirectory(prefix="memdec-init-") as tmp:
        single = path if len(info.files) == 1 else join_gguf(path, Path(tmp) / "joined.gguf")
        read = AutoModelForCausalLM.from_pretrained(str(single.parent), gguf_file=single.name, dtype=torch.float32)
    # transformers marks a model read from a GGUF as quantized (no .float(), and its config records the file);
    # the weights are plain float32, so they move into an ordinary model with the record dropped.
    config = read.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(read.state_dict())
    return model


def n_params(model: torch.nn.Module) -> int:
    """Parameters counted once (a tied LM head is not counted twice)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
