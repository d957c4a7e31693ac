"""Start-up time: wall seconds of `edge-memdec chat -p hi -n 1` in fresh processes, and where they go.

Each repeat starts a new Python process (warm OS file cache and numba cache after the first): the CLI end to
end, then a traced process that times its stages (imports, loading both models with the kernels warming in a
thread, the first token). Prints medians. Run on an idle machine:

    python bench/startup.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

TRACE = r"""
import json, sys, time
t0 = time.perf_counter()
from edge_memdec.api import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf
t1 = time.perf_counter()
lm = MemoryDecoderLM(default_base_gguf(), default_memdec_gguf(), n_ctx=4096, n_threads=int(sys.argv[1]))
t2 = time.perf_counter()
lm.chat([{"role": "user", "content": "hi"}], max_tokens=1, temperature=0)
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "load pair + kernels": t2 - t1, "first token": t3 - t2}))
"""


def cli_seconds(threads: int) -> float:
    """Wall seconds of one `edge-memdec chat -p hi -n 1` process, interpreter start included."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "edge_memdec.cli", "chat", "-p", "hi", "-n", "1", "--temp", "0"]
    subprocess.run([*cmd, "-t", str(threads)], check=True, capture_output=True)
    return time.perf_counter() - t0


def traced(threads: int) -> dict[str, float]:
    """Seconds per stage of one fresh process (see TRACE)."""
    out = subprocess.run(
        [sys.executable, "-c", TRACE, str(threads)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cli_seconds(args.threads)  # fill the OS file cache and the numba cache
    walls = [cli_seconds(args.threads) for _ in range(args.repeats)]
    stages = [traced(args.threads) for _ in range(args.repeats)]
    print(f"{'edge-memdec chat -p hi -n 1':40s} {'median s':>9s} {'min s':>7s}")
    print(f"{'wall, whole process':40s} {statistics.median(walls):9.2f} {min(walls):7.2f}")
    for name in stages[0]:
        values = [s[name] for s in stages]
        print(f"{'  ' + name:40s} {statistics.median(values):9.2f} {min(values):7.2f}")
    print("target: <= 2 s wall with warm caches")


if __name__ == "__main__":
    main()
