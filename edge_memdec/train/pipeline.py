"""Glue between the CLI and the training stages: resolve paths and defaults, load the base once, print results."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from edge_memdec.corpus import is_split_folder, split_documents_of
from edge_memdec.defaults import KNN_K, KNN_TEMPERATURE, VALIDATION_LAMBDAS
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import LambdaGate
from edge_memdec.paths import default_base_gguf
from edge_memdec.train.base import Base, load_base, load_tokenizer
from edge_memdec.train.options import FinetuneOptions, TrainOptions

if TYPE_CHECKING:  # each training module loads when its command runs
    from edge_memdec.train.finetune import FinetuneConfig
    from edge_memdec.train.memdec_model import MemdecShape
    from edge_memdec.train.trainer import TrainConfig


def check_threads(threads: int) -> None:
    """torch threads for a training command: at least one."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")


def check_warmup(warmup_steps: int) -> None:
    """--warmup-steps: 0 (none) or more."""
    if warmup_steps < 0:
        raise UserError(f"--warmup-steps must be 0 or more, got {warmup_steps}")


def open_base(model: Path | None, threads: int, device: str = "cpu") -> Base:
    """The base in fp32 PyTorch (the default is the SmolLM2 GGUF) on `device`, with `threads` torch threads."""
    from edge_memdec.train.device import resolve_device

    check_threads(threads)
    where = resolve_device(device)
    torch.set_num_threads(threads)
    base = load_base(model or default_base_gguf())
    base.model.to(where)
    return base


