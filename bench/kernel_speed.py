"""The numba kernels against the best numpy equivalents (float32, in place), measured in one run.

    python bench/kernel_speed.py [--calls 400]

For vocabularies of 49,152 (SmolLM2) and 151,936 (Qwen2.5) ids, prints the median microseconds per call of:
the fused sampling step at llama.cpp's default settings (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05),
the same for the base model alone, greedy, mix_logprobs, and the entropy gate's lambda (both rows' entropies);
numba and numpy calls are interleaved so both see
the same machine load. The logit rows are synthetic (normal noise, std 2.5, plus a few peaked tokens).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from edge_memdec.kernels import gated_lambda, make_scratch, mix_logprobs, sample_token, warmup

LAM = 0.3
TYPICAL = (0.8, 40, 0.95, 0.05)  # temperature, top_k, top_p, min_p


class NumpyMixer:
    """Mixture and sampler in numpy with preallocated float32 buffers and in-place ufuncs."""

    def __init__(self, n: int):
        self.p = np.empty(n, np.float32)
        self.q = np.empty(n, np.float32)

    def probs(self, base: np.ndarray, mem: np.ndarray | None, lam: float) -> np.ndarray:
        """Mixed probabilities (float32 [n]) in self.p."""
        n = len(base) if mem is None else min(len(base), len(mem))
        p, q = self.p[:n], self.q[:n]
        b = base[:n]
        np.subtract(b, b.max(), out=p)
        np.exp(p, out=p)
        if mem is None:
            p *= np.float32(1.0 / p.sum(dtype=np.float64))
            return p
        m = mem[:n]
        np.subtract(m, m.max(), out=q)
        np.exp(q, out=q)
        p *= np.float32((1.0 - lam) / p.sum(dtype=np.float64))
        q *= np.float32(lam / q.sum(dtype=np.float64))
        p += q
        return p

    def mix_logprobs(self, base: np.ndarray, mem: np.ndarray, lam: float) -> np.ndarray:
        """log of the mixed probabilities (underflows to -inf below float32's range, unlike the kernel)."""
        p = self.probs(base, mem, lam)
        return np.log(p, out=p)

    def gated_lambda(self, base: np.ndarray, mem: np.ndarray, lam: float, slope: float, offset: float) -> float:
        entropies = []
        for row in (base, mem):
            np.subtract(row, row.max(), out=self.p)
            np.exp(self.p, out=self.q)
            z = self.q.sum(dtype=np.float64)
            entropies.append(np.log(z) - np.dot(self.p, self.q) / z)
        return lam / (1.0 + np.exp(-(slope * (entropies[0] - entropies[1]) + offset)))

    def greedy(self, base: np.ndarray, mem: np.ndarray | None, lam: float) -> int:
        if mem is None:
            return int(np.argmax(base))
        return int(np.argmax(self.probs(base, mem, lam)))

    def sample(self, base, mem, lam, temperature, top_k, top_p, min_p, u) -> int:
        """The kernel's semantics: top-k, top-p, min-p, temperature, inverse-CDF draw in id order.

        top-k runs argpartition over the tokens within 1e-4 of the most probable one when there are at least k
        of them; the base alone is ranked by its logits, without a pass of exps.
        """
        if mem is None:
            scores = base
            candidates = np.flatnonzero(base >= base.max() - np.float32(np.log(1e4)))
        else:
            scores = self.probs(base, mem, lam)
            candidates = np.flatnonzero(scores >= scores.max() * np.float32(1e-4))
        if len(candidates) < top_k:
            candidates = np.arange(len(scores))
        head = candidates[np.argpartition(scores[candidates], -top_k)[-top_k:]]
        ph = scores[head].astype(np.float64)
        if mem is None:
            ph = np.exp(ph - ph.max())
        order = np.lexsort((head, -ph))
        head, ph = head[order], ph[order]
        cum = np.cumsum(ph)
        kept = int(np.searchsorted(cum, top_p * cum[-1])) + 1
        head, ph = head[:kept], ph[:kept]
        keep = ph >= min_p * ph[0]
        head, w = head[keep], (ph[keep] / ph[0]) ** (1.0 / temperature)
        order = np.argsort(head)
        cum = np.cumsum(w[order])
        return int(head[order][min(np.searchsorted(cum, u * cum[-1], side="right"), len(cum) - 1)])


def synthetic_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    row = rng.standard_normal(n) * 2.5
    row[rng.integers(0, n, 8)] += 12.0
    return row.astype(np.float32)


def interleaved(fast: Callable[[], object], slow: Callable[[], object], calls: int) -> tuple[float, float]:
    """Median microseconds per call of each, alternating calls."""
    times_fast, times_slow = [], []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        fast()
        t1 = time.perf_counter_ns()
        slow()
        t2 = time.perf_counter_ns()
        times_fast.append((t1 - t0) / 1e3)
        times_slow.append((t2 - t1) / 1e3)
    return statistics.median(times_fast), statistics.median(times_slow)


def bench_vocab(n: int, rng: np.random.Generator, calls: int) -> None:
    """Print the table rows of one vocabulary size."""
    base, mem = synthetic_logits(rng, n), synthetic_logits(rng, n)
    scratch, ref, out = make_scratch(n), NumpyMixer(n), np.empty(n, np.float32)
    for u in rng.random(20):
        drawn, expected = (
            sample_token(base, mem, LAM, *TYPICAL, u, scratch),
            ref.sample(base, mem, LAM, *TYPICAL, u),
        )
        assert drawn == expected, f"numba drew {drawn}, numpy {expected} at u={u}"
    u = 0.5
    cases = {
        f"sample, lambda {LAM}, typical": (
            lambda: sample_token(base, mem, LAM, *TYPICAL, u, scratch),
            lambda: ref.sample(base, mem, LAM, *TYPICAL, u),
        ),
        "sample, base alone, typical": (
            lambda: sample_token(base, None, LAM, *TYPICAL, u, scratch),
            lambda: ref.sample(base, None, LAM, *TYPICAL, u),
        ),
        f"greedy, lambda {LAM}": (
            lambda: sample_token(base, mem, LAM, 0.0, 40, 0.95, 0.05, u, scratch),
            lambda: ref.greedy(base, mem, LAM),
        ),
        f"mix_logprobs, lambda {LAM}": (
            lambda: mix_logprobs(base, mem, LAM, out),
            lambda: ref.mix_logprobs(base, mem, LAM),
        ),
        "gated lambda (two entropies)": (
            lambda: gated_lambda(base, mem, 0.9, 1.0, 0.0),
            lambda: ref.gated_lambda(base, mem, 0.9, 1.0, 0.0),
        ),
    }
    for name, (fast, slow) in cases.items():
        t_fast, t_slow = interleaved(fast, slow, calls)
        print(f"{n:>7}  {name:<30} {t_fast:>9.1f} {t_slow:>9.1f} {t_slow / t_fast:>7.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=400, help="timed calls per row of the table")
    args = parser.parse_args()
    warmup()
    rng = np.random.default_rng(0)
    print(f"{'vocab':>7}  {'kernel':<30} {'numba us':>9} {'numpy us':>9} {'speed-up':>8}")
    for n in (49152, 151936):
        bench_vocab(n, rng, args.calls)


if __name__ == "__main__":
    main()
