"""Cross-tokenizer transfer (the paper's Qwen -> Llama step): move a trained memory decoder to a new base's tokenizer.

The transformer blocks and final norm are kept; the embedding matrix and LM head get one row per token id of the
new vocabulary. A new token whose text (its bytes) is also a token of the old vocabulary gets that token's old row
("copied"); the others get, by `new_rows`:
  compose  the mean of the old rows of the old tokenizer's pieces of its text (the default; byte-level BPE covers
           any text),
  base     the new base's own embedding row, rescaled to the old rows' average norm (needs equal hidden sizes),
  mean     nothing token-specific;
and whatever is left (no text, padding rows) the mean of the copied rows plus small noise ("fallback").
Training then continues through the ordinary trainer on the new base's kNN targets, by default for 10% of the
source run's optimizer steps. The re-initialised model is saved as OUT/transfer-init (the trainer's `init`), the
transfer facts as OUT/transfer.json and under "transfer" in OUT/train.json (and so in the exported GGUF's
memdec.train.transfer.* keys).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from edge_memdec.defaults import PAPER_N_CTX, PAPER_STRIDE, VALIDATION_LAMBDAS
from edge_memdec.errors import UserError
from edge_memdec.files import atomic_dir, write_json_atomic
from edge_memdec.train.base import load_tokenizer
from edge_memdec.train.datastore import read_manifest
from edge_memdec.train.options import BATCH_WINDOWS, MEMDEC_BETA, MEMDEC_LR, TransferOptions
from edge_memdec.train.steps import HF_DIR, SUMMARY
from edge_memdec.windows import sliding_windows

TRANSFER_INIT = "transfer-init"  # HF folder of the re-initialised decoder, inside the run folder
TRANSFER_JSON = "transfer.json"
DEFAULT_FRACTION = 0.1  # the paper's ~10% of the original training budget
NEW_ROWS = ("compose", "base", "mean")
FALLBACK_NOISE = 0.1  # fallback rows: mean of the copied rows + N(0, (0.1 * per-dimension std)^2)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


BYTE_TO_CHAR: dict[int, str] = bytes_to_unicode()  # GPT-2's byte -> printable character table (256)
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the vocabulary spells tokens in GPT-2's byte alphabet (byte-level BPE)."""
    return isinstance(tokenizer.decoder, decoders.ByteLevel)


def token_bytes(tokenizer: Tokenizer) -> list[bytes | None]:
    """The text of every token id as bytes, list [max id + 1]; None for ids no token uses.

    Byte-level tokens are mapped back through GPT-2's byte alphabet; SentencePiece-style ones turn '▁' into a space
    and <0xNN> into that byte; added (special) tokens are their literal text.
    """
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    byte_level = is_byte_level(tokenizer)
    texts: list[bytes | None] = [None] * (max(vocab.values()) + 1)
    for text, token_id in vocab.items():
        if byte_level and text not in special and all(c in CHAR_TO_BYTE for c in text):
            texts[token_id] = bytes(CHAR_TO_BYTE[c] for c in text)
        elif (m := _BYTE_TOKEN.fullmatch(text)) and text not in special:
            texts[token_id] = bytes([int(m[1], 16)])
        else:
            texts[token_id] = (text if text in special else text.replace("▁", " ")).encode("utf-8")
    return texts


def pieces_of(tokenizer: Tokenizer, text: bytes) -> list[int]:
    """Old-tokenizer ids that spell `text`: BPE merges over its bytes (byte-level), else an ordinary encode of it
    when it is valid UTF-8; [] when neither works."""
    if is_byte_level(tokenizer):
        try:
            return [t.id for t in tokenizer.model.tokenize("".join(BYTE_TO_CHAR[b] for b in text))]
        except Exception:  # a BPE without some byte in its alphabet
            return []
    try:
        return tokenizer.encode(text.decode("utf-8"), add_special_tokens=False).ids
    except UnicodeDecodeError:
        return []


