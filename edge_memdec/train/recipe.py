"""The recipe: corpus split -> datastore -> kNN targets -> train -> q8_0 GGUF -> report on the test split.

Each stage runs as its own `edge-memdec` subprocess, so every stage resumes after a kill, a finished stage is
skipped on a rerun, and its wall time and peak memory (max RSS of that process) are measured separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_memdec.errors import UserError


@dataclass(frozen=True)
class Budget:
    """What the default legal recipe spends; `scaled(x)` multiplies the datastore tokens.

    Sized from measurements on this 2-core CPU (no AVX-512; other jobs running): the datastore forward ran
    ~95 positions/s with 1024/512 windows, exact k=1024 search ~210 queries/s at 66k keys, and training a 4-block
    memory decoder ~280 positions/s (3.6 s per 1024-token step). 70k tokens, 6 epochs: about 50 minutes in all.
    Four blocks keep the q8_0 GGUF under 50 MB (42.5M params, 32% of SmolLM2; the 49,152 x 576 embedding is
    28.3M of them); the first and last three base blocks start closest to the base's own output distribution.
    """

    datastore_tokens: int = 70_000
    k: int = 1024
    temperature: float = 1.0
    base_layers: str = "0,27-29"
    epochs: int = 6
    lr: float = 1e-3
    batch_windows: int = 1
    train_ctx: int = 1024
    train_stride: int = 1024  # no overlap: every position trained once per epoch at the cost of one forward
    valid_tokens: int = 4_000
    test_tokens: int = 10_000
    lambdas: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

    def scaled(self, factor: float) -> Budget:
        """The same recipe with `factor` times the datastore and evaluation tokens."""
        if factor <= 0:
            raise UserError(f"--budget must be positive, got {factor}")
        return Budget(
            **{
                **asdict(self),
                "datastore_tokens": int(self.datastore_tokens * factor),
                "lambdas": self.lambdas,
            }
        )


def run_stage(name: str, args: list[str], log: dict, launcher: list[str] | None = None) -> None:
    """Run `edge-memdec ARGS` as a child process; record its wall seconds and peak RSS (MiB) under `name`.

    `launcher` replaces `python` in front of `-m edge_memdec.cli` (e.g. a torchrun command line); peak RSS is
    then the largest of its processes."""
    t0 = time.perf_counter()
    child = subprocess.Popen([*(launcher or [sys.executable]), "-m", "edge_memdec.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    log[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024, "command": args}
    if child.returncode != 0:
        raise UserError(f"the {name} stage failed (exit {child.returncode}); fix the error above and rerun")


def run_recipe(domain: str, work: Path, budget: Budget, base: Path, threads: int = 2) -> dict:
    """Run (or resume) every stage for `domain` in `work`; returns the report (also written as report.json)."""
    from edge_memdec.train.report import report

    work.mkdir(parents=True, exist_ok=True)
    split, ds, run = work / "split", work / "datastore", work / "run"
    gguf = work / f"{domain}-memdec-q8_0.gguf"
    stages_path = work / "stages.json"
    stages = json.loads(stages_path.read_text()) if stages_path.is_file() else {}

    def stage(name: str, done: bool, args: list[str]) -> None:
        if not done:
            run_stage(name, args, stages)
            stages_path.write_text(json.dumps(stages, indent=1) + "\n")

    th = ["--threads", str(threads)]
    stage("split", (split / "manifest.json").is_file(), ["corpus", "split", domain, "--out", str(split)])
    ds_done = (ds / "datastore.json").is_file() and _finished(ds / "datastore.json")
    stage(
        "datastore",
        ds_done,
        ["datastore", "build", "--corpus", str(split), "--out", str(ds), "-m", str(base)]
        + ["--max-tokens", str(budget.datastore_tokens), *th],
    )
    stage(
        "knn_targets",
        (ds / "targets" / "knn-ids.npy").is_file(),
        ["knn-targets", str(ds), "-k", str(budget.k), "--temperature", str(budget.temperature), *th],
    )
    stage(
        "train",
        gguf.is_file(),
        ["train", str(ds), "--out", str(run), "-m", str(base), "--base-layers", budget.base_layers]
        + [
            "--epochs",
            str(budget.epochs),
            "--lr",
            str(budget.lr),
            "--batch-windows",
            str(budget.batch_windows),
        ]
        + ["--n-ctx", str(budget.train_ctx), "--stride", str(budget.train_stride)]
        + ["--valid-corpus", str(split), "--valid-tokens", str(budget.valid_tokens)]
        + ["--export", str(gguf), "--outtype", "q8_0", "--domain", domain, *th]
        + (["--resume"] if (run / "checkpoint.pt").is_file() else []),
    )
    t0 = time.perf_counter()
    result = report(base, gguf, ds, split, budget, threads)
    stages["report"] = {"seconds": time.perf_counter() - t0}
    result["stages"] = stages
    result["budget"] = asdict(budget)
    stages_path.write_text(json.dumps(stages, indent=1) + "\n")
    (work / "report.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def _finished(manifest_path: Path) -> bool:
    manifest = json.loads(manifest_path.read_text())
    return len(manifest["finished"]) == len(manifest["shards"])
