"""What the per-token trace costs: decode with `explain` off, and on with 0, 3 and 20 alternatives, in one run.

    python bench/explain.py [--memdec MEM.gguf] [-m BASE.gguf] [-n 96] [--rounds 5]

Each round times every setting once (interleaved, so machine noise hits them alike) on the same greedy answer;
the table gives the median ms/token and its ratio to `explain` off. Off is the plain decode loop: the trace code
runs only when asked for.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

PROMPT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"
SETTINGS = (("off", False), ("on, 0 alternatives", 0), ("on, 3 alternatives", 3), ("on, 20 alternatives", 20))


def ms_per_token(lm: MemoryDecoderLM, tokens: list[int], n: int, explain: bool | int) -> float:
    lm.pair.rewind(0)
    generation = lm.start(tokens, max_tokens=n, temperature=0.0, ignore_eos=True, explain=explain)
    generation.run()
    return 1000.0 * generation.decode_seconds / max(1, len(generation.tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, default=None)
    parser.add_argument("--memdec", type=Path, default=None)
    parser.add_argument("-n", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    base = args.model or default_base_gguf()
    memdec = args.memdec or default_memdec_gguf()
    with MemoryDecoderLM(base, memdec, n_ctx=1024, flash_attn=None) as lm:
        tokens = lm.tokenize(PROMPT)
        for _, explain in SETTINGS:  # warm-up: kernels compiled, caches touched
            ms_per_token(lm, tokens, 8, explain)
        times: dict[str, list[float]] = {name: [] for name, _ in SETTINGS}
        for _ in range(args.rounds):
            for name, explain in SETTINGS:
                times[name].append(ms_per_token(lm, tokens, args.n, explain))
    off = statistics.median(times["off"])
    print(f"{base.name} + {Path(memdec).name}, {args.n} tokens, median of {args.rounds} rounds")
    print(f"{'explain':<22} {'ms/token':>9} {'vs off':>7}")
    for name, _ in SETTINGS:
        ms = statistics.median(times[name])
        print(f"{name:<22} {ms:9.2f} {ms / off:6.3f}x")


if __name__ == "__main__":
    main()
