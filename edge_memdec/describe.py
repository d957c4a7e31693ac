"""`edge-memdec inspect`: what a GGUF holds (arch, size, quantization, tokenizer, memdec metadata), and
whether a memory decoder pairs with a base model; for a LoRA adapter, its rank, alpha and targets, and whether
it fits a base."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from edge_memdec.gguf_file import ARCH_RULES, GGUFInfo, read_any_gguf, read_gguf
from edge_memdec.lora_file import LoraInfo, lora_problems, read_lora
from edge_memdec.pair_check import pair_problems, shared_blocks

LABEL_WIDTH = 12


def inspect_text(path: str | Path, base: str | Path | None = None) -> str:
    """A short human-readable report on one GGUF file; with `base`, also whether the two models pair (or the
    adapter fits the base)."""
    info = read_any_gguf(path)
    if info.get("general.type") == "adapter":
        return _lines(_lora_lines(read_lora(path), base))
    lines = [
        ("file", f"{info.path.name} ({size_text(info.n_bytes)}, GGUF v{info.version}{_parts(info)})"),
        ("name", str(info.get("general.name", "-"))),
        ("arch", _arch(info)),
        ("parameters", f"{_count(info.n_params)} ({info.n_params:,})"),
        ("file type", f"{info.file_type} (tensors: {_tensor_types(info)})"),
        ("tokenizer", _tokenizer(info)),
        ("chat", "has a chat template" if info.get("tokenizer.chat_template") else "no chat template"),
        ("memdec", _memdec(info)),
    ]
    if "lambda" not in info.memdec and _training(info):
        lines.append(("training", _training(info)))
    if base is not None:
        base_info = read_gguf(base)
        problems = pair_problems(base_info, info)
        verdict = (
            f"compatible with {base_info.path.name}"
            if not problems
            else f"NOT compatible with {base_info.path.name}"
        )
        lines.append(("pair", verdict))
        lines += [("", f"- {problem}") for problem in problems]
        shared = shared_blocks(base_info, info) if not problems else 0
        if shared:
            lines.append(("trunk", f"its first {shared} blocks are the base's own: beside it they run once"))
    return _lines(lines)


def _parts(info: GGUFInfo) -> str:
    """', split in N parts of at most X' for a split GGUF, else nothing."""
    if len(info.files) == 1:
        return ""
    return f", split in {len(info.files)} parts of at most {size_text(max(f.stat().st_size for f in info.files))}"


def _lines(lines: list[tuple[str, str]]) -> str:
    return "\n".join(f"{label:<{LABEL_WIDTH}} {text}".rstrip() for label, text in lines)


def _lora_lines(lora: LoraInfo, base: str | Path | None) -> list[tuple[str, str]]:
    info = lora.header
    ranks = "/".join(map(str, lora.ranks))
    scale = f"{lora.alpha / lora.ranks[0]:.3g} x B @ A per unit of --lora's scale" if len(lora.ranks) == 1 else ""
    blocks = sorted({p.target.split(".")[1] for p in lora.pairs if p.target.startswith("blk.")}, key=int)
    kinds = Counter(p.target.split(".")[-2] if p.target.startswith("blk.") else p.target for p in lora.pairs)
    order = {name: i for i, name in enumerate(ARCH_RULES[lora.arch].block_tensors)}
    lines = [
        ("file", f"{info.path.name} ({size_text(info.n_bytes)}, GGUF v{info.version})"),
        ("name", str(info.get("general.name", "-"))),
        ("kind", f"LoRA adapter for a {lora.arch} model" + (f", made for {lora.base_name}" if lora.base_name else "")),
        ("lora", f"rank {ranks}, alpha {lora.alpha:g}" + (f" ({scale})" if scale else "")),
        ("targets", f"{len(lora.pairs)} matrices in {len(blocks)} blocks: " + ", ".join(sorted(kinds, key=lambda k: order.get(k, -1)))),
        ("parameters", f"{_count(info.n_params)} ({info.n_params:,})"),
        ("file type", f"tensors: {_tensor_types(info)}"),
    ]
    if _training(info):
        lines.append(("training", _training(info)))
    if base is not None:
        base_info = read_gguf(base)
        problems = lora_problems(base_info, lora)
        verdict = f"fits {base_info.path.name}" if not problems else f"does NOT fit {base_info.path.name}"
        lines.append(("base", verdict))
        lines += [("", f"- {problem}") for problem in problems]
    return lines


def _arch(info: GGUFInfo) -> str:
    arch = info.arch
    n_head, n_head_kv = info.get(f"{arch}.attention.head_count"), info.get(f"{arch}.attention.head_count_kv")
    return (
        f"{arch}, {info.get(f'{arch}.block_count')} layers, hidden {info.get(f'{arch}.embedding_length')}, "
        f"{n_head} heads ({n_head_kv or n_head} kv), trained context {info.n_ctx_train}"
    )


def _tensor_types(info: GGUFInfo) -> str:
    counts = Counter(t.dtype for t in info.tensors)
    return ", ".join(f"{count} {dtype}" for dtype, count in counts.most_common())


def _tokenizer(info: GGUFInfo) -> str:
    parts = [
        f"{info.get('tokenizer.ggml.model')} (pre {info.get('tokenizer.ggml.pre', 'default')})",
        f"{info.n_vocab:,} tokens",
    ]
    for special in ("bos", "eos"):
        token_id = info.get(f"tokenizer.ggml.{special}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < info.n_vocab:
            parts.append(f"{special} {token_id} {ascii(info.tokens[token_id])}")
        else:
            parts.append(f"{special} {token_id if token_id is not None else 'none'}")
    return ", ".join(parts)


def _training(info: GGUFInfo) -> str:
    """The `memdec.train.*` facts a fine-tuned model or adapter carries, e.g. "kind lora, tokens 5176, ..."."""
    facts = {k.removeprefix("train."): v for k, v in info.memdec.items() if k.startswith("train.")}
    return ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in facts.items())


def _memdec(info: GGUFInfo) -> str:
    facts = info.memdec
    if "lambda" not in facts:
        return "none (an ordinary model, not a memory decoder)"
    shown = []
    for key, value in facts.items():
        if isinstance(value, float):
            value = f"{value:.6g}"
        elif key == "vocab_fingerprint":
            value = str(value)[:16]
        shown.append(f"{key} {value}")
    return ", ".join(shown)


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.1f}{suffix}"
    return str(n)


def size_text(n: int) -> str:
    """A byte count for people: "3.2 MiB"."""
    for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} bytes"