@dataclass
class RowPlan:
    """Where each row of the new embedding / LM head comes from (ids of the new vocabulary, size `n_rows`)."""

    n_rows: int
    copy_new: np.ndarray  # int64 [n_copied], new ids whose text is an old token
    copy_old: np.ndarray  # int64 [n_copied], the matching old ids
    composed: dict[int, list[int]] = field(default_factory=dict)  # new id -> old ids spelling its text
    rest: list[int] = field(default_factory=list)  # new ids initialised from the new base or the fallback

    def counts(self) -> dict[str, int]:
        """Row counts by origin (before `base`/fallback are told apart)."""
        return {"rows": self.n_rows, "copied": len(self.copy_new), "composed": len(self.composed)}


def plan_rows(old: Tokenizer, new: Tokenizer, n_old_rows: int, n_new_rows: int, compose: bool) -> RowPlan:
    """Match the new vocabulary's token texts against the old one; old ids >= n_old_rows are never used."""
    old_ids: dict[bytes, int] = {}
    for token_id, text in enumerate(token_bytes(old)):
        if text is not None and token_id < n_old_rows:
            old_ids.setdefault(text, token_id)
    new_texts = token_bytes(new)
    copy_new, copy_old, composed, rest = [], [], {}, []
    for token_id in range(n_new_rows):
        text = new_texts[token_id] if token_id < len(new_texts) else None
        if text is not None and text in old_ids:
            copy_new.append(token_id)
            copy_old.append(old_ids[text])
            continue
        pieces = [p for p in pieces_of(old, text) if p < n_old_rows] if (compose and text) else []
        if pieces:
            composed[token_id] = pieces
        else:
            rest.append(token_id)
    return RowPlan(n_new_rows, np.asarray(copy_new, np.int64), np.asarray(copy_old, np.int64), composed, rest)


def new_matrix(
    old: torch.Tensor, plan: RowPlan, base_rows: torch.Tensor | None, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """The new [n_rows, hidden] matrix from the old [n_old_rows, hidden] one; also how many rows came from the base.

    `base_rows` ([>= n_rows, hidden], the new base's matrix) fills the rows the plan leaves open, rescaled so its
    average row norm equals the old matrix's; rows it cannot fill take the copied rows' mean plus small noise.
    """
    old = old.detach().float()
    out = torch.empty(plan.n_rows, old.shape[1])
    pool = old[torch.from_numpy(plan.copy_old)] if len(plan.copy_old) else old
    out[torch.from_numpy(plan.copy_new)] = old[torch.from_numpy(plan.copy_old)]
    for token_id, pieces in plan.composed.items():
        out[token_id] = old[pieces].mean(dim=0)
    rest = torch.tensor(plan.rest, dtype=torch.int64)
    from_base = 0
    if base_rows is not None and len(rest):
        scale = old.norm(dim=1).mean() / base_rows.float().norm(dim=1).mean().clamp_min(1e-12)
        usable = rest[rest < base_rows.shape[0]]
        out[usable] = base_rows.detach().float()[usable] * scale
        from_base, rest = len(usable), rest[rest >= base_rows.shape[0]]
    if len(rest):
        noise = torch.randn(len(rest), old.shape[1], generator=generator) * (FALLBACK_NOISE * pool.std(dim=0))
        out[rest] = pool.mean(dim=0) + noise
    return out, from_base


def reinit_vocab(
    old: LlamaForCausalLM,
    plan: RowPlan,
    special_ids: dict[str, int | None],
    base_model: torch.nn.Module | None = None,
    seed: int = 0,
) -> tuple[LlamaForCausalLM, dict[str, int]]:
    """A copy of `old` with `plan.n_rows` embedding / LM-head rows, its blocks and norm unchanged.

    special_ids: bos_token_id / eos_token_id / pad_token_id of the new base. base_model: the new base, whose
    input (and, for an untied head, output) embeddings fill the open rows (mode `base`). Returns the model and the
    row counts {"rows", "copied", "composed", "from_base", "fallback"}.
    """
    config = LlamaConfig(**old.config.to_dict())
    config.vocab_size = plan.n_rows
    for key, value in special_ids.items():
        setattr(config, key, value)
    model = LlamaForCausalLM(config)
    keep = {
        k: v for k, v in old.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")
    }
    missing, unexpected = model.load_state_dict(keep, strict=False)
    assert not unexpected and set(missing) <= {"model.embed_tokens.weight", "lm_head.weight"}, missing
    generator = torch.Generator().manual_seed(seed)
    base_in = base_model.get_input_embeddings().weight if base_model is not None else None
    embed, from_base = new_matrix(old.get_input_embeddings().weight, plan, base_in, generator)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embed)
        if not config.tie_word_embeddings:
            base_out = base_model.get_output_embeddings().weight if base_model is not None else None
            head, _ = new_matrix(old.get_output_embeddings().weight, plan, base_out, generator)
            model.get_output_embeddings().weight.copy_(head)
    model.tie_weights()
    counts = plan.counts()
    counts.update(
        from_base=from_base, fallback=plan.n_rows - counts["copied"] - counts["composed"] - from_base
    )
    return model.float(), counts


