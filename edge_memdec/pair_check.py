"""Can this memory decoder run beside this base model? The checks llama.cpp makes for a draft model.

The two models' next-token distributions are mixed id by id, so they must mean the same text by the same id:
same tokenizer type, same BOS and EOS, vocabularies of nearly the same size (padded embeddings differ by a few
rows) and identical token texts on every shared id. `shared_blocks` says how many of the base's blocks the
decoder holds byte for byte (the shared trunk, trunk.py, then runs them once).
"""

from __future__ import annotations

import numpy as np

from edge_memdec.errors import refuse_misfit
from edge_memdec.gguf_file import GGUFInfo

MAX_VOCAB_DIFFERENCE = 128  # llama.cpp's SPEC_VOCAB_MAX_SIZE_DIFFERENCE
FIRST_CHECKED_ID = 5  # llama.cpp's SPEC_VOCAB_CHECK_START_TOKEN_ID: the first ids are often special tokens


def pair_problems(base: GGUFInfo, memdec: GGUFInfo) -> list[str]:
    """Every reason the two models cannot be mixed, one sentence each; an empty list means compatible."""
    problems = []
    base_model, memdec_model = base.get("tokenizer.ggml.model"), memdec.get("tokenizer.ggml.model")
    if base_model != memdec_model:
        problems.append(f"the tokenizer types differ (base {base_model}, memory decoder {memdec_model})")
    for special in ("bos", "eos"):
        key = f"tokenizer.ggml.{special}_token_id"
        if base.get(key) != memdec.get(key):
            problems.append(
                f"the {special.upper()} token ids differ (base {base.get(key)}, memory decoder {memdec.get(key)})"
            )
    if abs(base.n_vocab - memdec.n_vocab) > MAX_VOCAB_DIFFERENCE:
        problems.append(
            f"the vocabulary sizes differ by more than {MAX_VOCAB_DIFFERENCE} tokens "
            f"(base {base.n_vocab}, memory decoder {memdec.n_vocab})"
        )
    for token_id in range(FIRST_CHECKED_ID, min(base.n_vocab, memdec.n_vocab)):
        base_text, memdec_text = base.tokens[token_id], memdec.tokens[token_id]
        if base_text != memdec_text:
            problems.append(
                f"the text of token {token_id} differs (base {_shown(base_text)}, memory decoder {_shown(memdec_text)})"
            )
            break
    return problems


def check_pair(base: GGUFInfo, memdec: GGUFInfo) -> None:
    """Raise UserError with the first problem when the memory decoder cannot run beside the base model."""
    refuse_misfit(
        f"the memory decoder {memdec.path.name}",
        base.path.name,
        pair_problems(base, memdec),
        "use a memory decoder made with the base model's tokenizer",
    )


def _shown(text: str) -> str:
    """A token text for a message: quoted, escaped, and cut short."""
    shown = ascii(text)
    return shown if len(shown) <= 40 else shown[:37] + "..."


# Hyperparameters that must agree for the base's hidden state to be the decoder's (besides equal tensors).
SHARED_KEYS = (
    "embedding_length",
    "feed_forward_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.layer_norm_rms_epsilon",
    "rope.freq_base",
    "rope.dimension_count",
    "rope.scaling.type",
    "rope.scaling.factor",
)


def shared_blocks(base: GGUFInfo, memdec: GGUFInfo) -> int:
    """How many leading blocks the decoder holds byte for byte as the base does (0: nothing to share).

    Only llama-family files of the same architecture share: every tensor of such a block has the same name, type,
    shape and bytes in both, and the hyperparameters that shape a block agree."""
    if base.arch != memdec.arch or base.arch not in ("llama", "qwen2"):
        return 0
    if any(base.get(f"{base.arch}.{k}") != memdec.get(f"{memdec.arch}.{k}") for k in SHARED_KEYS):
        return 0
    theirs = {t.name: t for t in base.tensors}
    ours: dict[int, list] = {}
    for tensor in memdec.tensors:
        if tensor.name.startswith("blk."):
            ours.setdefault(int(tensor.name.split(".")[1]), []).append(tensor)
    n = 0
    while n < min(base.n_layers, memdec.n_layers) - 1 and ours.get(n):
        for tensor in ours[n]:
            other = theirs.get(tensor.name)
            if other is None or (other.dtype, other.shape) != (tensor.dtype, tensor.shape):
                return n
            if not np.array_equal(base.tensor_bytes(other), memdec.tensor_bytes(tensor)):
                return n
        if len(ours[n]) != sum(1 for name in theirs if name.startswith(f"blk.{n}.")):
            return n
        n += 1
    return n
