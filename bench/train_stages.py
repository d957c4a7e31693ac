"""Throughput and peak memory of each training stage on real legal text with the real SmolLM2 base.

Each stage runs as its own `edge-memdec` process (as the recipe runs them), so peak RSS is that stage's alone.
Positions/s counts each position once (the datastore forward computes n_ctx/stride times as many tokens).
The train stage runs twice: one process with all threads, then `--ranks` torchrun ranks splitting the threads,
with each rank's throughput and the share of its step spent waiting for the slowest rank and in the all-reduce.

    python bench/train_stages.py --tokens 8000 --ranks 2 --work /some/folder
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from edge_memdec.train.recipe import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8000, help="datastore tokens (legal train split)")
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=4, help="training steps")
    parser.add_argument("--batch-windows", type=int, default=2, help="1024-token windows per step (all ranks)")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun ranks for the second train run (0: skip)")
    parser.add_argument("--base-layers", default="0,27-29", help="as the legal recipe")
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
    def train_args(out: Path, threads: int) -> list[str]:
        return [
            "train",
            str(ds),
            "--out",
            str(out),
            "--base-layers",
            args.base_layers,
            "--batch-windows",
            str(args.batch_windows),
            "--n-ctx",
            "1024",
            "--stride",
            "1024",
            "--max-steps",
            str(args.steps),
            "--threads",
            str(threads),
        ]

    run_stage("train", train_args(run, args.threads), stages)
    if args.ranks > 1:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
        per_rank = max(1, args.threads // args.ranks)
        run_stage("train_ranks", train_args(work / "run-ranks", per_rank), stages, [*torchrun, str(args.ranks)])
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
    if args.ranks > 1:
        ranked = json.loads((work / "run-ranks" / "train.json").read_text())
        s = stages["train_ranks"]
        print(
            f"\ntrain under torchrun, {args.ranks} ranks x {per_rank} thread(s): {ranked['positions_per_second']:.1f}"
            f" positions/s in all ({ranked['positions_per_second'] / rates['train']:.2f}x one process with"
            f" {args.threads} threads), wall {s['seconds']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB per rank"
        )
        print(f"{'rank':<5} {'positions/s':>12} {'compute':>8} {'wait':>6} {'all-reduce':>11} {'s/step':>7}")
        for i, r in enumerate(ranked["ranks"]):
            step_s = (r["compute_s"] + r["wait_s"] + r["all_reduce_s"]) / max(1, r["steps"])
            compute = 1 - r["wait_share"] - r["all_reduce_share"]
            print(
                f"{i:<5} {r['positions_per_second']:>12.1f} {compute:>8.1%} {r['wait_share']:>6.1%}"
                f" {r['all_reduce_share']:>11.1%} {step_s:>7.2f}"
            )
        grads_mb = trained["params"] * 4 / 1e6
        print(f"(each step all-reduces {grads_mb:.0f} MB of float32 gradients: {trained['params']:,} params)")


if __name__ == "__main__":
    main()