@dataclass
class Source:
    """A trained memory decoder: its run folder, HF checkpoint, training summary and tokenizer's source."""

    run: Path  # the `train --out` folder (or the checkpoint folder itself when it has no run around it)
    hf: Path  # HF checkpoint folder (config.json, model.safetensors)
    summary: dict | None  # run/train.json
    config: dict  # hf/config.json
    tokenizer_from: Path  # base GGUF / folder whose tokenizer the decoder was trained with

    @property
    def steps(self) -> int | None:
        """Optimizer steps of the source run (None when it has no train.json)."""
        return int(self.summary["steps"]) if self.summary and "steps" in self.summary else None


def read_source(path: Path, source_base: Path | None = None) -> Source:
    """Find the checkpoint, train.json and tokenizer of a memory decoder given as a run folder or its hf/ folder."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"the memory decoder {path} does not exist")
    if (path / HF_DIR / "config.json").is_file():
        run, hf = path, path / HF_DIR
    elif (path / "config.json").is_file():
        run, hf = (path.parent if (path.parent / SUMMARY).is_file() else path), path
    else:
        raise UserError(
            f"{path} is not a memory decoder run folder (no hf/config.json); give the --out folder of `edge-memdec train`"
        )
    config = json.loads((hf / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "llama":
        raise UserError(
            f"the memory decoder in {hf} is a {config.get('model_type')} model; transfer needs llama"
        )
    summary = None
    if (run / SUMMARY).is_file():
        summary = json.loads((run / SUMMARY).read_text(encoding="utf-8"))
    if source_base is not None:
        tokenizer_from = Path(source_base)
    elif (hf / "tokenizer.json").is_file():
        tokenizer_from = hf
    elif summary and summary.get("config", {}).get("base"):
        tokenizer_from = Path(summary["config"]["base"])
    else:
        raise UserError(
            f"cannot tell which tokenizer the memory decoder {path} uses; pass --source-base BASE"
        )
    if not tokenizer_from.exists():
        raise UserError(
            f"the memory decoder's base {tokenizer_from} is not there any more; pass --source-base BASE"
        )
    return Source(run=run, hf=hf, summary=summary, config=config, tokenizer_from=tokenizer_from)


def check_datastore(datastore: Path, base: Path, new_tokenizer: Tokenizer, n_vocab: int) -> dict:
    """The datastore's manifest, after checking it was built with the new base's tokenizer."""
    ds = read_manifest(datastore)
    ds_base = Path(ds["base"])
    if ds_base.exists() and ds_base.resolve() != Path(base).resolve():
        if load_tokenizer(ds_base).get_vocab() != new_tokenizer.get_vocab():
            raise UserError(
                f"the datastore {datastore} was built with {ds_base.name}, whose tokenizer is not the new base's "
                f"({Path(base).name}); build it with `edge-memdec datastore build -m {Path(base).name}`"
            )
    tokens = np.load(Path(datastore) / "tokens.npy", mmap_mode="r")
    if len(tokens) and int(tokens.max()) >= n_vocab:
        raise UserError(
            f"the datastore {datastore} holds token ids beyond the new base's {n_vocab}-token vocabulary; "
            "it was built for another tokenizer"
        )
    return ds


def budget(source_steps: int | None, steps: int | None, fraction: float) -> int:
    """Optimizer steps of the continued training: `steps` if given, else `fraction` of the source's (at least 1)."""
    if steps is not None:
        if steps < 1:
            raise UserError(f"--steps must be at least 1, got {steps}")
        return steps
    if not 0 < fraction <= 1:
        raise UserError(f"--budget-fraction must be in (0, 1], got {fraction}")
    if source_steps is None:
        raise UserError("the memory decoder has no train.json telling its step count; pass --steps N")
    return max(1, round(fraction * source_steps))


