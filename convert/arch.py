"""Hugging Face llama / qwen2 config and tensor names -> GGUF hyperparameters and tensor names.

The architecture check and `TensorPlan` are shared with GPT-2, whose own names live in `gpt2.py`.

GGUF shapes are PyTorch shapes reversed; the gguf writer does the reversal, so shapes here are PyTorch order.
llama.cpp's llama graph applies rotary embeddings to interleaved pairs, Hugging Face's to the two halves of
each head, so Q and K of the llama arch are permuted here; qwen2 uses the halves convention and is not.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFWriter, RopeScalingType

from edge_memdec.errors import UserError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "GPT2LMHeadModel": "gpt2"}

TOP_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
REQUIRED_BLOCK_TENSORS = [name for name in BLOCK_TENSORS if not name.endswith(".bias")]
BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
ROPE_FREQS = "rope_freqs.weight"


def positive(config: dict[str, Any], folder: object, key: str, default: Any = None) -> Any:
    """config.json's `key` (or `default`), which must be a positive number; else one sentence naming it."""
    value = config.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{folder}/config.json has {key} = {value!r}; it needs a positive number")
    return value


@dataclass(frozen=True)
class Shape:
    """The sizes every architecture here writes the same way (llama, qwen2, gpt2)."""

    n_vocab: int  # rows of the token embedding
    n_embd: int
    n_ff: int  # inner size of the MLP
    n_layer: int
    n_head: int
    n_ctx: int  # trained (llama, qwen2) or largest (gpt2: position embedding rows) context, tokens
    tied: bool  # output projection shares the token embedding

    def write_shape(self, writer: GGUFWriter) -> None:
        """Add the sizes' keys under the writer's architecture."""
        writer.add_vocab_size(self.n_vocab)
        writer.add_context_length(self.n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_block_count(self.n_layer)
        writer.add_head_count(self.n_head)


@dataclass(frozen=True)
class Hparams(Shape):
    """The numbers llama.cpp needs to build a llama or qwen2 graph, read from config.json."""

    arch: str  # GGUF architecture: "llama" or "qwen2"
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any]  # the config's rope parameters (rope_type and its factors)

    def write(self, writer: GGUFWriter) -> None:
        """Add the architecture's hyperparameter keys."""
        self.write_shape(writer)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_rope_dimension_count(self.head_dim)
        if self.head_dim * self.n_head != self.n_embd:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        if self.rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))


def architecture(config: dict[str, Any], folder: object) -> str:
    """The GGUF architecture of a config.json's model class ("llama", "qwen2" or "gpt2"); others fail."""
    names = config.get("architectures") or []
    supported = [ARCHITECTURES[name] for name in names if name in ARCHITECTURES]
    if not supported:
        shown = ", ".join(map(str, names)) or "none"
        raise UserError(
            f"{folder} holds a {shown} model; only {', '.join(ARCHITECTURES)} checkpoints convert"
        )
    return supported[0]


def read_hparams(config: dict[str, Any], folder: object) -> Hparams:
    """Hyperparameters of a llama or qwen2 config.json (transformers 4 or 5 layout)."""
    arch = architecture(config, folder)
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{folder} uses the activation {config['hidden_act']!r}; llama and qwen2 need silu")

    def number(key: str, default: Any = None) -> Any:
        return positive(config, folder, key, default)

    n_embd, n_head = number("hidden_size"), number("num_attention_heads")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope["rope_type"] = rope_type
    if rope_type not in ("default", "linear", "llama3"):
        raise UserError(f"{folder} uses {rope_type!r} rope scaling; only default, linear and llama3 convert")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return Hparams(
        arch=arch,
        n_vocab=number("vocab_size"),
        n_embd=n_embd,
        n_ff=number("intermediate_size"),
        n_layer=number("num_hidden_layers"),
        n_head=n_head,
        n_head_kv=number("num_key_value_heads", n_head),
        head_dim=number("head_dim") if config.get("head_dim") is not None else n_embd // n_head,
        n_ctx=number("max_position_embeddings"),
        rms_eps=float(number("rms_norm_eps")),
        rope_theta=float(theta),
        rope=rope,
        tied=bool(config.get("tie_word_embeddings", False)),
    )


