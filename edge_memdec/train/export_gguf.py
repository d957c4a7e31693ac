"""Export a trained memory decoder (its Hugging Face folder) as a GGUF that pairs with the base."""

from __future__ import annotations

from pathlib import Path

from edge_memdec.convert import convert_checkpoint
from edge_memdec.convert.quantize import out_type
from edge_memdec.convert.rewrite import parse_size
from edge_memdec.defaults import DEFAULT_LAMBDA
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import LambdaGate


def check_export_options(opts) -> None:
    """Fail on a bad --outtype or --split-max-size of a run's `--export` before training, not after it."""
    if opts.export is not None:
        out_type(opts.outtype)
        if opts.split_max_size is not None:
            parse_size(opts.split_max_size)


def memdec_facts(summary: dict, domain: str, base_name: str) -> dict[str, object]:
    """The `memdec.*` metadata of a run: lambda chosen on validation, domain, base, and training facts."""
    valid = summary.get("validation") or {}
    cfg, knn = summary["config"], summary["knn"]
    return {
        "lambda": float(valid.get("best_lambda", DEFAULT_LAMBDA)),
        "domain": domain,
        "base_model": base_name,
        "train": {
            "tokens": int(summary["positions_trained"]),
            "datastore_positions": int(summary["datastore_positions"]),
            "steps": int(summary["steps"]),
            "epochs": float(summary["epochs"]),
            "knn_k": int(knn["k"]),
            "knn_temperature": float(knn["temperature"]),
            "beta": float(cfg["beta"]),
            "lr": float(cfg["lr"]),
            "valid_ppl": float(valid["best_ppl"]) if valid else None,
            "valid_base_ppl": float(valid["base_ppl"]) if valid else None,
            "seconds": float(summary["seconds"]) if "seconds" in summary else None,
            "peak_rss_mib": max(
                (float(r["peak_rss_mib"]) for r in summary.get("ranks", []) if "peak_rss_mib" in r), default=None
            ),
            "transfer": summary.get("transfer"),  # cross-tokenizer transfer facts (train/transfer.py), if any
        },
    }


def export_memdec(
    run_dir: Path,
    out: Path,
    outtype: str,
    base_gguf: Path,
    domain: str,
    summary: dict,
    split_max_size: str | None = None,
    lambda_gate: LambdaGate | None = None,
    lam: float | None = None,
) -> Path:
    """Convert `run_dir/hf` to `out` with the tokenizer keys of `base_gguf` and the run's memdec facts; tensors
    training left equal to the base's (frozen blocks, the tied embedding) keep the base's bytes. Returns the
    file llama.cpp opens (`out`, or the first of its split parts when `split_max_size` is passed).
    `lambda_gate`: the entropy gate the file recommends (memdec.lambda_gate), e.g. from bench/lambda_gate.py;
    `lam`: the lambda it recommends (memdec.lambda), when not the run's validation choice."""
    from edge_memdec.train.steps import HF_DIR

    hf = Path(run_dir) / HF_DIR
    if not (hf / "config.json").is_file():
        raise UserError(f"{run_dir} has no trained model (hf/config.json); run `edge-memdec train` first")
    if Path(base_gguf).suffix != ".gguf":
        raise UserError(
            "exporting needs the base as a GGUF file to copy its tokenizer; pass --model BASE.gguf"
        )
    facts = memdec_facts(summary, domain, Path(base_gguf).stem)
    if lambda_gate is not None:
        facts.update(lambda_gate.metadata())
    if lam is not None:
        facts["lambda"] = float(lam)
    split = parse_size(split_max_size) if split_max_size is not None else None
    return convert_checkpoint(
        hf, Path(out), outtype, Path(base_gguf), facts, keep_equal_from=Path(base_gguf), split_max_bytes=split
    )


def export_finetuned(run_dir: Path, out: Path, outtype: str, base_gguf: Path | None = None) -> Path:
    """A `lora train` run as a GGUF: its adapter as a GGUF LoRA for the base, or (a `--full` run) the whole
    fine-tuned model with the base's tokenizer keys. `base_gguf` defaults to the run's base."""
    import json

    from edge_memdec.convert.lora import convert_lora
    from edge_memdec.train.finetune import ADAPTER_DIR
    from edge_memdec.train.steps import HF_DIR, SUMMARY

    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).is_file():
        raise UserError(f"{run_dir} holds no finished `edge-memdec lora train` run (train.json)")
    summary = json.loads((run_dir / SUMMARY).read_text())
    base = Path(base_gguf or summary.get("base", ""))
    if base.suffix != ".gguf":
        raise UserError("exporting needs the base as a GGUF file; pass --model BASE.gguf")
    facts = finetune_facts(summary)
    if summary.get("kind") == "full":
        return convert_checkpoint(run_dir / HF_DIR, Path(out), outtype, tokenizer_from=base, memdec={"train": facts})
    return convert_lora(run_dir / ADAPTER_DIR, base, Path(out), outtype, train=facts)


def finetune_facts(summary: dict) -> dict[str, object]:
    """The training facts a fine-tuned GGUF carries (`memdec.train.*`, as a memory decoder's): what it cost
    (positions, seconds, peak memory) and its validation PPL."""
    valid = summary.get("validation") or {}
    return {
        "kind": summary["kind"],
        "tokens": int(summary["positions_trained"]),
        "steps": int(summary["steps"]),
        "epochs": float(summary["epochs"]),
        "lr": float(summary["config"]["lr"]),
        "seconds": float(summary["seconds"]),
        "peak_rss_mib": float(summary["peak_rss_mib"]),
        "valid_ppl": float(valid["ppl"]) if valid else None,
        "valid_base_ppl": float(valid["base_ppl"]) if valid else None,
    }