def save_init(model: LlamaForCausalLM, folder: Path) -> None:
    """save_pretrained into a temporary folder, then move it to `folder` (which is either absent or complete)."""
    with atomic_dir(folder) as temp:
        model.save_pretrained(temp, safe_serialization=True)


@dataclass(frozen=True)
class TransferPlan:
    """A transfer's checked inputs and its training settings: the options', or the source run's where the
    options leave them None."""

    source: Source
    datastore: Path
    out: Path
    base: Path  # the new base, GGUF or HF folder
    new_tok: Tokenizer
    old_tok: Tokenizer
    steps: int  # optimizer steps to train
    epochs: int  # passes over the datastore that `steps` needs
    n_ctx: int
    stride: int
    batch_windows: int
    lr: float
    beta: float


def plan_transfer(opts: TransferOptions) -> TransferPlan:
    """Check the options, the source decoder, the datastore and the new base; fill in the source run's settings."""
    from edge_memdec.train.export_gguf import check_export_options

    check_export_options(opts)
    if opts.new_rows not in NEW_ROWS:
        raise UserError(f"--new-rows must be one of {', '.join(NEW_ROWS)}, got {opts.new_rows!r}")
    source = read_source(opts.memdec, opts.source_base)
    datastore = Path(opts.datastore)
    ds = read_manifest(datastore)
    base_path = Path(opts.model or ds["base"])
    if not base_path.exists():
        raise UserError(f"the new base {base_path} does not exist")
    new_tok, old_tok = load_tokenizer(base_path), load_tokenizer(source.tokenizer_from)
    src_cfg = (source.summary or {}).get("config", {})
    steps = budget(source.steps, opts.steps, opts.budget_fraction)
    n_ctx = opts.n_ctx or int(src_cfg.get("n_ctx", PAPER_N_CTX))
    stride = opts.stride or int(src_cfg.get("stride", PAPER_STRIDE))
    batch_windows = opts.batch_windows or int(src_cfg.get("batch_windows", BATCH_WINDOWS))
    per_epoch = math.ceil(len(sliding_windows(ds["n_tokens"], n_ctx, stride)) / batch_windows)
    return TransferPlan(
        source=source,
        datastore=datastore,
        out=Path(opts.out),
        base=base_path,
        new_tok=new_tok,
        old_tok=old_tok,
        steps=steps,
        epochs=max(1, math.ceil(steps / per_epoch)),
        n_ctx=n_ctx,
        stride=stride,
        batch_windows=batch_windows,
        lr=opts.lr or float(src_cfg.get("lr", MEMDEC_LR)),
        beta=opts.beta if opts.beta is not None else float(src_cfg.get("beta", MEMDEC_BETA)),
    )