@dataclass(frozen=True)
class TensorPlan:
    """Where one GGUF tensor comes from."""

    gguf_name: str
    hf_name: str  # name in the checkpoint; "" for tensors computed from the config (rope_freqs)
    shape: tuple[int, ...]  # PyTorch order
    permute_heads: int = 0  # llama Q/K: number of heads to permute over; 0 = copy as is
    transpose: bool = False  # GPT-2 Conv1D weight: stored [in, out], written as nn.Linear's [out, in]


def plan_tensors(
    hp: Hparams, names: list[str], shapes: dict[str, tuple[int, ...]], folder: object
) -> list[TensorPlan]:
    """The GGUF tensors to write, in llama.cpp's usual order, checking nothing is missing or unknown."""
    wanted: dict[str, str] = {}
    for name in names:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and hp.tied):
            continue
        match = BLOCK_NAME.fullmatch(name)
        if name in TOP_TENSORS:
            wanted[TOP_TENSORS[name]] = name
        elif match and match[2] in BLOCK_TENSORS and int(match[1]) < hp.n_layer:
            wanted[f"blk.{match[1]}.{BLOCK_TENSORS[match[2]]}"] = name
        else:
            raise UserError(
                f"{folder} has the tensor {name}, which a {hp.arch} model does not use; cannot convert"
            )

    required = ["token_embd.weight", "output_norm.weight"] + ([] if hp.tied else ["output.weight"])
    required += [f"blk.{i}.{BLOCK_TENSORS[t]}" for i in range(hp.n_layer) for t in REQUIRED_BLOCK_TENSORS]
    missing = [name for name in required if name not in wanted]
    if missing:
        raise UserError(f"{folder} lacks the tensor for {missing[0]}; the checkpoint is incomplete")
    embd_shape = shapes[wanted["token_embd.weight"]]
    if embd_shape != (hp.n_vocab, hp.n_embd):
        raise UserError(
            f"{folder}: the embedding has shape {list(embd_shape)}, but config.json says "
            f"{hp.n_vocab} x {hp.n_embd}; fix config.json"
        )

    plans = []
    if hp.rope["rope_type"] == "llama3":
        plans.append(TensorPlan(ROPE_FREQS, "", (hp.head_dim // 2,)))
    for gguf_name in sorted(wanted, key=gguf_order):
        heads = 0
        if hp.arch == "llama" and ".attn_q." in gguf_name:
            heads = hp.n_head
        elif hp.arch == "llama" and ".attn_k." in gguf_name:
            heads = hp.n_head_kv
        plans.append(TensorPlan(gguf_name, wanted[gguf_name], shapes[wanted[gguf_name]], heads))
    return plans


def gguf_order(name: str) -> tuple[int, str]:
    """Sort key of a GGUF tensor name: token_embd first, then the blocks in order, then the other top tensors."""
    match = re.fullmatch(r"blk\.(\d+)\..+", name)
    if match:
        return (1 + int(match[1]), name)
    return (0 if name == "token_embd.weight" else 1 << 20, name)


def permute_rotary(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a Q or K projection (or bias) from Hugging Face's half-split rotary layout to
    llama.cpp's interleaved one: within each head, rows [a0..a(d/2-1), b0..] become [a0, b0, a1, b1, ...]."""
    head_rows = weights.shape[0] // n_heads
    grouped = weights.reshape(n_heads, 2, head_rows // 2, *weights.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weights.shape)


def llama3_rope_factors(hp: Hparams) -> np.ndarray:
    """Per-frequency divisors of the rotary base for llama3 rope scaling, shape [head_dim // 2], float32.

    Wavelengths shorter than original_context / high_freq_factor keep their frequency, those longer than
    original_context / low_freq_factor are slowed by `factor`, and the band between is interpolated smoothly.
    """
    factor = float(hp.rope["factor"])
    low, high = float(hp.rope.get("low_freq_factor", 1.0)), float(hp.rope.get("high_freq_factor", 4.0))
    original = float(hp.rope.get("original_max_position_embeddings", 8192))
    freqs = hp.rope_theta ** -(np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelength = 2 * math.pi / freqs
    smooth = np.clip((original / wavelength - low) / (high - low), 0.0, 1.0)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).astype(np.float32)
