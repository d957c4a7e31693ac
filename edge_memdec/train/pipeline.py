"""Glue between the CLI and the training stages: resolve paths and defaults, load the base once, print results."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from edge_memdec.corpus import Document, load_corpus, read_split
from edge_memdec.errors import UserError
from edge_memdec.paths import default_base_gguf
from edge_memdec.train.base import Base, load_base, load_tokenizer


def split_documents_of(corpus: Path, split: str) -> list[Document]:
    """Documents of `split` in a split folder, or every document of a .txt/.jsonl file or .txt folder."""
    corpus = Path(corpus)
    if corpus.is_dir() and (corpus / "manifest.json").is_file():
        return read_split(corpus, split)
    return load_corpus(str(corpus))


def check_threads(threads: int) -> None:
    """torch threads for a training command: at least one."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")


def open_base(model: Path | None, threads: int) -> Base:
    """The base in fp32 PyTorch (the default is the SmolLM2 GGUF), with `threads` torch threads."""
    check_threads(threads)
    torch.set_num_threads(threads)
    return load_base(model or default_base_gguf())


def datastore_command(
    model: Path | None,
    corpus: Path,
    split: str,
    out: Path,
    max_tokens: int | None,
    n_ctx: int,
    stride: int,
    shard_windows: int,
    threads: int,
    seed: int,
) -> dict:
    """`edge-memdec datastore build`: tokenize the chosen documents and build (or resume) the datastore."""
    from edge_memdec.train.datastore import build_datastore, check_window_options
    from edge_memdec.train.stream import token_stream

    check_window_options(n_ctx, stride, shard_windows)  # before the corpus is read and the base loaded
    check_threads(threads)
    docs = split_documents_of(corpus, split)
    base = open_base(model, threads)
    tokens = token_stream(base.tokenizer, docs, max_tokens, seed)
    t0 = time.perf_counter()
    manifest = build_datastore(
        base,
        tokens,
        out,
        n_ctx,
        stride,
        shard_windows,
        info={"corpus": str(corpus), "split": split, "seed": seed},
    )
    seconds = time.perf_counter() - t0
    print(
        f"datastore: {manifest['n_positions']} positions, dim {manifest['dim']} -> {out} ({seconds:.0f} s this run)"
    )
    return manifest


def train_command(opts: dict) -> dict:
    """`edge-memdec train`: build the config from CLI options, train, and export when asked."""
    from edge_memdec.train.datastore import read_manifest
    from edge_memdec.train.export import export_memdec
    from edge_memdec.train.memdec_model import MemdecShape, parse_layers
    from edge_memdec.train.stream import token_stream
    from edge_memdec.train.trainer import TrainConfig, distributed, train

    ds = read_manifest(opts["datastore"])
    base_path = Path(opts["model"] or ds["base"])
    blocks = parse_layers(opts["base_layers"]) if opts["base_layers"] else None
    shape = MemdecShape(
        layers=len(blocks) if blocks else opts["layers"],
        hidden=opts["hidden"],
        ffn=opts["ffn"],
        heads=opts["heads"],
        kv_heads=opts["kv_heads"],
        base_layers=blocks,
    )
    rank, _ = distributed()
    valid = None
    if opts["valid_corpus"] is not None and rank == 0:
        docs = split_documents_of(opts["valid_corpus"], "validation")
        valid = token_stream(load_tokenizer(base_path), docs, opts["valid_tokens"], opts["seed"])
    cfg = TrainConfig(
        datastore=Path(opts["datastore"]),
        out=Path(opts["out"]),
        targets=opts["targets"],
        base=base_path,
        init=opts["init"],
        shape=shape,
        epochs=opts["epochs"],
        max_steps=opts["max_steps"],
        lr=opts["lr"],
        beta=opts["beta"],
        batch_windows=opts["batch_windows"],
        n_ctx=opts["n_ctx"],
        stride=opts["stride"],
        checkpoint_every=opts["checkpoint_every"],
        valid_tokens=valid,
        seed=opts["seed"],
        threads=opts["threads"],
    )
    summary = train(cfg, resume=opts["resume"])
    if rank == 0:
        v = summary["validation"]
        line = f"trained {summary['params'] / 1e6:.1f}M params, {summary['steps']} steps"
        if v:
            line += f"; validation base {v['base_ppl']:.3f}, mixed {v['best_ppl']:.3f} at lambda {v['best_lambda']}"
        print(line)
        if opts["export"] is not None:
            tokenizer_from = Path(opts["tokenizer_from"] or base_path)
            out = export_memdec(
                opts["out"], opts["export"], opts["outtype"], tokenizer_from, opts["domain"], summary
            )
            print(f"exported {out}")
    return summary


def recipe_command(
    domain: str, work: Path | None, model: Path | None, budget: float, as_json: bool, threads: int
):
    """`edge-memdec recipe`: run every stage, then print the test-split table (or its JSON)."""
    import json

    from edge_memdec.train.recipe import Budget, run_recipe

    work = work or Path(f"memdec-{Path(domain).stem}")
    result = run_recipe(domain, work, Budget().scaled(budget), Path(model or default_base_gguf()), threads)
    if as_json:
        print(json.dumps(result, indent=1))
        return result
    print(f"test split, {result['test_tokens_scored']} tokens scored (1024/512 windows)")
    print(f"  base                      PPL {result['base']['ppl']:.3f}")
    print(f"  memory decoder alone      PPL {result['memdec_alone']['ppl']:.3f}")
    knn = result["knn_lm"]
    print(f"  base + kNN-LM (lambda {knn['lambda']:.2f})  PPL {knn['ppl']:.3f}")
    mix = result["base_plus_memdec"]
    print(f"  base + memdec (lambda {mix['lambda']:.2f})  PPL {mix['ppl']:.3f}")
    for name, stage in result["stages"].items():
        rss = f", peak {stage['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in stage else ""
        print(f"  stage {name}: {stage['seconds']:.0f} s{rss}")
    return result
