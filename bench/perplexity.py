"""Perplexity cost: base + memory decoder + an 11-lambda sweep in one pass against the base alone, and peak memory.

    python bench/perplexity.py [-m BASE.gguf] [--memdec MEM.gguf] [--tokens 8192] [--repeats 3] [--threads 2]
                               [--rss-tokens 4096,16384] [-c 1024]

Text: the legal test split (licensedcode-data licence texts, split by document with the corpus command's seed),
cut to --tokens tokens. Both settings score the same text with the same protocol (the paper's: windows of -c
tokens moved by -c/2, each scoring the tokens no earlier window scored) through `edge_memdec.perplexity`:
1. the base alone;
2. the memory decoder alone, loaded as a base (a full-depth decoder is a whole LM);
3. base + memory decoder, reporting base, memory decoder and the mixture at lambda 0, 0.1, ..., 1.
Runs alternate between the three so all see the same machine load; prints the median seconds of each, tokens/s
of scored text, the ratio pair / base and pair / (base + decoder scored alone) (issue target: <= 1.05). It also counts the logit rows the runtime asks
llama.cpp for against the tokens it evaluates (only the scored rows should be asked for: ~1/2 with -c/2 strides).

Peak memory: for each length in --rss-tokens, a fresh Python process loads the pair and scores that much text;
its peak RSS after loading and at the end are printed. The growth from load to end should not depend on the
text's length.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.corpus import join_documents, load_corpus, split_documents
from edge_memdec.defaults import PERPLEXITY_LAMBDAS
from edge_memdec.llama_model import LlamaModel
from edge_memdec.pair import ModelPair
from edge_memdec.paths import default_base_gguf, default_memdec_gguf


def legal_text(model: LlamaModel, n_tokens: int) -> tuple[str, int]:
    """The first ~n_tokens tokens of the legal test split as text, and its token count (as perplexity counts)."""
    text = join_documents(split_documents(load_corpus("legal"))["test"])
    tokens = model.tokenize(text, add_bos=None, special=False)
    if len(tokens) < n_tokens:
        raise SystemExit(f"the legal test split has {len(tokens)} tokens; ask for at most that many")
    prefix = b"".join(model.piece(t) for t in tokens[:n_tokens]).decode("utf-8", errors="ignore")
    return prefix, len(model.tokenize(prefix, add_bos=None, special=False))


class RowCounter:
    """Wraps a pair's eval to count tokens evaluated and logit rows requested."""

    def __init__(self, pair: ModelPair) -> None:
        self.tokens = 0
        self.rows = 0
        self._eval = pair.eval
        pair.eval = self  # type: ignore[method-assign]

    def __call__(self, tokens: Sequence[int], logits: Sequence[bool] | None = None) -> int:
        self.tokens += len(tokens)
        self.rows += 1 if logits is None else sum(bool(x) for x in logits)
        return self._eval(tokens, logits)


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_lm(base: Path, memdec: Path | None, n_ctx: int, threads: int) -> MemoryDecoderLM:
    # flash attention off, as `edge-memdec perplexity` runs by default
    return MemoryDecoderLM(base, memdec, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, flash_attn=False)


def rss_child(args: argparse.Namespace, base: Path, memdec: Path) -> None:
    """Fresh-process measurement: load, score --rss-child tokens, print one JSON line."""
    lm = open_lm(base, memdec, args.c, args.threads)
    text = Path(args.rss_text).read_text(encoding="utf-8")  # cut by the parent: reading the corpus is not ours
    n_tokens = len(lm.pair.base.tokenize(text, add_bos=None, special=False))
    after_load = peak_rss_mib()
    report = lm.perplexity(text, "paper", args.c, lambdas=PERPLEXITY_LAMBDAS)
    end = peak_rss_mib()
    lm.close()
    print(
        json.dumps({"tokens": n_tokens, "scored": report["tokens_scored"], "load": after_load, "peak": end})
    )


def timed(lm: MemoryDecoderLM, text: str, n_ctx: int, lambdas: Sequence[float]) -> tuple[float, dict]:
    """Seconds for one paper-protocol perplexity run (tokenization included, model loading not), and its report."""
    t0 = time.perf_counter()
    report = lm.perplexity(text, "paper", n_ctx, lambdas=lambdas)
    return time.perf_counter() - t0, report


