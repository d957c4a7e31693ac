"""Server load: 1, 4, 16 and 32 concurrent OpenAI clients against `edge-memdec serve`, for each `--parallel`
setting given, all measured in one run with the settings interleaved round by round. Each setting is a real
`edge-memdec serve` process, as users run it; the clients are threads of this one.

    python bench/serve.py [--memdec MEM.gguf] [-m BASE.gguf] [--parallel 1 4] [--clients 1 4 16 32] [-n 32]
                          [--min-requests 4] [--repeats 2] [-t THREADS] [-c CTX]

Each client sends greedy streamed chat requests one after the other (four legal questions in turn), as many
as make at least `--min-requests` in the round (1 client: 4 requests; 16 clients: one each). Per setting and
client count the table gives the median over the repeats of the aggregate answer tokens/s (all answer tokens
over the round's wall time) and its ratio to the same setting's 1-client row, then the p50 and p95 time to
first token (request sent -> first text chunk) over every request of every repeat, and the median streaming
rate of one request after its first chunk (answer tokens after the first / seconds from first to last chunk):
the 1-client aggregate rate also pays each request's prompt evaluation and HTTP round trip, this one does not. "changed" counts answers
unlike the Python API's, computed one after another from an empty cache on a pair opened like the server's
(flash attention setting included) in this process. A last table gives llama.cpp's own rate on the pair when 1, 4,
16 ... sequences each add a token per llama_decode (as the largest --parallel setting decodes): the most that
batching can gain on this machine, beside what that server reached: its answer tokens/s, and n times one
stream's rate after its first token (decoding alone, without the prompts).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import openai

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

QUESTIONS = [
    "What does a software licence allow?",
    "Explain what a warranty disclaimer is.",
    "What is a sublicense?",
    "Can I sell software released under the MIT licence?",
]


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


@dataclass
class Round:
    """One round: n clients at once, each sending its requests in turn."""

    wall: float  # seconds from the first request sent to the last answer read
    n_tokens: int  # answer tokens of all requests (the usage chunk's completion_tokens)
    ttft: list[float]  # seconds to the first text chunk, per request
    stream: list[float]  # tokens/s after the first text chunk, per request
    answers: list[tuple[int, str]]  # (request number, answer text) per request
    changed: int = 0  # answers unlike the Python API's


@dataclass
class Server:
    """An `edge-memdec serve` process on a free loopback port."""

    process: subprocess.Popen
    url: str
    model_id: str = ""

    @classmethod
    def start(cls, base: Path, memdec: Path, parallel: int, threads: int | None, ctx: int) -> Server:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "edge_memdec.cli", "serve", "-m", str(base), "--memdec", str(memdec)]
        command += ["--port", str(port), "--parallel", str(parallel), "-c", str(ctx)]
        command += ["-t", str(threads)] if threads else []
        server = cls(subprocess.Popen(command, stdout=subprocess.DEVNULL), f"http://127.0.0.1:{port}/v1")
        client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=5)
        for _ in range(600):
            if server.process.poll() is not None:
                raise SystemExit(f"edge-memdec serve exited with {server.process.returncode}")
            try:
                server.model_id = client.models.list().data[0].id
                return server
            except openai.APIConnectionError:
                time.sleep(0.5)
        raise SystemExit("edge-memdec serve did not answer within 5 minutes")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


@dataclass
class Setting:
    parallel: int
    server: Server
    rounds: dict[int, list[Round]] = field(default_factory=dict)  # clients -> repeats


def run_round(server: Server, n_clients: int, n_requests: int, max_tokens: int) -> Round:
    client = openai.OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=900)

    def one(i: int) -> tuple[float, float, int, str]:
        start = time.perf_counter()
        first, last, text, n_tokens = None, start, "", 0
        stream = client.chat.completions.create(
            model=server.model_id, messages=messages(i), max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in stream:
            if chunk.usage is not None:
                n_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last - start
                text += chunk.choices[0].delta.content
        first = first if first is not None else time.perf_counter() - start
        after = last - start - first
        return first, (n_tokens - 1) / after if n_tokens > 1 and after > 0 else float("nan"), n_tokens, text

    def client_requests(c: int) -> list[tuple[int, float, float, int, str]]:
        return [(i, *one(i)) for i in range(c * n_requests, (c + 1) * n_requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = [r for rs in pool.map(client_requests, range(n_clients)) for r in rs]
    wall = time.perf_counter() - start
    answers = [(i, text) for i, _, _, _, text in results]
    return Round(wall, sum(r[3] for r in results), [r[1] for r in results], [r[2] for r in results], answers)


def reference_answers(lm: MemoryDecoderLM, max_tokens: int) -> dict[int, str]:
    """Each question's greedy answer through the Python API, from an empty cache."""
    answers = {}
    for i in range(len(QUESTIONS)):
        lm.pair.rewind(0)
        answers[i] = lm.chat(messages(i), max_tokens=max_tokens, temperature=0.0)
    return answers


