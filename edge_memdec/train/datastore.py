"""The kNN datastore: per position of the domain text, a key (the base model's hidden state at the input of
its last feed-forward block, after that block's norm) and a value (the next token id).

Layout of a datastore folder:
  datastore.json         manifest (base, windows, dim, n_positions, shards and which are finished)
  tokens.npy             int32 [n_tokens], the token stream; values are tokens[1:]
  keys-NNNNN.npy         float16 [positions in shard, dim], one file per shard of windows, written atomically
Shards are independent, so a killed build resumes at the first unfinished shard.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from edge_memdec.atomic import process_alive
from edge_memdec.errors import UserError
from edge_memdec.train.windows import Window, sliding_windows

if TYPE_CHECKING:  # torch and transformers load only to build keys: reading a datastore does without them
    from edge_memdec.train.base import Base

MANIFEST = "datastore.json"


class _KeysReady(Exception):
    """Raised by the key hook to skip the rest of the forward pass (last MLP and LM head are not needed)."""


def _save_atomic(path: Path, write) -> None:
    """Call `write(temp)` for a temporary file in the same folder, then os.replace it onto `path`.

    A failed write (a full disk, a file-size limit, no permission) removes the temporary file and becomes a
    UserError naming `path`; a killed process leaves only the temporary file, which `remove_stale_temps` clears.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(
            f"writing {path} failed ({err.strerror or err}); check the free disk space and the folder's permissions"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through a temporary file in the same folder, then os.replace."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    _save_atomic(path, write)


def atomic_save_json(path: Path, data: dict) -> None:
    """JSON through a temporary file in the same folder, then os.replace."""
    _save_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8"))


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files (`.NAME.tmpPID`) that killed runs left in `folder`; live runs keep theirs."""
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def window_keys(base: Base, tokens: np.ndarray, window: Window) -> np.ndarray:
    """Keys of the positions a window owns, float16 [end - first_new, dim]."""
    import torch

    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _KeysReady

    handle = base.key_layer.register_forward_hook(hook)
    try:
        ids = torch.from_numpy(tokens[window.begin : window.end].astype(np.int64))[None]
        with torch.no_grad():
            base.model.model(input_ids=ids, use_cache=False)
    except _KeysReady:
        pass
    finally:
        handle.remove()
    hidden = captured[0][0, window.first_new - window.begin :]
    return hidden.float().numpy().astype(np.float16)


def shard_plan(windows: list[Window], shard_windows: int, n_positions: int) -> list[dict]:
    """Shards of consecutive windows: [{"index", "start", "stop", "windows": [first, last+1]}] in positions."""
    plan = []
    for i, first in enumerate(range(0, len(windows), shard_windows)):
        last = min(first + shard_windows, len(windows))
        start = windows[first].first_new
        stop = min(windows[last - 1].end, n_positions)
        if start < stop:
            plan.append({"index": i, "start": start, "stop": stop, "windows": [first, last]})
    return plan


def check_window_options(n_ctx: int, stride: int, shard_windows: int) -> None:
    """Window length and step (tokens) and windows per shard, checked before any model is loaded."""
    if n_ctx < 2 or not 1 <= stride <= n_ctx:
        raise UserError(f"--n-ctx must be at least 2 and --stride between 1 and --n-ctx, got {n_ctx} and {stride}")
    if shard_windows < 1:
        raise UserError(f"--shard-windows must be at least 1, got {shard_windows}")


def build_datastore(
    base: Base,
    tokens: np.ndarray,
    out_dir: Path,
    n_ctx: int = 1024,
    stride: int = 512,
    shard_windows: int = 32,
    info: dict | None = None,
) -> dict:
    """Run the base over `tokens` and write keys shard by shard into `out_dir`; resumes a partial build.

    Positions 0..n_tokens-2 get keys (the last token has no next token). Returns the manifest.
    """
    out_dir = Path(out_dir)
    check_window_options(n_ctx, stride, shard_windows)
    longest = getattr(base.model.config, "max_position_embeddings", None)
    if longest and n_ctx > longest:
        raise UserError(f"--n-ctx {n_ctx} is longer than the base model's context of {longest} tokens; lower it")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the datastore folder {out_dir} ({err.strerror or err})") from None
    remove_stale_temps(out_dir)
    manifest_path = out_dir / MANIFEST
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    if len(tokens) < 2:
        raise UserError("the datastore text has fewer than 2 tokens; give it more text")
    n_positions = len(tokens) - 1
    windows = sliding_windows(len(tokens), n_ctx, stride)
    dim = base.model.config.hidden_size
    fresh = {
        "format": 1,
        "base": str(base.source),
        "n_ctx": n_ctx,
        "stride": stride,
        "dim": dim,
        "key": "last layer FFN input (post_attention_layernorm output)",
        "forward_dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
        "n_tokens": len(tokens),
        "n_positions": n_positions,
        "shards": shard_plan(windows, shard_windows, n_positions),
        "finished": [],
        "seconds": 0.0,
        **(info or {}),
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        same = all(manifest.get(k) == fresh[k] for k in ("n_ctx", "stride", "dim", "n_tokens", "shards"))
        old_tokens = (
            np.load(out_dir / "tokens.npy", mmap_mode="r") if (out_dir / "tokens.npy").is_file() else None
        )
        if not same or old_tokens is None or not np.array_equal(old_tokens, tokens):
            raise UserError(f"{out_dir} holds a different datastore; choose an empty folder or delete it")
    else:
        atomic_save_npy(out_dir / "tokens.npy", tokens)
        manifest = fresh
        atomic_save_json(manifest_path, manifest)
    todo = [s for s in manifest["shards"] if s["index"] not in set(manifest["finished"])]
    done_positions = n_positions - sum(s["stop"] - s["start"] for s in todo)
    bar = tqdm(total=n_positions, initial=done_positions, unit="pos", desc="datastore", smoothing=0.1)
    try:
        for shard in todo:
            t0 = time.perf_counter()
            parts = []
            for window in windows[shard["windows"][0] : shard["windows"][1]]:
                keys = window_keys(base, tokens, window)
                parts.append(keys)
                bar.update(min(len(keys), n_positions - window.first_new))
            keys = np.concatenate(parts)[: shard["stop"] - shard["start"]]
            atomic_save_npy(out_dir / f"keys-{shard['index']:05d}.npy", keys)
            manifest["finished"].append(shard["index"])
            manifest["seconds"] += time.perf_counter() - t0
            atomic_save_json(manifest_path, manifest)
    finally:
        bar.close()
    return manifest


def read_manifest(ds_dir: Path) -> dict:
    """The manifest of a finished datastore; raises UserError if the folder is not one or is unfinished."""
    path = Path(ds_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{ds_dir} is not a datastore folder; run `edge-memdec datastore build` first")
    manifest = json.loads(path.read_text())
    if len(manifest["finished"]) != len(manifest["shards"]):
        raise UserError(
            f"the datastore in {ds_dir} is unfinished; rerun `edge-memdec datastore build` to resume"
        )
    return manifest


def load_keys(ds_dir: Path) -> np.ndarray:
    """All keys of a finished datastore as one float32 array [n_positions, dim] (faiss wants float32)."""
    manifest = read_manifest(ds_dir)
    keys = np.empty((manifest["n_positions"], manifest["dim"]), dtype=np.float32)
    for shard in manifest["shards"]:
        keys[shard["start"] : shard["stop"]] = np.load(Path(ds_dir) / f"keys-{shard['index']:05d}.npy")
    return keys


def load_values(ds_dir: Path) -> np.ndarray:
    """Next-token ids of every datastore position, int32 [n_positions]."""
    read_manifest(ds_dir)
    return np.load(Path(ds_dir) / "tokens.npy")[1:].copy()


def trim_to_finished(ds_dir: Path) -> dict:
    """Turn a partial build into a finished, smaller datastore holding its leading finished shards.

    Shards are built in order, so the finished ones before the first gap cover positions [0, stop); the token
    stream is cut to stop + 1 tokens (the last kept position still has its next token). Used to time-box a build.
    """
    ds_dir = Path(ds_dir)
    path = ds_dir / MANIFEST
    if not path.is_file():
        raise UserError(f"{ds_dir} is not a datastore folder")
    manifest = json.loads(path.read_text())
    finished = set(manifest["finished"])
    kept = []
    for shard in manifest["shards"]:
        if shard["index"] not in finished:
            break
        kept.append(shard)
    if not kept:
        raise UserError(f"the datastore in {ds_dir} has no finished shard yet; let the build run longer")
    stop = kept[-1]["stop"]
    tokens = np.load(ds_dir / "tokens.npy")[: stop + 1]
    atomic_save_npy(ds_dir / "tokens.npy", tokens)
    for shard in manifest["shards"][len(kept) :]:
        (ds_dir / f"keys-{shard['index']:05d}.npy").unlink(missing_ok=True)
    manifest.update(
        shards=kept,
        finished=[s["index"] for s in kept],
        n_tokens=len(tokens),
        n_positions=stop,
        trimmed_from=manifest["n_positions"],
    )
    atomic_save_json(path, manifest)
    return manifest
