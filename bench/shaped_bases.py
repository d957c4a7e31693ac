"""Bases shaped like SmolLM2-360M and SmolLM2-1.7B (their published configurations, random weights), for timing
the pair beside a larger base: never for a quality claim. Built once through our own converter (Q4_K_M, SmolLM2's
tokenizer copied from the real 135M GGUF, so the shipped memory decoder pairs with them) and cached outside the
repository, under the user cache (`edge_memdec.paths.cache_dir("bench-bases")`).

    python bench/shaped_bases.py [--shapes 360m,1.7b] [--outtype q4_k_m]

Prints each GGUF's path and size. Needs the train extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from edge_memdec.paths import cache_dir, default_base_gguf

# The published SmolLM2 configurations (all: vocab 49,152, tied embeddings, SiLU MLP, RMSNorm eps 1e-5).
SHAPES: dict[str, dict] = {
    "360m": dict(
        hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
        num_key_value_heads=5, rope_theta=100000.0,
    ),
    "1.7b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, rope_theta=130000.0,
    ),
}  # fmt: skip
VOCAB = 49152
WEIGHT_STD = 0.02


def shaped_base(shape: str, outtype: str = "q4_k_m") -> Path:
    """The cached GGUF of a random base shaped like SmolLM2-`shape`; built on first use (minutes for 1.7b)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_memdec.convert import convert_checkpoint

    out = cache_dir("bench-bases") / f"smollm2-{shape}-shaped-random-{outtype}.gguf"
    if out.is_file():
        return out
    config = LlamaConfig(
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float16",
        **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.float16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, WEIGHT_STD)
    folder = Path(tempfile.mkdtemp(prefix=f"shaped-{shape}-"))
    try:
        model.save_pretrained(folder, safe_serialization=True)
        del model
        convert_checkpoint(folder, out, outtype, tokenizer_from=default_base_gguf())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="360m,1.7b")
    parser.add_argument("--outtype", default="q4_k_m")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        if shape not in SHAPES:
            parser.error(f"unknown shape {shape!r}; use {', '.join(SHAPES)}")
        t0 = time.perf_counter()
        path = shaped_base(shape, args.outtype)
        print(f"{shape}: {path} ({path.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
