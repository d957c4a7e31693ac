"""Decode speed: base alone vs base + memory decoder (sequential and overlapped), measured in one run.

    python bench/decode.py [--memdec MEM.gguf] [-m BASE.gguf] [-n 128] [--repeats 3] [--also OTHER_MEM.gguf ...]
                           [--second MEM2.gguf] [--llama-bench PATH/TO/llama-bench]
    python bench/decode.py --bases 135m,360m,1.7b [--threads 1,2] [--memdec MEM.gguf] [--llama-bench ...]

Prints ms/token and tokens/s for each setting, and the ratio of each to the best base-alone setting. With
--llama-bench (llama.cpp's own benchmark binary, built from the llama.cpp that llama-cpp-python vendors), every
round also times llama-bench's tg test on each model (2 threads, flash attention on): the hardware's speed for
these two models without any of our code. "base + 2 memdecs" runs two decoders on the base (--memdec and
--second, default --memdec again: the same compute as a second decoder of its size), each at its own lambda.

--bases pairs the memory decoder with bases of several sizes: the real SmolLM2-135M and random-weight bases
shaped like SmolLM2-360M and 1.7B (`bench/shaped_bases.py`, built once and cached; timing only). For each base
and thread count: base alone, base + memory decoder, their ratio, and llama-bench's time for the same two files
(their sum over its base, the sum in ms/token, and our pair's time over that sum).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.llama_model import cpu_has_amx
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"


def time_decode(lm: MemoryDecoderLM, n_tokens: int, repeats: int) -> float:
    """Median seconds per generated token (greedy, EOS ignored by using a prompt that rarely stops)."""
    tokens = lm.tokenize(PROMPT)
    per_token = []
    for _ in range(repeats):
        lm.pair.rewind(0)
        generation = lm.start(tokens, max_tokens=n_tokens, temperature=0.0)
        generation.run()
        per_token.append(generation.decode_seconds / max(1, len(generation.tokens)))
    return statistics.median(per_token)


TWO = [0.45, 0.45]  # two decoders' lambdas: their own may sum past 1 (two copies of one decoder do); cost is the same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, default=None)
    parser.add_argument("--memdec", type=Path, default=None)
    parser.add_argument("-n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--also", type=Path, nargs="*", default=[], help="more memory decoders (e.g. other quantizations)"
    )
    parser.add_argument("--second", type=Path, default=None, help="second decoder of the two-decoder setting")
    parser.add_argument("--llama-bench", type=Path, default=None, help="llama.cpp's llama-bench binary")
    parser.add_argument("--bases", default=None, help="pair with bases of these sizes: 135m,360m,1.7b")
    parser.add_argument("--threads", default="1,2", help="thread counts for --bases")
    args = parser.parse_args()
    base = args.model or default_base_gguf()
    memdec = args.memdec or default_memdec_gguf()
    if memdec is None:
        parser.error("no shipped memory decoder in this checkout; pass --memdec MEM.gguf")
    if args.bases:
        by_size(args, memdec)
        return

    settings = [
        ("base alone, 1 thread", dict(memdec=None, n_threads=1)),
        ("base alone, 2 threads", dict(memdec=None, n_threads=2)),
        ("base alone, 2 threads, no thread pool", dict(memdec=None, n_threads=2, cpu_threadpool=False)),
        ("base alone, 2 threads, no flash attention", dict(memdec=None, n_threads=2, flash_attn=False)),
        ("base + memdec, sequential, 2 threads each", dict(memdec=memdec, n_threads=2, overlap=False)),
        ("base + memdec, seq, 2 thr, no thread pool", dict(memdec=memdec, n_threads=2, cpu_threadpool=False)),
        ("base + memdec, sequential, 1 thread each", dict(memdec=memdec, n_threads=1, overlap=False)),
        ("base + memdec, overlapped, 1 thread each", dict(memdec=memdec, n_threads=2, overlap=True)),
        ("memdec alone, 2 threads", dict(base=memdec, memdec=None, n_threads=2)),
        ("base + 2 memdecs, sequential, 2 threads", dict(memdec=[memdec, args.second or memdec], lam=TWO, n_threads=2)),
        ("base + 2 memdecs, sequential, 1 thread", dict(memdec=[memdec, args.second or memdec], lam=TWO, n_threads=1)),
    ]
    for other in args.also:
        settings.append((f"base + {other.stem[-14:]}, seq, 2 thr", dict(memdec=other, n_threads=2)))
    # All settings stay loaded and are measured in turns, round after round, so that a slow spell on this
    # shared machine hits every setting alike instead of whichever ran during it.
    models = []
    for name, kwargs in settings:
        lm = MemoryDecoderLM(kwargs.pop("base", base), n_ctx=512, **kwargs)
        time_decode(lm, 8, 1)
        models.append((name, lm))
    samples: dict[str, list[float]] = {name: [] for name, _ in models}
    for _ in range(args.repeats):
        for name, lm in models:
            samples[name].append(time_decode(lm, args.n, 1))
        if args.llama_bench is not None:
            for name, sec in llama_bench(args.llama_bench, [base, memdec], args.n).items():
                samples.setdefault(name, []).append(sec)
    for _, lm in models:
        lm.close()
    rows = [(name, statistics.median(values)) for name, values in samples.items()]
    if args.llama_bench is not None:
        sums = [b + m for b, m in zip(samples["llama-bench, base"], samples["llama-bench, memdec"], strict=True)]
        rows.append(("llama-bench, base + memdec (sum)", statistics.median(sums)))
    best_base = min(sec for name, sec in rows if name.startswith("base alone"))
    print(f"{'setting':<44}{'ms/token':>10}{'tok/s':>9}{'x base':>9}")
    for name, sec in rows:
        print(f"{name:<44}{sec * 1e3:>10.2f}{1 / sec:>9.1f}{sec / best_base:>9.2f}")
    print(f"base {base.name}, memory decoder {memdec.name}, {args.n} tokens, median of {args.repeats} rounds")


def by_size(args, memdec: Path) -> None:
    """Base alone vs base + memory decoder for each base size and thread count, all measured in the same rounds."""
    from shaped_bases import SHAPES, shaped_base

    sizes = args.bases.split(",")
    unknown = [s for s in sizes if s != "135m" and s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown base size {unknown[0]!r}; use 135m, {', '.join(SHAPES)}")
    threads = [int(t) for t in args.threads.split(",")]
    bases = {s: default_base_gguf() if s == "135m" else shaped_base(s) for s in sizes}
    models = {}
    for size, path in bases.items():
        for t in threads:
            for paired in (False, True):
                lm = MemoryDecoderLM(path, memdec if paired else None, n_ctx=512, n_threads=t)
                time_decode(lm, 8, 1)
                models[(size, t, paired)] = lm
    samples: dict[tuple, list[float]] = {key: [] for key in models}
    for _ in range(args.repeats):
        for key, lm in models.items():
            samples[key].append(time_decode(lm, args.n, 1))
        if args.llama_bench is not None:
            for size, path in bases.items():
                for t in threads:
                    sec = llama_bench(args.llama_bench, [path, memdec], args.n, t)
                    samples.setdefault((size, t, "llama-bench"), []).append(sum(sec.values()) / sec["llama-bench, base"])
                    samples.setdefault((size, t, "llama-bench sum"), []).append(sum(sec.values()))
    for lm in models.values():
        lm.close()
    med = {key: statistics.median(v) for key, v in samples.items()}
    print(
        f"{'base':>6}{'threads':>8}{'base ms/tok':>13}{'pair ms/tok':>13}{'pair / base':>13}"
        f"{'llama-bench: sum / base':>25}{'sum ms/tok':>12}{'pair / sum':>12}"
    )
    for size in sizes:
        for t in threads:
            alone, pair = med[(size, t, False)], med[(size, t, True)]
            lb, lb_sum = med.get((size, t, "llama-bench")), med.get((size, t, "llama-bench sum"))
            lb_text = f"{lb:>24.2f}x{lb_sum * 1e3:>12.2f}{pair / lb_sum:>11.2f}x" if lb is not None else f"{'-':>25}"
            print(f"{size:>6}{t:>8}{alone * 1e3:>13.2f}{pair * 1e3:>13.2f}{pair / alone:>12.2f}x{lb_text}")
    print(f"memory decoder {memdec.name}, {args.n} tokens, median of {args.repeats} rounds; shaped bases: random weights")


def llama_bench(binary: Path, models: list[Path], n: int, threads: int = 2) -> dict[str, float]:
    """Seconds per token of llama-bench's tg test (one repetition) for the base and the memory decoder, with the
    weight buffers our runtime uses (no AMX repacking where the CPU has AMX: `llama_model.model_params`)."""
    repack = ["--repack", "0"] if cpu_has_amx() else []
    out = subprocess.run(
        [str(binary), *[a for m in models for a in ("-m", str(m))], "-t", str(threads), "-p", "0", "-n", str(n),
         "-r", "1", "-fa", "1", *repack, "-o", "json"],
        check=True, capture_output=True, text=True,
    ).stdout
    runs = json.loads(out)
    return {f"llama-bench, {name}": 1.0 / run["avg_ts"] for name, run in zip(("base", "memdec"), runs, strict=True)}


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"bench took {time.perf_counter() - start:.0f} s")
