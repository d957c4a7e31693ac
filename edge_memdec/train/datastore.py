"""The kNN datastore: per position of the domain text, a key (the base model's hidden state at the input of
its last feed-forward block, after that block's norm) and a value (the next token id).

Layout of a datastore folder:
  datastore.json         manifest (base, pass, windows, dim, n_positions, shards and which are finished)
  tokens.npy             int32 [n_tokens], the token stream; values are tokens[1:]
  keys-NNNNN.npy         float16 [positions in shard, dim], one file per shard, written atomically
  hidden-BBB-NNNNN.npy   float16 [positions in shard, dim]: the base's residual stream entering block BBB, the
                         input of a memory decoder whose blocks below BBB are the base's own (frozen)
Shards are computed independently, so a killed build resumes at the first unfinished shard.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE
from edge_memdec.errors import UserError
from edge_memdec.files import output_folder, write_json_atomic, write_npy_atomic
from edge_memdec.train.options import SHARD_WINDOWS
from edge_memdec.windows import sliding_windows

if TYPE_CHECKING:  # torch and transformers load only to build keys: reading a datastore does without them
    from edge_memdec.train.base import Base
    from edge_memdec.train.carry import ChunkStates

MANIFEST = "datastore.json"
PASS_MODES = ("carry", "windows")
CARRY_SINK = 4  # a carried pass keeps its first tokens in the cache: without them its keys made a worse kNN-LM


def shard_plan(n_positions: int, n_ctx: int, stride: int, shard_windows: int, mode: str) -> list[dict]:
    """Shards of consecutive positions, [{"index", "start", "stop"}], each computed on its own.

    `carry`: `shard_windows` chunks of `stride` positions per shard; `windows`: the positions owned by
    `shard_windows` consecutive 1024/512-style windows (the first window owns all of its positions)."""
    if mode == "carry":
        size = shard_windows * stride
        bounds = [(a, min(a + size, n_positions)) for a in range(0, n_positions, size)]
    else:
        windows = sliding_windows(n_positions + 1, n_ctx, stride)
        bounds = []
        for first in range(0, len(windows), shard_windows):
            last = min(first + shard_windows, len(windows))
            bounds.append((windows[first].first_new, min(windows[last - 1].end, n_positions)))
    return [{"index": i, "start": a, "stop": b} for i, (a, b) in enumerate(bounds) if a < b]


def shard_states(
    model, tokens: np.ndarray, shard: dict, n_ctx: int, stride: int, mode: str, hidden_blocks, device
) -> Iterator[ChunkStates]:
    """The states of a shard's positions, chunk by chunk: one carried pass (`carry`), or one forward per
    sliding window with its first `n_ctx - stride` tokens as context (`windows`, the paper's protocol)."""
    from edge_memdec.train.carry import CarriedForward

    if mode == "carry":
        yield from CarriedForward(model, n_ctx - stride, stride, hidden_blocks, sink=CARRY_SINK).chunks(
            tokens, shard["start"], shard["stop"], device
        )
        return
    for w in sliding_windows(len(tokens), n_ctx, stride):
        a, b = max(w.first_new, shard["start"]), min(w.end, shard["stop"])
        if a < b:
            forward = CarriedForward(model, a - w.begin, b - a, hidden_blocks)
            for states in forward.chunks(tokens[w.begin : w.end], a - w.begin, b - w.begin, device):
                states.start += w.begin
                yield states


def check_window_options(n_ctx: int, stride: int, shard_windows: int) -> None:
    """Window length and step (tokens) and windows per shard, checked before any model is loaded."""
    if n_ctx < 2 or not 1 <= stride <= n_ctx:
        raise UserError(f"--n-ctx must be at least 2 and --stride between 1 and --n-ctx, got {n_ctx} and {stride}")
    if shard_windows < 1:
        raise UserError(f"--shard-windows must be at least 1, got {shard_windows}")


def check_build_options(
    base: Base, n_ctx: int, stride: int, shard_windows: int, mode: str, hidden_blocks: tuple[int, ...]
) -> tuple[int, ...]:
    """A build's options checked on their own and against the base; returns `hidden_blocks` sorted, unique."""
    check_window_options(n_ctx, stride, shard_windows)
    if mode not in PASS_MODES:
        raise UserError(f"--pass must be one of {', '.join(PASS_MODES)}, got {mode!r}")
    n_layers = base.model.config.num_hidden_layers
    hidden_blocks = tuple(sorted(set(hidden_blocks)))
    if any(not 0 < b < n_layers for b in hidden_blocks):
        raise UserError(f"--hidden-blocks must be between 1 and {n_layers - 1} for this base, got {hidden_blocks}")
    longest = getattr(base.model.config, "max_position_embeddings", None)
    if longest and n_ctx > longest:
        raise UserError(f"--n-ctx {n_ctx} is longer than the base model's context of {longest} tokens; lower it")
    return hidden_blocks


def new_manifest(base: Base, tokens: np.ndarray, shards: list[dict], settings: dict, info: dict | None) -> dict:
    """The manifest of a build not yet started: the base, the pass `settings` (n_ctx, stride, pass,
    hidden_blocks, precision), the sizes, `shards` (none finished) and the caller's `info`."""
    return {
        "format": 2,
        "base": str(base.source),
        "n_ctx": settings["n_ctx"],
        "stride": settings["stride"],
        "pass": settings["pass"],
        "dim": base.model.config.hidden_size,
        "key": "last layer FFN input (post_attention_layernorm output)",
        "hidden_blocks": settings["hidden_blocks"],
        "forward_dtype": str(next(base.model.parameters()).dtype).removeprefix("torch."),
        "precision": settings["precision"],
        "n_tokens": len(tokens),
        "n_positions": len(tokens) - 1,
        "shards": shards,
        "finished": [],
        "seconds": 0.0,
        **(info or {}),
    }


def open_build(out_dir: Path, fresh: dict, tokens: np.ndarray) -> dict:
    """The manifest a build continues: the one in `out_dir` when it is the same build (same pass settings, shards
    and tokens; resumed), else `fresh`, written with the tokens. One sentence when the folder holds another."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        write_npy_atomic(out_dir / "tokens.npy", tokens)
        write_json_atomic(manifest_path, fresh)
        return fresh
    manifest = json.loads(manifest_path.read_text())
    fixed = ("n_ctx", "stride", "pass", "dim", "hidden_blocks", "n_tokens", "shards")
    same = all(manifest.get(k) == fresh[k] for k in fixed)
    if manifest.get("precision", "fp32") != fresh["precision"]:
        raise UserError(
            f"{out_dir} was built with --precision {manifest.get('precision', 'fp32')}; resume it with the same"
        )
    old_tokens = np.load(out_dir / "tokens.npy", mmap_mode="r") if (out_dir / "tokens.npy").is_file() else None
    if not same or old_tokens is None or not np.array_equal(old_tokens, tokens):
        raise UserError(f"{out_dir} holds a different datastore; choose an empty folder or delete it")
    return manifest


def write_shard(
    model, tokens: np.ndarray, shard: dict, manifest: dict, out_dir: Path, device, precision: str, bar: tqdm
) -> None:
    """Compute one shard's keys (and hidden states) with the manifest's pass settings and write its files
    atomically, float16 [positions in shard, dim] each; advances `bar` by the positions done."""
    from edge_memdec.train.device import autocast

    hidden_blocks = tuple(manifest["hidden_blocks"])
    keys, hidden = [], {b: [] for b in hidden_blocks}
    with autocast(device, precision):
        for states in shard_states(
            model, tokens, shard, manifest["n_ctx"], manifest["stride"], manifest["pass"], hidden_blocks, device
        ):
            keys.append(states.keys.cpu().numpy().astype(np.float16))
            for b in hidden_blocks:
                hidden[b].append(states.hidden[b].cpu().numpy().astype(np.float16))
            bar.update(len(keys[-1]))
    for b in hidden_blocks:
        write_npy_atomic(out_dir / hidden_file(b, shard["index"]), np.concatenate(hidden[b]))
    write_npy_atomic(out_dir / key_file(shard["index"]), np.concatenate(keys))


def build_datastore(
    base: Base,
    tokens: np.ndarray,
    out_dir: Path,
    n_ctx: int = PAPER_N_CTX,
    stride: int = PAPER_STRIDE,
    shard_windows: int = SHARD_WINDOWS,
    info: dict | None = None,
    mode: str = "carry",
    hidden_blocks: tuple[int, ...] = (),
    device=None,
    precision: str = "fp32",
) -> dict:
    """Run the base over `tokens` and write keys (and the residual stream entering `hidden_blocks`) shard by
    shard into `out_dir`; resumes a partial build.

    Positions 0..n_tokens-2 get keys (the last token has no next token). `mode` is `carry` (one pass, each
    position computed once, see `carry.py`) or `windows` (one forward per 1024/512 window). `precision` is a
    resolved `fp32` or `bf16` (autocast; a resume must use the build's own). Returns the manifest.
    """
    device = device or next(base.model.parameters()).device
    out_dir = Path(out_dir)
    hidden_blocks = check_build_options(base, n_ctx, stride, shard_windows, mode, hidden_blocks)
    output_folder(out_dir, "datastore")
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    if len(tokens) < 2:
        raise UserError("the datastore text has fewer than 2 tokens; give it more text")
    n_positions = len(tokens) - 1
    settings = {
        "n_ctx": n_ctx, "stride": stride, "pass": mode, "hidden_blocks": list(hidden_blocks), "precision": precision
    }
    shards = shard_plan(n_positions, n_ctx, stride, shard_windows, mode)
    fresh = new_manifest(base, tokens, shards, settings, info)
    manifest = open_build(out_dir, fresh, tokens)
    todo = [s for s in manifest["shards"] if s["index"] not in set(manifest["finished"])]
    done_positions = n_positions - sum(s["stop"] - s["start"] for s in todo)
    bar = tqdm(total=n_positions, initial=done_positions, unit="pos", desc="datastore", smoothing=0.1)
    try:
        for shard in todo:
            t0 = time.perf_counter()
            write_shard(base.model, tokens, shard, manifest, out_dir, device, precision, bar)
            manifest["finished"].append(shard["index"])
            manifest["seconds"] += time.perf_counter() - t0
            write_json_atomic(out_dir / MANIFEST, manifest)
    finally:
        bar.close()
    return manifest


def key_file(shard: int) -> str:
    """File name of one shard's keys, float16 [positions in shard, dim]."""
    return f"keys-{shard:05d}.npy"


def hidden_file(block: int, shard: int) -> str:
    """File name of one shard's residual stream entering `block`, float16 [positions in shard, dim]."""
    return f"hidden-{block:03d}-{shard:05d}.npy"


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


class ShardRows:
    """Rows of one float16 array of a finished datastore kept a file per shard (its keys, or a block's hidden
    states), read only when asked, so millions of them are never all in memory: `rows[a:b]` (a slice) and
    `rows[ids]` (int positions, any order) give float32 [m, dim] (faiss wants float32), each shard file they
    touch memory-mapped for the copy and closed again; `len(rows)` and `rows.shape` are the whole array's."""

    def __init__(self, ds_dir: Path, file_name: Callable[[int], str]):
        manifest = read_manifest(ds_dir)
        shards = sorted(manifest["shards"], key=lambda s: s["start"])
        self.shape = (manifest["n_positions"], manifest["dim"])
        self._starts = np.array([s["start"] for s in shards], dtype=np.int64)
        self._files = [Path(ds_dir) / file_name(s["index"]) for s in shards]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice | np.ndarray) -> np.ndarray:
        if isinstance(item, slice):
            start, stop, step = item.indices(len(self))
            if step != 1:
                raise ValueError("ShardRows reads slices with step 1 only")
            ids = np.arange(start, max(start, stop), dtype=np.int64)
        else:
            ids = np.asarray(item, dtype=np.int64)
            if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= len(self))):
                raise IndexError(f"row positions must be a 1-d array within [0, {len(self)})")
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            local = ids[rows] - self._starts[shard]
            stored = np.load(self._files[shard], mmap_mode="r")
            if rows[-1] - rows[0] + 1 == len(rows) and (np.diff(local) == 1).all():  # a run: one block copy
                out[rows[0] : rows[-1] + 1] = stored[local[0] : local[-1] + 1]
            else:
                out[rows] = stored[local]
            del stored  # unmapped: its pages leave this process
        return out


