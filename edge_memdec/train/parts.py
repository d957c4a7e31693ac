"""A trained memory decoder as small files: only the tensors training changed, cut into parts of bounded size.

A decoder whose lower blocks are the base's own differs from the base in its upper blocks and final norm
(and an untied head); those tensors alone, in parts of at most `max_bytes`, move where a whole checkpoint
cannot (a GPU machine's size-limited outbox, a git host). `unpack` rebuilds the Hugging Face folder from the
same base, ready for `edge-memdec convert`.

Layout: parts.json (config, base, tensor -> part and rows, sha256 of each part) and part-NNNNN.safetensors.
A tensor larger than one part is cut along its first dimension.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from edge_memdec.errors import UserError
from edge_memdec.files import write_atomic, write_json_atomic
from edge_memdec.train.steps import HF_DIR, SUMMARY

MANIFEST = "parts.json"
PART_BYTES = 16 * 1024 * 1024


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_tensors(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The tensors of `trained` that the base lacks or holds with other values (float32 numpy)."""
    out = {}
    for name, value in trained.items():
        if name not in base or not torch.equal(value, base[name].to(value.dtype)):
            out[name] = value.detach().float().numpy()
    return out


def pack(model, base_model, out_dir: Path, max_bytes: int = PART_BYTES, max_parts: int = 8) -> dict:
    """Write the tensors of `model` that differ from `base_model`'s copy (see memdec_from_base) as parts.

    float32 when they fit in `max_parts` parts, else float16. Returns the manifest."""
    from edge_memdec.train.memdec_model import memdec_from_base

    reference = memdec_from_base(base_model, tuple(range(base_model.config.num_hidden_layers))).state_dict()
    tensors = changed_tensors(model.state_dict(), reference)
    total = sum(v.nbytes for v in tensors.values())
    dtype = np.float32 if total <= max_bytes * max_parts * 0.98 else np.float16
    if sum(v.size * np.dtype(dtype).itemsize for v in tensors.values()) > max_bytes * max_parts * 0.98:
        raise UserError(f"the trained tensors do not fit in {max_parts} parts of {max_bytes} bytes")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[dict[str, np.ndarray]] = [{}]
    room = max_bytes - 4096  # safetensors header
    index = {}
    for name, value in tensors.items():
        value = value.astype(dtype)
        row_bytes = max(1, value[0].nbytes if value.ndim > 1 else value.nbytes)
        start = 0
        rows = len(value) if value.ndim > 1 else 1
        while start < rows:
            used = sum(v.nbytes for v in parts[-1].values())
            fit = (room - used) // row_bytes
            if fit < 1:
                parts.append({})
                continue
            stop = min(rows, start + fit)
            piece = value[start:stop] if value.ndim > 1 else value
            key = f"{name}@{start}"
            parts[-1][key] = np.ascontiguousarray(piece)
            index.setdefault(name, []).append({"part": len(parts), "key": key, "rows": [start, stop]})
            start = stop
    files = []
    for i, part in enumerate(parts, 1):
        path = out_dir / f"part-{i:05d}.safetensors"
        write_atomic(path, lambda temp, part=part: save_file(part, str(temp)))
        files.append({"file": path.name, "sha256": _sha256(path), "bytes": path.stat().st_size})
    manifest = {
        "format": 1,
        "config": model.config.to_dict(),
        "dtype": np.dtype(dtype).name,
        "tensors": index,
        "parts": files,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


def unpack(parts_dir: Path, base_model, hf_dir: Path) -> Path:
    """Rebuild the decoder's Hugging Face folder from `parts_dir` and the base it was trained from."""
    from transformers import LlamaConfig

    from edge_memdec.train.memdec_model import memdec_from_base

    parts_dir = Path(parts_dir)
    path = parts_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{parts_dir} holds no {MANIFEST}; pack a trained run with `edge-memdec parts pack`")
    manifest = json.loads(path.read_text())
    for entry in manifest["parts"]:
        part = parts_dir / entry["file"]
        if not part.is_file() or _sha256(part) != entry["sha256"]:
            raise UserError(
                f"{part} is missing or damaged (its sha256 does not match {MANIFEST}); copy it again"
            )
    loaded = {i: load_file(str(parts_dir / e["file"])) for i, e in enumerate(manifest["parts"], 1)}
    model = memdec_from_base(base_model, tuple(range(base_model.config.num_hidden_layers)))
    config = LlamaConfig(**{k: v for k, v in manifest["config"].items() if k != "transformers_version"})
    if not config.tie_word_embeddings:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    state = model.state_dict()
    for name, pieces in manifest["tensors"].items():
        if name not in state:
            raise UserError(
                f"the parts hold {name}, which this base's decoder has not; use the base they came from"
            )
        value = (
            np.concatenate([loaded[p["part"]][p["key"]] for p in pieces])
            if len(pieces) > 1
            else (loaded[pieces[0]["part"]][pieces[0]["key"]])
        )
        if tuple(value.shape) != tuple(state[name].shape):
            raise UserError(
                f"{name} in the parts has shape {value.shape}, the base's decoder {tuple(state[name].shape)}"
            )
        with torch.no_grad():
            state[name].copy_(torch.from_numpy(value.astype(np.float32)))
    model.save_pretrained(hf_dir, safe_serialization=True)
    return Path(hf_dir)


def pack_run(run_dir: Path, out_dir: Path, base: Path | None = None) -> dict:
    """`edge-memdec parts pack`: the parts of a finished training run (`run_dir/hf`) against its base."""
    from transformers import AutoModelForCausalLM

    from edge_memdec.train.base import load_base

    run_dir = Path(run_dir)
    if not (run_dir / HF_DIR / "config.json").is_file():
        raise UserError(f"{run_dir} has no trained model (hf/config.json); run `edge-memdec train` first")
    base = base or Path(json.loads((run_dir / SUMMARY).read_text())["config"]["base"])
    model = AutoModelForCausalLM.from_pretrained(str(run_dir / HF_DIR), dtype=torch.float32)
    return pack(model, load_base(base).model, out_dir)


def unpack_parts(parts_dir: Path, out_hf: Path, base: Path) -> Path:
    """`edge-memdec parts unpack`: the Hugging Face folder of a packed decoder, rebuilt on `base`."""
    from edge_memdec.train.base import load_base

    return unpack(parts_dir, load_base(base).model, out_hf)
