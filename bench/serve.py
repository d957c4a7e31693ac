"""Server load: N concurrent OpenAI clients against `edge-memdec serve`'s server, next to the same requests
made one after the other through the Python API (what the one decode loop can do at best).

    python bench/serve.py --memdec MEM.gguf [-m BASE.gguf] [--clients 32] [-n 32] [-t THREADS]

Prints wall time, requests/s, answer tokens/s and per-request latency (median, 95th percentile).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf
from edge_memdec.server import MemdecServer

QUESTIONS = [
    "What does a software licence allow?",
    "Explain what a warranty disclaimer is.",
    "What is a sublicense?",
    "Can I sell software released under the MIT licence?",
]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def run_clients(server: MemdecServer, n_clients: int, max_tokens: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, answer tokens) for n_clients concurrent greedy chat requests."""
    client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=600)

    def one(i: int) -> tuple[float, int]:
        start = time.perf_counter()
        reply = client.chat.completions.create(
            model=server.model_id, messages=messages(i), max_tokens=max_tokens, temperature=0
        )
        return time.perf_counter() - start, reply.usage.completion_tokens

    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(one, range(n_clients)))
    return time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results)


def run_sequential(lm: MemoryDecoderLM, n_requests: int, max_tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    n_tokens = 0
    for i in range(n_requests):
        generation = lm.start(lm.chat_format.tokens(messages(i)), max_tokens=max_tokens, temperature=0.0)
        generation.run()
        n_tokens += len(generation.tokens)
    return time.perf_counter() - start, n_tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", type=Path, default=None)
    parser.add_argument("--memdec", type=Path, default=None)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("-n", type=int, default=32, help="max_tokens per request")
    parser.add_argument("-t", "--threads", type=int, default=None)
    args = parser.parse_args()
    memdec = args.memdec or default_memdec_gguf()
    lm = MemoryDecoderLM(args.model or default_base_gguf(), memdec, n_ctx=2048, n_threads=args.threads)
    server = MemdecServer(lm, port=0)
    server.warm_up()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wall, latencies, n_tokens = run_clients(server, args.clients, args.n)
        seq_wall, seq_tokens = run_sequential(lm, args.clients, args.n)
    finally:
        server.close()
        lm.close()
    p95 = statistics.quantiles(latencies, n=20)[-1] if len(latencies) > 1 else latencies[0]
    print(f"model: {server.model_id}, {args.clients} clients, max_tokens {args.n}")
    print("| run | wall s | requests/s | answer tok/s | median latency s | p95 latency s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| server, {args.clients} concurrent clients | {wall:.2f} | {args.clients / wall:.2f} | "
        f"{n_tokens / wall:.1f} | {statistics.median(latencies):.2f} | {p95:.2f} |"
    )
    print(
        f"| Python API, one after another | {seq_wall:.2f} | {args.clients / seq_wall:.2f} | "
        f"{seq_tokens / seq_wall:.1f} | - | - |"
    )


if __name__ == "__main__":
    main()