def datastore_keys(ds_dir: Path) -> ShardRows:
    """The keys of a finished datastore, [n_positions, dim], read from their shards as asked."""
    return ShardRows(ds_dir, key_file)


def load_keys(ds_dir: Path) -> np.ndarray:
    """All keys of a finished datastore as one float32 array [n_positions, dim] (faiss wants float32)."""
    return datastore_keys(ds_dir)[:]


def datastore_hidden(ds_dir: Path, block: int) -> ShardRows:
    """The residual stream entering `block` at every position, [n_positions, dim], read from its shards as asked
    (windows of training); UserError when the datastore does not store that block's."""
    stored = read_manifest(ds_dir).get("hidden_blocks", [])
    if block not in stored:
        raise UserError(
            f"the datastore in {ds_dir} stores no hidden states entering block {block} (stored: "
            f"{', '.join(map(str, stored)) or 'none'}); rebuild it with --hidden-blocks {block} or train with "
            "--frozen-blocks 0"
        )
    return ShardRows(ds_dir, lambda shard: hidden_file(block, shard))


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
    write_npy_atomic(ds_dir / "tokens.npy", tokens)
    for shard in manifest["shards"][len(kept) :]:
        (ds_dir / key_file(shard["index"])).unlink(missing_ok=True)
        for block in manifest.get("hidden_blocks", []):
            (ds_dir / hidden_file(block, shard["index"])).unlink(missing_ok=True)
    manifest.update(
        shards=kept,
        finished=[s["index"] for s in kept],
        n_tokens=len(tokens),
        n_positions=stop,
        trimmed_from=manifest["n_positions"],
    )
    write_json_atomic(path, manifest)
    return manifest
