"""Perplexity arithmetic shared by the runtime and training: mixtures, PPL and its standard error, the reports.

Everything works on per-position target log-probabilities (natural log, float64 [n_scored]) or their negatives
(NLL, nats). A mixture of the base with another distribution is p = lambda * p_other + (1 - lambda) * p_base.
numpy only: the runtime imports this without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class Accumulator:
    """Running sums of per-token negative log-likelihoods (nats) for one model or mixture."""

    def __init__(self) -> None:
        self.count = 0
        self.nll = 0.0
        self.nll2 = 0.0

    @classmethod
    def of_logprobs(cls, logprobs: np.ndarray) -> Accumulator:
        """An accumulator holding -logprobs (float [n])."""
        acc = cls()
        acc.add(-np.asarray(logprobs, np.float64))
        return acc

    def add(self, nll: np.ndarray) -> None:
        self.count += len(nll)
        self.nll += float(nll.sum())
        self.nll2 += float(np.square(nll).sum())

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def stderr(self) -> float:
        """Standard error of the PPL, computed as llama-perplexity does (delta method on the mean NLL)."""
        if self.count < 2:
            return float("nan")
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return math.sqrt(max(var, 0.0) / (self.count - 1)) * self.ppl

    def report(self) -> dict[str, float]:
        return {"ppl": self.ppl, "stderr": self.stderr}

    def state(self) -> list[float]:
        return [self.count, self.nll, self.nll2]

    def restore(self, state: list[float]) -> None:
        self.count, self.nll, self.nll2 = int(state[0]), float(state[1]), float(state[2])


def mix_logprobs(base_lp: np.ndarray, other_lp: np.ndarray, lam: float) -> np.ndarray:
    """log(lambda * p_other + (1 - lambda) * p_base) per position; lambda <= 0 is the base, >= 1 the other."""
    if lam <= 0:
        return base_lp
    if lam >= 1:
        return other_lp
    return np.logaddexp(np.log1p(-lam) + base_lp, np.log(lam) + other_lp)


def ppl_of(logprobs: np.ndarray) -> float:
    """exp(mean NLL) of target log-probs."""
    return float(np.exp(-np.mean(logprobs)))


def mixed_ppl(base_lp: np.ndarray, other_lp: np.ndarray, lambdas: Sequence[float]) -> dict[float, float]:
    """PPL of each lambda's mixture (0 is the base alone, 1 the other alone): {lambda: ppl}."""
    return {float(lam): ppl_of(mix_logprobs(base_lp, other_lp, lam)) for lam in lambdas}


def knn_lm_report(scores: dict, knn_lambda: float, lambdas: Sequence[float]) -> dict:
    """The kNN-LM baseline's PPL from per-position target log-probs (`train.knn_lm.knn_lm_scores`, or its
    cached copy, whose scalars are numpy arrays).

    kNN-LM mixes the base (run in PyTorch to get its retrieval keys) with the neighbours' distribution.
    Reported at `knn_lambda` and at the best lambda of the sweep (lambda 1 excluded: kNN alone may miss).
    """
    base = np.asarray(scores["base_logprobs"], np.float64)
    knn = np.asarray(scores["knn_logprobs"], np.float64)

    def mixed(lam: float) -> dict[str, float]:
        with np.errstate(divide="ignore"):
            return Accumulator.of_logprobs(mix_logprobs(base, knn, lam)).report()

    sweep = [{"lambda": lam, **mixed(lam)} for lam in lambdas if lam < 1.0]
    best = min(sweep, key=lambda row: row["ppl"]) if sweep else None
    return {
        "lambda": knn_lambda,
        **mixed(knn_lambda),
        "best": best,
        "k": int(scores["k"]),
        "temperature": float(scores["temperature"]),
        "datastore_positions": int(scores["datastore_positions"]),
        "tokens_scored": int(scores["tokens_scored"]),
        "base_pytorch": Accumulator.of_logprobs(base).report(),
        "seconds": scores["seconds"],
    }