def transfer_command(opts: TransferOptions) -> dict:
    """`edge-memdec transfer`: re-initialise the vocabulary rows, continue training, record the facts, export."""
    from edge_memdec.train.steps import distributed
    from edge_memdec.train.stream import validation_tokens
    from edge_memdec.train.trainer import TrainConfig, train

    plan = plan_transfer(opts)
    rank, world = distributed()
    valid = validation_tokens(opts.valid_corpus, plan.new_tok, opts.valid_tokens)
    n_vocab, special, base_hidden = new_base_vocab(plan.base, plan.new_tok)
    check_datastore(plan.datastore, plan.base, plan.new_tok, n_vocab)
    if opts.new_rows == "base" and base_hidden != plan.source.config.get("hidden_size"):
        raise UserError(
            f"--new-rows base needs equal widths (memory decoder {plan.source.config.get('hidden_size')}, "
            f"new base {base_hidden}); use --new-rows compose"
        )
    init_dir, facts_path = plan.out / TRANSFER_INIT, plan.out / TRANSFER_JSON
    if rank == 0 and not (opts.resume and (init_dir / "config.json").is_file() and facts_path.is_file()):
        write_init(opts, plan, valid, n_vocab, special)
    if world > 1:
        torch.distributed.barrier()
    facts = json.loads(facts_path.read_text(encoding="utf-8"))
    if facts["source"] != str(plan.source.run.resolve()) or facts["planned_steps"] != plan.steps:
        raise UserError(
            f"{plan.out} holds a transfer from another decoder or budget; resume with the same options"
        )
    if rank == 0:
        print(_rows_line(facts["row_counts"], plan))
    cfg = TrainConfig(
        datastore=plan.datastore,
        out=plan.out,
        targets=opts.targets,
        base=plan.base,
        init=str(init_dir),
        epochs=plan.epochs,
        max_steps=plan.steps,
        lr=plan.lr,
        beta=plan.beta,
        batch_windows=plan.batch_windows,
        n_ctx=plan.n_ctx,
        stride=plan.stride,
        checkpoint_every=opts.checkpoint_every,
        valid_tokens=valid,
        seed=opts.seed,
        threads=opts.threads,
    )
    summary = train(cfg, resume=opts.resume)
    if rank == 0:
        finish(opts, plan, facts, summary)
    return summary


def write_init(
    opts: TransferOptions, plan: TransferPlan, valid: np.ndarray | None, n_vocab: int, special: dict[str, int | None]
) -> None:
    """The re-initialised decoder as OUT/transfer-init and the transfer facts (with the validation before any
    training, when `valid` holds validation tokens) as OUT/transfer.json; rank 0 only."""
    from edge_memdec.train.base import load_base
    from edge_memdec.train.memdec_model import n_params
    from edge_memdec.train.trainer import TrainConfig, Validator

    base = load_base(plan.base) if (opts.new_rows == "base" or valid is not None) else None
    old = LlamaForCausalLM.from_pretrained(str(plan.source.hf), dtype=torch.float32)
    if plan.old_tok.get_vocab_size(with_added_tokens=True) > old.config.vocab_size:
        raise UserError(
            f"the tokenizer of {plan.source.tokenizer_from.name} has more tokens than the memory decoder has rows; "
            "pass the base it was trained with as --source-base"
        )
    rows_plan = plan_rows(plan.old_tok, plan.new_tok, old.config.vocab_size, n_vocab, opts.new_rows == "compose")
    model, rows = reinit_vocab(old, rows_plan, special, base.model if opts.new_rows == "base" else None, opts.seed)
    plan.out.mkdir(parents=True, exist_ok=True)
    save_init(model, plan.out / TRANSFER_INIT)
    before = None
    if valid is not None:
        before = Validator(
            base, valid, plan.out, TrainConfig.eval_ctx, TrainConfig.eval_stride, VALIDATION_LAMBDAS
        )(model)
    facts = {
        "source": str(plan.source.run.resolve()),
        "source_tokenizer": str(plan.source.tokenizer_from),
        "new_base": str(plan.base),
        "datastore": str(plan.datastore),
        "new_rows": opts.new_rows,
        "row_counts": rows,
        "source_steps": plan.source.steps,
        "planned_steps": plan.steps,
        "params": n_params(model),
        "validation_before": before,
    }
    write_json_atomic(plan.out / TRANSFER_JSON, facts)