def timing(args: argparse.Namespace, base: Path, memdec: Path) -> None:
    """The timing table: base alone and the decoder alone against base + memory decoder + the lambda sweep, same
    text and protocol."""
    lm_base = open_lm(base, None, args.c, args.threads)
    lm_memdec = open_lm(memdec, None, args.c, args.threads)
    lm_pair = open_lm(base, memdec, args.c, args.threads)
    text, n_tokens = legal_text(lm_base.pair.base, args.tokens)
    # one or two windows first: numba JIT and llama.cpp buffers stay out of the timing
    warm = text[: len(text) * (args.c * 5 // 4) // n_tokens]
    timed(lm_base, warm, args.c, [])
    timed(lm_memdec, warm, args.c, [])
    timed(lm_pair, warm, args.c, PERPLEXITY_LAMBDAS)
    counter = RowCounter(lm_pair.pair)
    times_base, times_memdec, times_pair = [], [], []
    report: dict = {}
    for _ in range(args.repeats):
        times_base.append(timed(lm_base, text, args.c, [])[0])
        times_memdec.append(timed(lm_memdec, text, args.c, [])[0])
        seconds, report = timed(lm_pair, text, args.c, PERPLEXITY_LAMBDAS)
        times_pair.append(seconds)
    lm_base.close()
    lm_memdec.close()
    lm_pair.close()
    t_base, t_memdec = statistics.median(times_base), statistics.median(times_memdec)
    t_pair = statistics.median(times_pair)
    scored = report["tokens_scored"]

    print(f"{'setting':<48}{'seconds':>9}{'tok/s':>9}{'x base':>9}")
    print(f"{'base alone':<48}{t_base:>9.2f}{scored / t_base:>9.1f}{1.0:>9.2f}")
    label = "memory decoder alone (as a base)"
    print(f"{label:<48}{t_memdec:>9.2f}{scored / t_memdec:>9.1f}{t_memdec / t_base:>9.2f}")
    label = f"base + memdec + {len(PERPLEXITY_LAMBDAS)} lambdas, one pass"
    print(f"{label:<48}{t_pair:>9.2f}{scored / t_pair:>9.1f}{t_pair / t_base:>9.2f}")
    alone = t_base + t_memdec
    print(f"pair / (base alone + decoder alone): {t_pair / alone:.3f}   (target <= 1.05)")
    rows_per_run = counter.rows / args.repeats
    evals_per_run = counter.tokens / args.repeats
    print(
        f"logit rows requested per model: {rows_per_run:.0f} for {evals_per_run:.0f} tokens evaluated "
        f"({rows_per_run / evals_per_run:.3f}), {scored} tokens scored"
    )
    print(
        f"PPL base {report['base']['ppl']:.3f}, memdec {report['memdec']['ppl']:.3f}, "
        f"best lambda {report['best_lambda']:g}"
    )
    print(
        f"{n_tokens} tokens of legal test text, paper protocol -c {args.c} stride {args.c // 2}, "
        f"{args.threads} threads, {args.repeats} repeats (median); base {base.name}, memory decoder {memdec.name}"
    )


def peak_rss_table(args: argparse.Namespace, base: Path, memdec: Path, lengths: Sequence[int]) -> None:
    """One fresh process per text length: peak RSS after loading and after scoring."""
    title = "peak RSS, fresh process (pair + 11 lambdas)"
    print(f"\n{title:<48}{'tokens':>9}{'load MiB':>10}{'end MiB':>10}{'growth':>9}")
    with open_lm(base, None, args.c, args.threads) as lm:
        texts = {length: legal_text(lm.pair.base, length)[0] for length in lengths}
    for length in lengths:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", encoding="utf-8", delete=False) as handle:
            handle.write(texts[length])
        cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", str(length), "-c", str(args.c)]
        cmd += ["--rss-text", handle.name]
        cmd += ["-m", str(base), "--memdec", str(memdec), "--threads", str(args.threads)]
        try:
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        finally:
            Path(handle.name).unlink()
        child = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
        growth = child["peak"] - child["load"]
        print(f"{'':<48}{child['tokens']:>9}{child['load']:>10.1f}{child['peak']:>10.1f}{growth:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-m", "--model", type=Path, default=None, help="base GGUF (default: SmolLM2-135M)")
    parser.add_argument(
        "--memdec", type=Path, default=None, help="memory decoder GGUF (default: the shipped one)"
    )
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of legal text for the timing")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per setting (median); 0 measures peak RSS only"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-c", type=int, default=1024, help="window size (stride is half of it)")
    parser.add_argument(
        "--rss-tokens", default="4096,16384", help="text lengths for the peak-RSS processes ('' skips them)"
    )
    parser.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-text", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = args.model or default_base_gguf()
    memdec = args.memdec or default_memdec_gguf()
    if memdec is None:
        parser.error("no shipped memory decoder in this checkout; pass --memdec MEM.gguf")
    if args.rss_child is not None:
        rss_child(args, base, memdec)
        return
    start = time.perf_counter()
    if args.repeats > 0:
        timing(args, base, memdec)
    lengths = [int(x) for x in args.rss_tokens.split(",") if x.strip()]
    if lengths:
        peak_rss_table(args, base, memdec, lengths)
    print(f"bench took {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