def format_report(report: dict) -> str:
    """The report as a table, then llama-perplexity's `Final estimate` line for the base alone or, with a memory
    decoder, for the mixture at the selected lambda (the model the running `[i]` lines follow)."""
    lines = [f"{'model':<28}{'PPL':>10}{'+/-':>10}"]
    base = report["base"]
    label = "base + LoRA" if report.get("lora") else "base"
    lines.append(f"{label:<28}{base['ppl']:>10.4f}{base['stderr']:>10.5f}")
    headline = base
    if report["memdec"] is not None:
        several = len(report.get("memdecs") or ()) > 1
        if several:
            for mem in report["memdecs"]:
                label = f"memory decoder {mem['name']}"
                lines.append(f"{label:<28}{mem['ppl']:>10.4f}{mem['stderr']:>10.5f}")
            fixed = ", ".join(f"{name} {lam:g}" for name, lam in report["lambdas"].items() if name != report["sweep"])
            lines.append(f"lambda of {report['sweep']} swept, fixed: {fixed}")
        else:
            mem = report["memdec"]
            lines.append(f"{'memory decoder':<28}{mem['ppl']:>10.4f}{mem['stderr']:>10.5f}")
        if report.get("lambda_gate"):
            lines.append(f"lambda gate {report['lambda_gate']}: each token's lambda is the row's times its gate factor")
        for row in report["mixed"]:
            mark = "  <- best" if row["lambda"] == report["best_lambda"] else ""
            label = f"mixed, {report['sweep'] + ' ' if several else ''}lambda {row['lambda']:g}"
            lines.append(f"{label:<28}{row['ppl']:>10.4f}{row['stderr']:>10.5f}{mark}")
        if report["mixed"]:
            best = min(report["mixed"], key=lambda row: row["ppl"])
            lines.append(f"best lambda {report['best_lambda']:g}: {best['ppl'] / base['ppl']:.3f} x the base PPL")
        headline = report["selected"]
        chosen = (
            "lambdas " + ", ".join(f"{name} {lam:g}" for name, lam in report["lambdas"].items())
            if several
            else f"lambda {headline['lambda']:g}"
        )
        lines.append(f"selected {chosen}: {headline['ppl'] / base['ppl']:.3f} x the base PPL")
    knn = report.get("knn_lm")
    if knn is not None:
        lines.append(
            f"{'kNN-LM, lambda ' + format(knn['lambda'], 'g'):<28}{knn['ppl']:>10.4f}{knn['stderr']:>10.5f}"
        )
        if knn["best"] is not None:
            best_knn = knn["best"]
            lines.append(
                f"{'kNN-LM, best lambda ' + format(best_knn['lambda'], 'g'):<28}{best_knn['ppl']:>10.4f}{best_knn['stderr']:>10.5f}"
            )
        lines.append(
            f"(kNN-LM: base in PyTorch fp32, PPL {knn['base_pytorch']['ppl']:.4f}; k {knn['k']}, T {knn['temperature']:g}, "
            f"{knn['datastore_positions']} datastore entries)"
        )
    settings = "".join(
        f", {label} {report[key]}" for key, label in (("flash_attn", "flash attention"), ("n_ubatch", "ubatch"))
        if key in report
    )  # fmt: skip
    lines.append(
        f"{report['tokens_scored']} tokens scored, {report['protocol']} protocol, n_ctx {report['n_ctx']}, "
        f"stride {report['stride']}{settings}, {report['seconds']:.1f} s"
    )
    lines.append(f"Final estimate: PPL = {headline['ppl']:.4f} +/- {headline['stderr']:.5f}")
    return "\n".join(lines)


def mixture_nll(
    nll_base: np.ndarray, nll_mems: np.ndarray, weights: np.ndarray, gate: np.ndarray | None = None
) -> np.ndarray:
    """NLL (nats, float64 [rows, cols]) of the target under p = sum_i w_ci p_i + (1 - sum_i w_ci) p_base for
    each weight row c.

    nll_base [rows] and nll_mems [k, rows]: each model's own NLL of the same targets; weights [cols, k]: one
    lambda per memory decoder per row, summing to at most 1 (float rounding above 1 is clipped). A weight 0
    drops its model exactly, so a row (lambda, 0, ...) equals the two-model mixture at lambda. `gate`
    (float64 [rows] in [0, 1], the entropy gate's factors) scales every decoder's weight at each position."""
    logp = -np.vstack([nll_base[None, :], nll_mems])  # [k + 1, rows]
    g = np.ones(len(nll_base)) if gate is None else np.asarray(gate, np.float64)
    mem_w = weights[:, :, None] * g[None, None, :]  # [cols, k, rows]
    w = np.concatenate([np.clip(1.0 - mem_w.sum(axis=1, keepdims=True), 0.0, None), mem_w], axis=1)
    with np.errstate(divide="ignore"):
        terms = np.log(w) + logp[None, :, :]  # [cols, k + 1, rows]
    top = terms.max(axis=1)
    return -(top + np.log(np.exp(terms - top[:, None, :]).sum(axis=1))).T