def sequence_rates(lm: MemoryDecoderLM, counts: list[int], n_steps: int = 16, repeats: int = 3) -> dict[int, float]:
    """Tokens/s of the pair's llama_decode calls when n sequences (n in `counts`, each <= the pair's n_parallel)
    each add one token per call, logits for every row, after a short prompt each: what the batched server's
    decode step computes for n clients, without HTTP, mixing or sampling (median of `repeats`)."""
    pair = lm.pair
    prompt = lm.tokenize(QUESTIONS[0])
    rates = {}
    for n in counts:
        seqs = list(range(n))
        runs = []
        for _ in range(repeats):
            for seq in seqs:  # prompts one call each, as the server evaluates them
                pair.clear(seq)
                pair.eval_seqs([seq], [prompt], [False])
            start = time.perf_counter()
            for _ in range(n_steps):
                pair.eval_seqs(seqs, [[prompt[-1]]] * n, [True] * n)
            runs.append(n * n_steps / (time.perf_counter() - start))
        rates[n] = statistics.median(runs)
        for seq in seqs:
            pair.clear(seq)
    return rates


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", type=Path, default=None)
    parser.add_argument("--memdec", type=Path, default=None)
    parser.add_argument("--parallel", type=int, nargs="+", default=[1, 4], help="server settings to compare")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("-n", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--min-requests", type=int, default=4, help="fewest requests in a round")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-t", "--threads", type=int, default=None)
    parser.add_argument("-c", "--ctx-size", type=int, default=2048, help="context of each sequence")
    args = parser.parse_args()
    if 1 not in args.clients:
        parser.error("--clients must include 1: the other rows are compared with it")
    base, memdec = args.model or default_base_gguf(), args.memdec or default_memdec_gguf()
    settings, ceiling = [], {}
    try:
        for parallel in args.parallel:
            with MemoryDecoderLM(base, memdec, n_ctx=args.ctx_size, n_threads=args.threads, n_parallel=parallel) as lm:
                reference = reference_answers(lm, args.n)
                if parallel == max(args.parallel) and parallel > 1:
                    ceiling = sequence_rates(lm, [n for n in args.clients if n <= parallel])
                threads_used = lm.pair.base.options.n_threads or "all"
            server = Server.start(base, memdec, parallel, args.threads, args.ctx_size)
            settings.append((Setting(parallel, server), reference))
        for repeat in range(args.repeats):
            order = settings if repeat % 2 == 0 else settings[::-1]  # interleaved: drift hits every setting
            for setting, reference in order:
                for n_clients in args.clients:
                    per_client = -(-args.min_requests // n_clients)
                    measured = run_round(setting.server, n_clients, per_client, args.n)
                    measured.changed = sum(text != reference[i % len(QUESTIONS)] for i, text in measured.answers)
                    setting.rounds.setdefault(n_clients, []).append(measured)
    finally:
        for setting, _ in settings:
            setting.server.close()
    print(f"{settings[0][0].server.model_id}, max_tokens {args.n}, threads {threads_used}, "
          f"median of {args.repeats} interleaved repeats")  # fmt: skip
    print("| --parallel | clients | answer tok/s | vs 1 client | p50 TTFT s | p95 TTFT s | one stream tok/s "
          "| answers changed |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for setting, _ in settings:
        rates = {n: statistics.median(r.n_tokens / r.wall for r in rounds) for n, rounds in setting.rounds.items()}
        for n_clients, rounds in setting.rounds.items():
            ttft = [t for r in rounds for t in r.ttft]
            stream = statistics.median(t for r in rounds for t in r.stream if t == t)  # NaN: one-token answers
            n_answers = sum(len(r.answers) for r in rounds)
            print(
                f"| {setting.parallel} | {n_clients} | {rates[n_clients]:.1f} | {rates[n_clients] / rates[1]:.2f}x | "
                f"{statistics.median(ttft):.2f} | {p95(ttft):.2f} | {stream:.1f} | {sum(r.changed for r in rounds)} of {n_answers} |"
            )
    if ceiling:
        top = next(setting for setting, _ in settings if setting.parallel == max(args.parallel))
        print(f"llama.cpp on this pair, n sequences adding one token each per llama_decode (exact attention, "
              f"no HTTP, mixing or sampling): the most batching gains here, beside the server at --parallel "
              f"{top.parallel}: its answer tok/s (prompts and HTTP included) and n x one stream's rate")
        print("| sequences | llama.cpp tok/s | vs 1 sequence | server answer tok/s | n x one stream | "
              "(n x one stream) / llama.cpp |")
        print("|---|---|---|---|---|---|")
        for n, rate in ceiling.items():
            rounds = top.rounds[n]
            answer = statistics.median(r.n_tokens / r.wall for r in rounds)
            streaming = n * statistics.median(t for r in rounds for t in r.stream if t == t)
            print(f"| {n} | {rate:.1f} | {rate / ceiling[min(ceiling)]:.2f}x | {answer:.1f} | {streaming:.1f} | "
                  f"{streaming / rate:.2f} |")


if __name__ == "__main__":
    main()