def _rows_line(rows: dict, plan: TransferPlan) -> str:
    return (
        f"transfer: {rows['copied']} of {rows['rows']} rows copied from {plan.source.run.name}, "
        f"{rows['composed']} composed from old pieces, {rows['from_base']} from the new base, "
        f"{rows['fallback']} fallback; training {plan.steps} steps (source run: {plan.source.steps or 'unknown'})"
    )


def finish(opts: TransferOptions, plan: TransferPlan, facts: dict, summary: dict) -> None:
    """The transfer facts into OUT/train.json, the validation before and after, and the GGUF export; rank 0."""
    from edge_memdec.train.export_gguf import export_memdec

    source = plan.source
    summary["transfer"] = gguf_facts(facts, source, plan.base, summary["steps"])
    write_json_atomic(plan.out / SUMMARY, summary)
    before, after = facts.get("validation_before"), summary.get("validation")
    line = f"transferred: {summary['steps']} steps (source run: {source.steps or 'unknown'})"
    if before and after:
        line += (
            f"; validation mixed PPL {before['best_ppl']:.3f} before -> {after['best_ppl']:.3f} after "
            f"(base alone {after['base_ppl']:.3f})"
        )
    print(line)
    if opts.export is not None:
        tokenizer_from = Path(opts.tokenizer_from or plan.base)
        path = export_memdec(
            plan.out, opts.export, opts.outtype, tokenizer_from, opts.domain, summary, opts.split_max_size
        )
        print(f"exported {path}")


def new_base_vocab(base: Path, tokenizer: Tokenizer) -> tuple[int, dict[str, int | None], int | None]:
    """Rows of the new base's embedding matrix, its bos/eos/pad ids and width, read without loading its weights."""
    base = Path(base)
    if base.suffix == ".gguf":
        from edge_memdec.gguf_file import read_gguf

        info = read_gguf(base)
        n_rows, hidden = info.n_vocab, info.get(f"{info.arch}.embedding_length")
        ids = {f"{k}_token_id": info.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
        ids["pad_token_id"] = ids.pop("padding_token_id")
    else:
        config = json.loads((base / "config.json").read_text(encoding="utf-8"))
        config = config.get("text_config", config)
        n_rows, hidden = int(config.get("vocab_size") or 0), config.get("hidden_size")
        ids = {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if isinstance(ids["eos_token_id"], list):
        ids["eos_token_id"] = ids["eos_token_id"][0]
    return max(n_rows, tokenizer.get_vocab_size(with_added_tokens=True)), ids, hidden


def gguf_facts(facts: dict, source: Source, base: Path, steps: int) -> dict[str, object]:
    """The transfer facts stored in train.json and as memdec.train.transfer.* (names, not paths)."""
    rows = facts["row_counts"]
    return {
        "from_run": source.run.name,
        "from_base": Path(facts["source_tokenizer"]).stem,
        "to_base": base.stem,
        "rows": int(rows["rows"]),
        "rows_copied": int(rows["copied"]),
        "rows_composed": int(rows["composed"]),
        "rows_from_base": int(rows["from_base"]),
        "rows_fallback": int(rows["fallback"]),
        "source_steps": source.steps,
        "steps": int(steps),
        "budget_fraction": float(steps / source.steps) if source.steps else None,
    }
