"""Lambda plots: perplexity against lambda for one or more mixtures, with flat lines for single models.

`perplexity --plot` draws a perplexity report; the recipe's report draws base + memory decoder beside
base + kNN-LM on the test split. Both go through `lambda_plot`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_memdec.errors import UserError
from edge_memdec.files import write_atomic

CURVE_COLORS = ("tab:blue", "tab:green", "tab:purple")


def lambda_plot(
    out: str | Path,
    curves: Sequence[tuple[str, Sequence[dict]]],
    flat: Sequence[tuple[str, float, str, str]],
    ylabel: str,
    title: str | None = None,
    annotate_best: bool = False,
) -> Path:
    """Write a PNG to `out`, atomically; returns the path.

    curves: (label, rows with "lambda" and "ppl"), one line with markers each; flat: (label, ppl, color,
    linestyle), one horizontal line each; `annotate_best` marks the first curve's lowest PPL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (label, rows), color in zip(curves, CURVE_COLORS, strict=False):
        ax.plot([r["lambda"] for r in rows], [r["ppl"] for r in rows], "o-", color=color, label=label)
    for label, ppl, color, style in flat:
        ax.axhline(ppl, color=color, linestyle=style, label=label)
    if annotate_best:
        best = min(curves[0][1], key=lambda row: row["ppl"])
        ax.annotate(
            f"best {best['ppl']:.2f} at {best['lambda']:g}",
            (best["lambda"], best["ppl"]),
            textcoords="offset points",
            xytext=(0, 10),
            ha="center",
        )
    ax.set_xlabel("lambda (memory decoder weight)")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_lambda_sweep(report: dict, out: str | Path, title: str | None = None) -> Path:
    """Write a PNG of `report["mixed"]` (from `perplexity`) to `out`, atomically; returns the path."""
    if not report.get("mixed"):
        raise UserError("--plot needs a memory decoder: there is no lambda sweep to draw without one")
    flat = [
        ("base alone", report["base"]["ppl"], "tab:gray", "--"),
        ("memory decoder alone", report["memdec"]["ppl"], "tab:orange", ":"),
    ]
    if report.get("knn_lm"):
        flat.append(("kNN-LM", report["knn_lm"]["ppl"], "tab:green", "-."))
    return lambda_plot(
        out,
        [("base + memory decoder", report["mixed"])],
        flat,
        f"perplexity ({report['protocol']} protocol, n_ctx {report['n_ctx']})",
        title or f"{report['tokens_scored']} tokens scored",
        annotate_best=True,
    )


def plot_compare(report: dict, out: str | Path) -> Path:
    """Bars of each `compare` row's PPL on the domain text (+/- stderr) and, when scored, on the general text;
    writes a PNG to `out` atomically and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = report["rows"]
    general = report.get("general_tokens_scored") is not None
    x = np.arange(len(rows))
    width = 0.4 if general else 0.6
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 4), dpi=110)
    domain = ax.bar(x - (width / 2 if general else 0), [r["ppl"] for r in rows], width,
                    yerr=[r["stderr"] for r in rows], capsize=3, color="tab:blue", label="domain text")  # fmt: skip
    ax.bar_label(domain, fmt="%.2f", fontsize=7)
    if general:
        bars = ax.bar(x + width / 2, [r["general_ppl"] for r in rows], width,
                      yerr=[r["general_stderr"] for r in rows], capsize=3, color="tab:gray", label="general text")  # fmt: skip
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, [r["name"].replace(" + ", "\n+ ") for r in rows], fontsize=8)
    ax.set_ylabel(f"perplexity ({report['protocol']} protocol, n_ctx {report['n_ctx']})")
    ax.set_title(f"{report['tokens_scored']} domain tokens scored")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, out)


def _save(fig, out: str | Path) -> Path:
    """Lay out `fig`, write it as a PNG at `out` atomically, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
