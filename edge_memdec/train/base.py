"""The base model in PyTorch, and a tokenizer that splits text exactly as llama.cpp does for its GGUF.

SmolLM2 ships only as a GGUF, so the base is loaded by dequantizing the GGUF into a transformers model; a
Hugging Face checkpoint folder works too. The tokenizer is rebuilt from the GGUF's own tokens and merges.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedModel

from edge_memdec.errors import UserError


def gguf_tokenizer(gguf_path: Path) -> Tokenizer:
    """A byte-level BPE tokenizer with the GGUF's tokens, merges and control tokens (gpt2-style vocab only)."""
    from gguf import Keys, TokenType

    from edge_memdec.gguf_file import read_gguf

    meta = read_gguf(gguf_path).metadata  # bounds-checked: a missing, truncated or non-GGUF file is one sentence
    if meta.get(Keys.Tokenizer.MODEL) != "gpt2":
        raise UserError(f"{gguf_path} does not use a byte-level BPE (gpt2) tokenizer, which training needs")
    tokens = meta[Keys.Tokenizer.LIST]
    merges = [tuple(m.split(" ", 1)) for m in meta[Keys.Tokenizer.MERGES]]
    types = meta.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True) for t, k in zip(tokens, types, strict=True) if k == TokenType.CONTROL]
    )
    tok.encode_special_tokens = True
    return tok


@dataclass
class Base:
    """A causal LM in PyTorch with its tokenizer; `key_layer` is the module whose output is the datastore key."""

    model: PreTrainedModel
    tokenizer: Tokenizer
    source: Path

    @property
    def key_layer(self) -> torch.nn.Module:
        """The last decoder layer's FFN norm: its output is the input of the last feed-forward block."""
        return self.model.model.layers[-1].post_attention_layernorm

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` without BOS (SmolLM2's GGUF sets add_bos_token false), int32 [n_tokens]."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)


def load_tokenizer(source: Path) -> Tokenizer:
    """The tokenizer of a base GGUF (rebuilt to match llama.cpp) or of a checkpoint folder's tokenizer.json."""
    source = Path(source)
    if source.suffix == ".gguf":
        return gguf_tokenizer(source)
    if (source / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(source / "tokenizer.json"))
    raise UserError(f"{source} has no tokenizer.json; pass the base GGUF to take the tokenizer from")


def load_base(source: Path, dtype: torch.dtype = torch.float32, tokenizer_gguf: Path | None = None) -> Base:
    """Load a base model from a GGUF file (dequantized) or a Hugging Face checkpoint folder.

    The tokenizer comes from the GGUF (the file itself, or `tokenizer_gguf` for a checkpoint folder) so it matches
    llama.cpp; a checkpoint folder without `tokenizer_gguf` uses its own tokenizer.json.
    """
    source = Path(source)
    if source.is_file() and source.suffix == ".gguf":
        from edge_memdec.gguf_file import read_gguf

        # Both files are checked by our parser before the gguf package or transformers reads them (a broken or
        # non-GGUF file: one sentence, not their ValueError); gguf_tokenizer checks the one it reads.
        if tokenizer_gguf is not None:
            read_gguf(source)
        tokenizer = gguf_tokenizer(tokenizer_gguf or source)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=dtype)
    elif source.is_dir() and (source / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
        if tokenizer_gguf is not None:
            tokenizer = gguf_tokenizer(tokenizer_gguf)
        elif (source / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        else:
            raise UserError(f"{source} has no tokenizer.json; pass the base GGUF to take the tokenizer from")
    else:
        raise UserError(f"{source} is neither a .gguf file nor a Hugging Face checkpoint folder")
    if model.config.model_type not in ("llama", "qwen2"):
        raise UserError(
            f"{source} is a {model.config.model_type} model; only llama and qwen2 bases are supported"
        )
    model.eval()
    return Base(model=model, tokenizer=tokenizer, source=source)
