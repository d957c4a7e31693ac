"""Hugging Face GPT-2 (`GPT2LMHeadModel`) config and tensor names -> llama.cpp's `gpt2` architecture.

GPT-2 keeps its projections in `Conv1D` layers, whose weights are stored [in, out], the transpose of
nn.Linear's [out, in] that GGUF expects; they are transposed on the way. Q, K and V stay fused in one
`attn_qkv` matrix, as in both formats. The output projection is tied to the token embedding unless the config
unties it; llama.cpp then reuses `token_embd` itself. Settings that change the forward pass in ways llama.cpp's
gpt2 graph does not follow are refused rather than converted into a model that computes something else; fields
the forward pass does not read (dropout, summary_*, keys transformers does not know) are ignored, as transformers
ignores them, and reorder_and_upcast_attn only matters in fp16, while llama.cpp scores attention in f32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gguf import GGUFWriter

from edge_memdec.errors import UserError

from .arch import Shape, TensorPlan, gguf_order, positive

ARCHITECTURE = "GPT2LMHeadModel"

TOP_TENSORS = {
    "wte.weight": "token_embd.weight",
    "wpe.weight": "position_embd.weight",
    "ln_f.weight": "output_norm.weight",
    "ln_f.bias": "output_norm.bias",
}
BLOCK_TENSORS = {
    "ln_1.weight": "attn_norm.weight",
    "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight",
    "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight",
    "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight",
    "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight",
    "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight",
    "mlp.c_proj.bias": "ffn_down.bias",
}
BLOCK_NAME = re.compile(r"h\.(\d+)\.(.+)")
MASK_BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers older checkpoints saved; not weights
OUTPUT = "lm_head.weight"

# llama.cpp's gpt2 graph applies ggml_gelu: the tanh form of GELU, looked up in a table of f16 values. The
# tanh forms match it; exact (erf) "gelu" is within 5e-4 of the tanh form, less than the table's own rounding
# (tiny test model: largest logit error 3.2e-3 for gelu, 2.5e-3 for gelu_new). Other activations are refused.
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu")
# config field -> (the value llama.cpp's graph computes, what llama.cpp does instead of another value)
FIXED_SETTINGS = {
    "scale_attn_weights": (
        True,
        "llama.cpp always divides attention scores by the square root of the head size",
    ),
    "scale_attn_by_inverse_layer_idx": (
        False,
        "llama.cpp does not divide attention scores by the layer number",
    ),
    "add_cross_attention": (False, "llama.cpp's gpt2 has no cross-attention layers"),
}


@dataclass(frozen=True)
class Gpt2Hparams(Shape):
    """The numbers llama.cpp's gpt2 graph needs, read from config.json (n_ff: n_inner, default 4 * n_embd;
    n_ctx: n_positions)."""

    norm_eps: float  # LayerNorm epsilon
    arch: str = "gpt2"

    def write(self, writer: GGUFWriter) -> None:
        """Add the gpt2 hyperparameter keys."""
        self.write_shape(writer)
        writer.add_layer_norm_eps(self.norm_eps)


def read_hparams(config: dict[str, Any], folder: object) -> Gpt2Hparams:
    """Hyperparameters from a GPT2LMHeadModel config.json, refusing settings llama.cpp would not reproduce."""
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise UserError(
            f"{folder}/config.json has activation_function = {activation!r}, but llama.cpp's gpt2 computes "
            f"GELU; only {', '.join(ACTIVATIONS)} convert"
        )
    for key, (computed, instead) in FIXED_SETTINGS.items():
        value = config.get(key, computed)
        if value != computed:
            raise UserError(f"{folder}/config.json sets {key} = {value!r}, but {instead}; it cannot convert")

    def number(key: str, default: Any = None) -> Any:
        return positive(config, folder, key, default)

    n_embd, n_head = number("n_embd"), number("n_head")
    if n_embd % n_head:
        raise UserError(f"{folder}/config.json has n_embd {n_embd}, not a multiple of n_head {n_head}")
    return Gpt2Hparams(
        n_vocab=number("vocab_size"),
        n_embd=n_embd,
        n_ff=number("n_inner") if config.get("n_inner") is not None else 4 * n_embd,
        n_layer=number("n_layer"),
        n_head=n_head,
        n_ctx=number("n_positions"),
        norm_eps=float(number("layer_norm_epsilon")),
        tied=bool(config.get("tie_word_embeddings", True)),
    )


def plan_tensors(
    hp: Gpt2Hparams, names: list[str], shapes: dict[str, tuple[int, ...]], folder: object
) -> list[TensorPlan]:
    """The GGUF tensors to write, checking every tensor is known, present and of the config's shape."""
    expected = _expected_shapes(hp)
    wanted: dict[str, str] = {}
    for name in names:
        short = name.removeprefix("transformer.")
        match = BLOCK_NAME.fullmatch(short)
        if (match and match[2] in MASK_BUFFERS) or (name == OUTPUT and hp.tied):
            continue
        if name == OUTPUT:
            wanted["output.weight"] = name
        elif short in TOP_TENSORS:
            wanted[TOP_TENSORS[short]] = name
        elif match and match[2] in BLOCK_TENSORS and int(match[1]) < hp.n_layer:
            wanted[f"blk.{match[1]}.{BLOCK_TENSORS[match[2]]}"] = name
        else:
            raise UserError(
                f"{folder} has the tensor {name}, which a gpt2 model does not use; cannot convert"
            )

    missing = [gguf_name for gguf_name in expected if gguf_name not in wanted]
    if missing:
        raise UserError(f"{folder} lacks the tensor for {missing[0]}; the checkpoint is incomplete")
    plans = []
    for gguf_name in sorted(wanted, key=gguf_order):
        hf_name, shape = wanted[gguf_name], expected[gguf_name]
        transpose = _is_conv1d(gguf_name)
        stored = shape[::-1] if transpose else shape
        if shapes[hf_name] != stored:
            raise UserError(
                f"{folder}: the tensor {hf_name} has shape {list(shapes[hf_name])}, but config.json implies "
                f"{list(stored)}; fix config.json"
            )
        plans.append(TensorPlan(gguf_name, hf_name, shape, transpose=transpose))
    return plans


def _is_conv1d(gguf_name: str) -> bool:
    return gguf_name.startswith("blk.") and gguf_name.endswith(".weight") and "_norm." not in gguf_name


def _expected_shapes(hp: Gpt2Hparams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name -> shape in nn.Linear (PyTorch) order, for every tensor the gpt2 graph loads."""
    e, f = hp.n_embd, hp.n_ff
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (hp.n_vocab, e),
        "position_embd.weight": (hp.n_ctx, e),
        "output_norm.weight": (e,),
        "output_norm.bias": (e,),
    }
    if not hp.tied:
        shapes["output.weight"] = (hp.n_vocab, e)
    block = {
        "attn_norm.weight": (e,),
        "attn_norm.bias": (e,),
        "attn_qkv.weight": (3 * e, e),
        "attn_qkv.bias": (3 * e,),
        "attn_output.weight": (e, e),
        "attn_output.bias": (e,),
        "ffn_norm.weight": (e,),
        "ffn_norm.bias": (e,),
        "ffn_up.weight": (f, e),
        "ffn_up.bias": (f,),
        "ffn_down.weight": (e, f),
        "ffn_down.bias": (e,),
    }
    for i in range(hp.n_layer):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in block.items()})
    return shapes
