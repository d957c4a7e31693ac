"""The recipe: corpus split -> datastore -> kNN targets -> train -> GGUF -> report on the test split.

Each stage runs as its own `edge-memdec` subprocess, so every stage resumes after a kill, a finished stage is
skipped on a rerun, and its wall time and peak memory (max RSS of that process) are measured separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edge_memdec.corpus import is_split_folder
from edge_memdec.defaults import KNN_K, PAPER_N_CTX, PAPER_STRIDE, VALIDATION_LAMBDAS
from edge_memdec.errors import UserError
from edge_memdec.files import write_json_atomic


@dataclass(frozen=True)
class Budget:
    """What the default recipe spends; `scaled(x)` multiplies the datastore tokens.

    The decoder is the whole base with its lower blocks frozen: the datastore pass stores the residual stream
    entering the first trained block, so training runs only the top `trained_blocks` blocks (and the final
    norm; the tied embedding / LM head stays the base's). T (and k) are chosen where kNN-LM is best on the
    validation split, lambda where the decoder's mixture is, and the best validation checkpoint is kept.
    Sized for a 2-core CPU: `recipe legal` with these defaults took 21 minutes end to end there (README).
    """

    datastore_tokens: int = 250_000
    k: int = KNN_K
    ks: str = "64,256,1024"
    temperatures: str = "0.25,0.5,1,2,4,8,16"
    trained_blocks: int = 6
    epochs: int = 2
    lr: float = 1e-3  # legal, 2 epochs: validation mixed 9.92 against 10.72 at 3e-4, test 0.65x against 0.78x (README)
    batch_windows: int = 8
    train_ctx: int = 1024
    train_stride: int = 1024  # no overlap: every position trained once per epoch at the cost of one forward
    checkpoint_every: int = 5  # steps: a CPU step of 8 x 1024 tokens takes ~10 s (decoder) to ~40 s (LoRA)
    valid_tokens: int = 4_000
    test_tokens: int = 10_000
    outtype: str = "q8_0"
    lambdas: tuple[float, ...] = VALIDATION_LAMBDAS

    def scaled(self, factor: float, epochs: int | None = None) -> Budget:
        """The same recipe with `factor` times the datastore tokens (and `epochs` passes, when given): the
        recipe's `--budget` and `--epochs`, checked here."""
        if factor <= 0:
            raise UserError(f"--budget must be positive, got {factor}")
        if epochs is not None and epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {epochs}")
        tokens = int(self.datastore_tokens * factor)
        return replace(self, datastore_tokens=tokens, epochs=self.epochs if epochs is None else epochs)


def domain_name(source: str) -> str:
    """The name a recipe's outputs carry: a built-in corpus's name, else the folder's or file's stem."""
    return Path(source).stem or "custom"


def run_stage(name: str, args: list[str], log: dict, launcher: list[str] | None = None) -> None:
    """Run `edge-memdec ARGS` as a child process; record its wall seconds and peak RSS (MiB) under `name`.

    `launcher` replaces `python` in front of `-m edge_memdec.cli` (e.g. a torchrun command line); peak RSS is
    then the largest of its processes. The stage's stdout goes to our stderr, beside its progress bars, so the
    recipe's own stdout is its report alone (`recipe --json | jq` works)."""
    t0 = time.perf_counter()
    try:
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stderr with no file behind it (captured): inherit stdout
        out = None
    child = subprocess.Popen([*(launcher or [sys.executable]), "-m", "edge_memdec.cli", *args], stdout=out)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    log[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024, "command": args}
    if child.returncode != 0:
        raise UserError(f"the {name} stage failed (exit {child.returncode}); fix the error above and rerun")


BASELINES = ("lora", "dapt")  # `--baselines`: the base adapted by a LoRA, or fine-tuned whole, at the same budget


def run_recipe(
    domain: str,
    work: Path,
    budget: Budget,
    base: Path,
    threads: int = 2,
    name: str | None = None,
    baselines: tuple[str, ...] = (),
) -> dict:
    """Run (or resume) every stage for corpus `domain` in `work`; returns the report (also report.json).

    Everything is written under `work`; the outputs are named after `name` (default: `domain_name`).
    `baselines` (out of BASELINES) also trains a LoRA and/or a DAPT model on the datastore's tokens, with the
    decoder's epochs, windows and batch, and adds `compare`'s table of every row on the test split."""
    from edge_memdec.gguf_file import read_gguf
    from edge_memdec.lambda_gate import LambdaGate
    from edge_memdec.train.report import report

    unknown = [kind for kind in baselines if kind not in BASELINES]
    if unknown:
        raise UserError(f"--baselines takes {' and '.join(BASELINES)}, got {unknown[0]!r}")
    name = name or domain_name(domain)
    work.mkdir(parents=True, exist_ok=True)
    split, ds, run = work / "split", work / "datastore", work / "run"
    gguf = work / f"{name}-memdec-{budget.outtype}.gguf"
    stages_path = work / "stages.json"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else {}
    # the top `trained_blocks` train on the stored input of the first of them; a base with no more blocks than
    # that trains whole
    n_layers = read_gguf(base).n_layers
    frozen = max(0, n_layers - budget.trained_blocks)

    def stage(stage_name: str, done: bool, args: list[str]) -> None:
        if not done:
            run_stage(stage_name, args, stages)
            write_json_atomic(stages_path, stages)

    th = ["--threads", str(threads)]
    stage("split", is_split_folder(split), ["corpus", "split", domain, "--out", str(split)])
    stage(
        "datastore",
        _finished_datastore(ds),
        ["datastore", "build", "--corpus", str(split), "--out", str(ds), "-m", str(base)]
        + ["--max-tokens", str(budget.datastore_tokens), *th]
        + (["--hidden-blocks", str(frozen)] if frozen else []),
    )
    stage(
        "knn_targets",
        (ds / "targets" / "knn-ids.npy").is_file(),
        ["knn-targets", str(ds), "-k", str(budget.k), "--temperature", "auto", "--ks", budget.ks]
        + ["--temperatures", budget.temperatures, "--valid-tokens", str(budget.valid_tokens)]
        + ["--index", "flat" if budget.datastore_tokens <= 100_000 else "ivfflat", *th],
    )
    stage(
        "train",
        gguf.is_file(),
        ["train", str(ds), "--out", str(run), "-m", str(base), "--frozen-blocks", str(frozen)]
        + ([] if frozen else ["--layers", str(n_layers)])
        + ["--epochs", str(budget.epochs), "--lr", str(budget.lr), "--batch-windows", str(budget.batch_windows)]
        + ["--n-ctx", str(budget.train_ctx), "--stride", str(budget.train_stride)]
        + ["--valid-corpus", str(split), "--valid-tokens", str(budget.valid_tokens)]
        + ["--export", str(gguf), "--outtype", budget.outtype, "--domain", name, *th]
        + ["--lambda-gate", "off"]  # the gate stage below fits it and records its table
        + ["--checkpoint-every", str(budget.checkpoint_every)]
        + (["--resume"] if (run / "checkpoint.pt").is_file() else []),
    )
    recommended = LambdaGate.of_metadata(read_gguf(gguf).memdec)
    if stages.get("gate", {}).get("gate", "unset") != (recommended.text() if recommended else None):
        stages["gate"] = recommend_gate(
            base, gguf, split, run, name, budget.valid_tokens, budget.outtype, threads
        )
        write_json_atomic(stages_path, stages)
    trained = {}
    for kind in baselines:
        trained[kind] = out = work / (f"{name}-lora.gguf" if kind == "lora" else f"{name}-dapt-{budget.outtype}.gguf")
        stage(
            kind,
            out.is_file(),
            ["lora", "train", str(ds), "--out", str(work / kind), "-m", str(base)]
            + (["--full", "--outtype", budget.outtype] if kind == "dapt" else [])
            + ["--epochs", str(budget.epochs), "--batch-windows", str(budget.batch_windows)]
            + ["--n-ctx", str(budget.train_ctx), "--stride", str(budget.train_stride)]
            + ["--valid-corpus", str(split), "--valid-tokens", str(budget.valid_tokens), "--export", str(out), *th]
            + ["--checkpoint-every", str(budget.checkpoint_every)]
            + (["--resume"] if (work / kind / "checkpoint.pt").is_file() else []),
        )
    t0 = time.perf_counter()
    result = report(base, gguf, ds, split, budget, threads)
    if trained:
        result["baselines"] = baseline_table(base, gguf, split, budget, trained, threads)
    stages["report"] = {"seconds": time.perf_counter() - t0}
    result["stages"] = stages
    result["budget"] = asdict(budget)
    write_json_atomic(stages_path, stages)
    write_json_atomic(work / "report.json", result)
    return result


def _finished_datastore(ds: Path) -> bool:
    """Whether `ds` holds a finished datastore (`read_manifest` decides)."""
    from edge_memdec.train.datastore import read_manifest

    try:
        read_manifest(ds)
    except UserError:
        return False
    return True


def baseline_table(
    base: Path, memdec: Path, split: Path, budget: Budget, trained: dict[str, Path], threads: int
) -> dict:
    """`compare`'s report on the test split (paper protocol, 1024/512 windows): base, base + LoRA, DAPT, base +
    memory decoder and base + LoRA + memory decoder, for the rows that were trained (kNN-LM is the main
    report's row, not scored again). Each row is also scored on general text (`corpus.general_sample`, the
    main report's and `compare --general news`'s): what a row loses there is its forgetting."""
    from edge_memdec.compare import CompareSettings, compare, rows_of
    from edge_memdec.corpus import general_sample
    from edge_memdec.llama_model import ModelOptions
    from edge_memdec.train.base import load_tokenizer
    from edge_memdec.train.report import split_text

    tokenizer = load_tokenizer(base)
    test_text = split_text(tokenizer, split, "test", budget.test_tokens)
    general_text = general_sample()
    lora = (str(trained["lora"]),) if "lora" in trained else ()
    rows = rows_of(base, lora, trained.get("dapt"), None, memdec)
    settings = CompareSettings(n_ctx=PAPER_N_CTX, stride=PAPER_STRIDE, options=ModelOptions(n_threads=threads))
    return compare(rows, test_text, general_text, settings)


def recommend_gate(
    base: Path,
    gguf: Path,
    split: Path,
    run: Path,
    name: str,
    valid_tokens: int,
    outtype: str,
    threads: int,
    split_max_size: str | None = None,
    tokenizer_from: Path | None = None,
) -> dict:
    """Choose the trained decoder's entropy gate (gate_fit.fit_gate: `valid_tokens` of validation documents of
    `split`, the first half of the general sample; the pair with the base GGUF `base`) and, when one wins,
    export the GGUF `gguf` again recommending it (as `train --export` wrote it: `outtype`, `split_max_size`,
    the tokenizer of `tokenizer_from`, default `base`). Returns the stage's record: the gate (None: a fixed
    lambda), every candidate's PPL ratios, seconds."""
    from edge_memdec.api import MemoryDecoderLM
    from edge_memdec.corpus import general_sample
    from edge_memdec.gate_fit import fit_gate, general_halves, position_scores
    from edge_memdec.train.base import load_tokenizer
    from edge_memdec.train.export_gguf import export_memdec
    from edge_memdec.train.report import split_text
    from edge_memdec.train.steps import SUMMARY

    t0 = time.perf_counter()
    valid_text = split_text(load_tokenizer(base), split, "validation", valid_tokens)
    with MemoryDecoderLM(base, gguf, lambda_gate=None, n_ctx=PAPER_N_CTX, n_batch=PAPER_N_CTX,
                         n_threads=threads, flash_attn=False) as lm:  # fmt: skip
        lam = lm.lam
        valid = position_scores(lm.pair, valid_text)
        general = position_scores(lm.pair, general_halves(general_sample())[0])
    gate, candidates = fit_gate(valid, general, lam)
    if gate is not None:
        summary = json.loads((run / SUMMARY).read_text())
        export_memdec(run, gguf, outtype, tokenizer_from or base, name, summary, split_max_size, gate)
    print(f"gate: {gate.text() if gate else 'none (a fixed lambda)'} at lambda {lam:g}", file=sys.stderr)
    return {"gate": gate.text() if gate else None, "lambda": round(lam, 6), "candidates": candidates,
            "seconds": time.perf_counter() - t0}  # fmt: skip
