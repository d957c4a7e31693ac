"""Throughput and peak memory of each training stage on real legal text with the real SmolLM2 base.

Each stage runs as its own `edge-memdec` process (as the recipe runs them), so peak RSS is that stage's alone.
Positions/s counts each position once (the datastore forward computes n_ctx/stride times as many tokens).

    python bench/train_stages.py --tokens 8000 --work /some/folder
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edge_memdec.train.recipe import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8000, help="datastore tokens (legal train split)")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="training steps (1024-token windows)")
    parser.add_argument("--base-layers", default="0-2,23-29")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="train-stages-"))
    split, ds, run = work / "split", work / "ds", work / "run"
    th = ["--threads", str(args.threads)]
    stages: dict = {}
    run_stage("split", ["corpus", "split", "legal", "--out", str(split)], stages)
    run_stage(
        "datastore",
        [
            "datastore",
            "build",
            "--corpus",
            str(split),
            "--out",
            str(ds),
            "--max-tokens",
            str(args.tokens),
            *th,
        ],
        stages,
    )
    run_stage("knn_targets", ["knn-targets", str(ds), "-k", str(args.k), *th], stages)
    run_stage(
        "train",
        [
            "train",
            str(ds),
            "--out",
            str(run),
            "--base-layers",
            args.base_layers,
            "--batch-windows",
            "1",
            "--n-ctx",
            "1024",
            "--stride",
            "1024",
            "--max-steps",
            str(args.steps),
            *th,
        ],
        stages,
    )
    manifest = json.loads((ds / "datastore.json").read_text())
    targets = json.loads((ds / "targets" / "targets.json").read_text())
    trained = json.loads((run / "train.json").read_text())
    rates = {
        "datastore": manifest["n_positions"] / manifest["seconds"],
        "knn_targets": targets["n_positions"] / targets["seconds"],
        "train": trained["positions_per_second"],
    }
    print(f"{'stage':<12} {'positions/s':>12} {'wall s':>8} {'peak RSS MiB':>13}")
    for name in ("datastore", "knn_targets", "train"):
        s = stages[name]
        print(f"{name:<12} {rates[name]:>12.1f} {s['seconds']:>8.1f} {s['peak_rss_mib']:>13.0f}")
    print("(wall time includes loading the base model; positions/s is the stage's own loop)")


if __name__ == "__main__":
    main()