def datastore_command(
    *,
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
    mode: str = "carry",
    hidden_blocks: tuple[int, ...] = (),
    special_tokens: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict:
    """`edge-memdec datastore build`: tokenize the chosen documents and build (or resume) the datastore.
    `special_tokens`: control tokens written in the text (a chat-formatted corpus) are read as those tokens."""
    from edge_memdec.train.datastore import build_datastore, check_window_options
    from edge_memdec.train.device import resolve_device, resolve_precision
    from edge_memdec.train.stream import token_stream

    check_window_options(n_ctx, stride, shard_windows)  # before the corpus is read and the base loaded
    check_threads(threads)
    precision = resolve_precision(precision, resolve_device(device))
    docs = split_documents_of(corpus, split)
    base = open_base(model, threads, device)
    base.tokenizer.encode_special_tokens = not special_tokens
    tokens = token_stream(base.tokenizer, docs, max_tokens, seed)
    t0 = time.perf_counter()
    manifest = build_datastore(
        base,
        tokens,
        out,
        n_ctx=n_ctx,
        stride=stride,
        shard_windows=shard_windows,
        info={"corpus": str(corpus), "split": split, "seed": seed}
        | ({"special_tokens": True} if special_tokens else {}),
        mode=mode,
        hidden_blocks=hidden_blocks,
        precision=precision,
    )
    seconds = time.perf_counter() - t0
    print(
        f"datastore: {manifest['n_positions']} positions, dim {manifest['dim']} -> {out} "
        f"({seconds:.0f} s this run, {precision})"
    )
    return manifest


def decoder_shape(opts: TrainOptions) -> MemdecShape:
    """The decoder's shape: the base blocks --base-layers names, else none beyond the base's own with
    --frozen-blocks or --lora-rank (the decoder is the whole base), else --layers blocks; the widths matter from
    scratch only."""
    from edge_memdec.train.memdec_model import MemdecShape, parse_layers

    blocks = parse_layers(opts.base_layers) if opts.base_layers else None
    return MemdecShape(
        layers=len(blocks) if blocks else 0 if opts.frozen_blocks or opts.lora_rank else opts.layers,
        hidden=opts.hidden,
        ffn=opts.ffn,
        heads=opts.heads,
        kv_heads=opts.kv_heads,
        base_layers=blocks,
    )


def train_config(opts: TrainOptions, base: Path, valid: np.ndarray | None) -> TrainConfig:
    """`train`'s options as the trainer's config, with the base resolved and the validation tokens read."""
    from edge_memdec.train.trainer import TrainConfig

    check_warmup(opts.warmup_steps)
    return TrainConfig(
        datastore=Path(opts.datastore),
        out=Path(opts.out),
        targets=opts.targets,
        base=base,
        init=opts.init,
        shape=decoder_shape(opts),
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        lr=opts.lr,
        warmup_steps=opts.warmup_steps,
        beta=opts.beta,
        batch_windows=opts.batch_windows,
        n_ctx=opts.n_ctx,
        stride=opts.stride,
        checkpoint_every=opts.checkpoint_every,
        valid_tokens=valid,
        seed=opts.seed,
        threads=opts.threads,
        frozen_blocks=opts.frozen_blocks,
        head=opts.head,
        lora_rank=opts.lora_rank,
        device=opts.device,
        precision=opts.precision,
        valid_every=opts.valid_every,
    )


def train_command(opts: TrainOptions) -> dict:
    """`edge-memdec train`: build the config from CLI options, train, and export when asked."""
    from edge_memdec.train.datastore import read_manifest
    from edge_memdec.train.export_gguf import check_export_options, export_memdec
    from edge_memdec.train.steps import distributed
    from edge_memdec.train.stream import validation_tokens
    from edge_memdec.train.trainer import train

    check_export_options(opts)
    gate = None if opts.lambda_gate == GATE_FIT else LambdaGate.parse(opts.lambda_gate)  # checked before training
    base_path = Path(opts.model or read_manifest(opts.datastore)["base"])
    valid = validation_tokens(opts.valid_corpus, base_path, opts.valid_tokens)
    summary = train(train_config(opts, base_path, valid), resume=opts.resume)
    if distributed()[0] == 0:
        v = summary["validation"]
        line = f"trained {summary['params'] / 1e6:.1f}M params, {summary['steps']} steps"
        if v:
            line += f"; validation base {v['base_ppl']:.3f}, mixed {v['best_ppl']:.3f} at lambda {v['best_lambda']}"
        print(line)
        if opts.export is not None:
            tokenizer_from = Path(opts.tokenizer_from or base_path)
            out = export_memdec(
                opts.out, opts.export, opts.outtype, tokenizer_from, opts.domain, summary, opts.split_max_size, gate
            )
            print(f"exported {out}")
            if opts.lambda_gate == GATE_FIT:
                fit_export_gate(opts, base_path, tokenizer_from, out)
    return summary


GATE_FIT = "fit"  # `train --lambda-gate`'s default: choose the export's gate after training


def fit_export_gate(opts: TrainOptions, base: Path, tokenizer_from: Path, gguf: Path) -> None:
    """`train --export --lambda-gate fit`: choose the exported decoder's gate (recipe.recommend_gate's rule) and
    export it again recommending the gate when one beats a fixed lambda; said in one line when it cannot run."""
    from edge_memdec.train.recipe import recommend_gate

    if opts.valid_corpus is None or base.suffix != ".gguf":
        print("gate: not fitted (it needs --valid-corpus and the base as a GGUF); the export keeps a fixed lambda")
        return
    recommend_gate(
        base, gguf, opts.valid_corpus, opts.out, opts.domain, opts.valid_tokens, opts.outtype, opts.threads,
        opts.split_max_size, tokenizer_from,
    )  # fmt: skip


def recipe_command(
    domain: str,
    work: Path | None,
    model: Path | None,
    budget: float,
    as_json: bool,
    threads: int,
    name: str | None = None,
    baselines: tuple[str, ...] = (),
    epochs: int | None = None,
):
    """`edge-memdec recipe`: run every stage, then print the test-split table (or its JSON)."""
    import json

    from edge_memdec.train.recipe import Budget, domain_name, run_recipe

    plan = Budget().scaled(budget, epochs)
    name = name or domain_name(domain)
    work = work or Path(f"memdec-{name}")
    base = Path(model or default_base_gguf())
    result = run_recipe(domain, work, plan, base, threads, name, baselines)
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
    if "general" in result:
        general = result["general"]
        print(f"general text (news outside the domains), {general['tokens_scored']} tokens scored")
        print(f"  base                      PPL {general['base']['ppl']:.3f}")
        print(f"  memory decoder alone      PPL {general['memdec_alone']['ppl']:.3f}")
        gmix = general["base_plus_memdec"]
        print(f"  base + memdec (lambda {gmix['lambda']:.2f})  PPL {gmix['ppl']:.3f}")
    for name, stage in result["stages"].items():
        rss = f", peak {stage['peak_rss_mib']:.0f} MiB" if "peak_rss_mib" in stage else ""
        print(f"  stage {name}: {stage['seconds']:.0f} s{rss}")
    if "baselines" in result:
        from edge_memdec.compare import format_compare

        print(format_compare(result["baselines"]))
    return result


def knn_targets_command(
    datastore: Path,
    *,
    out: Path | None,
    temperature: str,
    valid_corpus: Path | None,
    valid_tokens: int,
    temperatures: list[float],
    ks: list[int],
    threads: int,
    **options,
) -> dict:
    """`edge-memdec knn-targets`: the targets at a given T, or (`auto`) at the (T, k) whose kNN-LM is best on
    validation text: one neighbour search of the validation keys, every (T, k) scored from it, the best one
    built for the whole datastore with the same index. A rerun reuses the choice recorded in targets.json."""
    import json

    from edge_memdec.train.knn_targets import MANIFEST, build_targets

    check_threads(threads)
    k = options.pop("k", KNN_K)
    if options.get("device", "cpu") != "cpu":
        from edge_memdec.train.device import resolve_device

        options["device"] = str(resolve_device(options["device"]))
    common = {**options, "threads": threads}
    if temperature != "auto":
        try:
            value = float(temperature)
        except ValueError:
            raise UserError(f"--temperature must be a positive number or auto, got {temperature!r}") from None
        return build_targets(datastore, out, k=k, temperature=value, **common)
    if valid_corpus is None:
        from edge_memdec.train.datastore import read_manifest

        corpus = read_manifest(datastore).get("corpus")
        if corpus and is_split_folder(corpus):
            valid_corpus = Path(corpus)  # the validation split of the corpus the datastore was built from
        else:
            print(f"knn-targets: no validation split to choose T on (pass --valid-corpus); using T={KNN_TEMPERATURE:g}")
            return build_targets(datastore, out, k=k, temperature=KNN_TEMPERATURE, **common)
    if not temperatures or not ks or min(temperatures) <= 0 or min(ks) < 1:
        raise UserError("--temperatures and --ks must be lists of positive numbers, e.g. 0.5,1,2 and 64,1024")
    manifest_path = Path(out or Path(datastore) / "targets") / MANIFEST
    if manifest_path.is_file() and "sweep" in (saved := json.loads(manifest_path.read_text())):
        chosen = saved["sweep"]["chosen"]
        return build_targets(datastore, out, k=chosen["k"], temperature=chosen["temperature"], **common)
    sweep, searcher = sweep_knn_params(datastore, valid_corpus, valid_tokens, temperatures, ks, threads, options)
    best = sweep["chosen"]
    print(
        f"kNN-LM on validation: best T {best['temperature']:g}, k {best['k']}, lambda {best['lambda']:g}: "
        f"PPL {best['ppl']:.3f} (base {sweep['base_ppl']:.3f})"
    )
    return build_targets(
        datastore, out, k=best["k"], temperature=best["temperature"], searcher=searcher, extra={"sweep": sweep},
        **common,
    )


def sweep_knn_params(
    datastore: Path, valid_corpus: Path, valid_tokens: int, temperatures, ks, threads: int, options: dict
) -> tuple[dict, tuple]:
    """kNN-LM validation PPL for every (T, k) from one search; returns the table and the (keys, values, index)
    searched, for the targets to reuse."""
    import faiss

    from edge_memdec.train.datastore import read_manifest
    from edge_memdec.train.knn_lm import base_keys_and_logprobs, knn_sweep, search
    from edge_memdec.train.knn_targets import index_description, make_searcher
    from edge_memdec.train.stream import token_stream

    ds = read_manifest(datastore)
    faiss.omp_set_num_threads(threads)
    base = open_base(Path(ds["base"]), threads, options.get("device", "cpu"))
    tokens = token_stream(base.tokenizer, split_documents_of(valid_corpus, "validation"), valid_tokens)
    t0 = time.perf_counter()
    queries, base_lp = base_keys_and_logprobs(base, tokens, ds["n_ctx"], ds["stride"])
    del base
    index_options = ("index_kind", "nprobe", "threshold", "lists", "pq_bytes", "device")
    keys, values, index = make_searcher(datastore, **{k: options[k] for k in index_options if k in options})
    distances, ids = search(index, queries, min(max(ks), len(values)))
    rows = knn_sweep(distances, ids, values, tokens[1:], base_lp, temperatures, ks, list(VALIDATION_LAMBDAS))
    sweep = {
        "tokens": len(base_lp),
        "base_ppl": float(np.exp(-base_lp.mean())),
        "index": index_description(index),
        "rows": rows,
        "chosen": rows[0],
        "seconds": time.perf_counter() - t0,
    }
    return sweep, (keys, values, index)


def finetune_tokens(source: Path, model: Path | None, max_tokens: int | None, seed: int) -> tuple:
    """(training tokens, base path, facts about the source) of `lora train`: a datastore's own tokens (the memory
    decoder's token budget), or the train documents of a split folder tokenized by the base."""
    from edge_memdec.train.datastore import MANIFEST, read_manifest
    from edge_memdec.train.stream import token_stream

    source = Path(source)
    if (source / MANIFEST).is_file():
        ds = read_manifest(source)
        base = Path(model or ds["base"])
        if model is not None and Path(model) != Path(ds["base"]):
            if load_tokenizer(base).get_vocab() != load_tokenizer(Path(ds["base"])).get_vocab():
                raise UserError(
                    f"the datastore {source} was tokenized by {ds['base']}, whose vocabulary differs from "
                    f"{base}'s; train on a datastore of this base or on a split folder"
                )
        tokens = np.load(source / "tokens.npy")
        facts = {"datastore": str(source), "corpus": ds.get("corpus")}
    else:
        base = Path(model or default_base_gguf())
        tokens = token_stream(load_tokenizer(base), split_documents_of(source, "train"), max_tokens, seed)
        facts = {"corpus": str(source), "split": "train"}
    return (tokens if max_tokens is None else tokens[:max_tokens]), base, facts


def finetune_config(opts: FinetuneOptions, base: Path) -> FinetuneConfig:
    """`lora train`'s options as the fine-tuning config, with the base resolved and the kind's default lr."""
    from edge_memdec.train.finetune import DEFAULT_LR, FinetuneConfig

    check_warmup(opts.warmup_steps)
    return FinetuneConfig(
        base=base,
        out=Path(opts.out),
        full=opts.full,
        rank=opts.rank,
        alpha=opts.alpha,
        dropout=opts.dropout,
        targets=tuple(t.strip() for t in opts.targets.split(",") if t.strip()),
        epochs=opts.epochs,
        max_steps=opts.max_steps,
        lr=opts.lr if opts.lr is not None else DEFAULT_LR["full" if opts.full else "lora"],
        warmup_steps=opts.warmup_steps,
        batch_windows=opts.batch_windows,
        n_ctx=opts.n_ctx,
        stride=opts.stride,
        checkpoint_every=opts.checkpoint_every,
        seed=opts.seed,
        threads=opts.threads,
        device=opts.device,
        precision=opts.precision,
        valid_every=opts.valid_every,
    )


def finetune_line(summary: dict, full: bool) -> str:
    """The line `lora train` prints about a finished run: parameters, steps, positions, time, memory, PPL."""
    what = "fine-tuned every weight" if full else "trained a LoRA adapter"
    line = (
        f"{what}: {summary['params_trained'] / 1e6:.2f}M of {summary['params_total'] / 1e6:.2f}M params, "
        f"{summary['steps']} steps, {summary['positions_trained']} positions, {summary['seconds']:.0f} s, "
        f"peak {summary['peak_rss_mib']:.0f} MiB"
    )
    if v := summary["validation"]:
        line += f"; validation PPL base {v['base_ppl']:.3f}, fine-tuned {v['ppl']:.3f}"
    return line


def finetune_command(opts: FinetuneOptions) -> dict:
    """`edge-memdec lora train`: a LoRA adapter (or with --full every weight) of the base on the domain text,
    validated on the validation split, exported when asked."""
    from edge_memdec.train.export_gguf import export_finetuned
    from edge_memdec.train.finetune import finetune
    from edge_memdec.train.steps import distributed
    from edge_memdec.train.stream import validation_tokens

    check_threads(opts.threads)
    if opts.export is not None:
        from edge_memdec.files import check_output_path

        check_output_path(opts.export, suffix=".gguf")
    tokens, base, facts = finetune_tokens(opts.source, opts.model, opts.max_tokens, opts.seed)
    if opts.export is not None and base.suffix != ".gguf":
        raise UserError("--export needs the base as a GGUF file (the adapter is checked against it); pass -m BASE.gguf")
    valid_corpus = opts.valid_corpus
    if valid_corpus is None and facts.get("corpus") and is_split_folder(facts["corpus"]):
        valid_corpus = Path(facts["corpus"])  # the validation split of the corpus the tokens came from
    valid = validation_tokens(valid_corpus, base, opts.valid_tokens)
    summary = finetune(finetune_config(opts, base), tokens, valid, opts.resume, facts)
    if distributed()[0] == 0:
        print(finetune_line(summary, opts.full))
        if opts.export is not None:
            print(f"exported {export_finetuned(opts.out, opts.export, opts.outtype, base)}")
    return summary
