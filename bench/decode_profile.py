"""Where a decode step's time goes: py-spy samples of the base + memory decoder decode loop, main thread only.

    pip install py-spy
    python bench/decode_profile.py [-n 400] [--rounds 4] [--rate 200]

Runs the shipped pair (sampled decoding, temperature 0.8) under `py-spy record --native` and prints the share of
the decode loop's samples spent in llama.cpp's `llama_decode`, in our numba kernels, and in each line of our
Python. Worker threads (llama.cpp's OpenMP pool) are left out: they show the same matrix work.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

WORKLOAD = """
from edge_memdec.api import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf
lm = MemoryDecoderLM(default_base_gguf(), default_memdec_gguf(), n_ctx=2048)
tokens = lm.tokenize("Permission is hereby granted, free of charge, to any person obtaining a copy")
for _ in range({rounds}):
    lm.pair.rewind(0)
    lm.start(tokens, max_tokens={n}, temperature=0.8, seed=1).run()
"""


def classify(frames: list[str]) -> str | None:
    """The part of the decode loop a sample belongs to, or None outside the loop."""
    if not any("(edge_memdec/decode.py" in f and "Generation" in f for f in frames):
        return None
    for frame in frames:
        if "llama_decode" in frame:
            return "llama.cpp: llama_decode"
        if "kernels/" in frame:
            return "numba kernel: " + frame.split(" ")[0]
    ours = [f for f in frames if "edge_memdec" in f]
    return "Python: " + (ours[-1] if ours else frames[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=400, help="tokens per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=int, default=200, help="samples per second")
    args = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed; pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        script, raw = Path(tmp) / "workload.py", Path(tmp) / "samples.txt"
        script.write_text(WORKLOAD.format(rounds=args.rounds, n=args.n))
        subprocess.run(
            ["py-spy", "record", "--native", "-f", "raw", "-r", str(args.rate), "-o", str(raw), "--",
             sys.executable, str(script)],
            check=True, capture_output=True,
        )
        parts: Counter[str] = Counter()
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            part = classify(stack.split(";"))
            if part is not None:
                parts[part] += int(count)
    total = sum(parts.values())
    print(f"{'share':>7}  part of the decode loop ({total} samples, main thread)")
    for part, count in parts.most_common(12):
        print(f"{count / total:>7.1%}  {part}")


if __name__ == "__main__":
    main()
