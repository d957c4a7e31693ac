"""The lambda plot: mixed perplexity against lambda, with the base and the memory decoder alone as lines."""

from __future__ import annotations

from pathlib import Path

from edge_memdec.errors import UserError
from edge_memdec.files import write_atomic


def plot_lambda_sweep(report: dict, out: str | Path, title: str | None = None) -> Path:
    """Write a PNG of `report["mixed"]` (from `perplexity`) to `out`, atomically; returns the path."""
    if not report.get("mixed"):
        raise UserError("--plot needs a memory decoder: there is no lambda sweep to draw without one")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    lams = [row["lambda"] for row in report["mixed"]]
    ppls = [row["ppl"] for row in report["mixed"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(lams, ppls, "o-", color="tab:blue", label="base + memory decoder")
    ax.axhline(report["base"]["ppl"], color="tab:gray", linestyle="--", label="base alone")
    ax.axhline(report["memdec"]["ppl"], color="tab:orange", linestyle=":", label="memory decoder alone")
    if report.get("knn_lm"):
        ax.axhline(report["knn_lm"]["ppl"], color="tab:green", linestyle="-.", label="kNN-LM")
    best = min(report["mixed"], key=lambda row: row["ppl"])
    ax.annotate(
        f"best {best['ppl']:.2f} at {best['lambda']:g}",
        (best["lambda"], best["ppl"]),
        textcoords="offset points",
        xytext=(0, 10),
        ha="center",
    )
    ax.set_xlabel("lambda (memory decoder weight)")
    ax.set_ylabel(f"perplexity ({report['protocol']} protocol, n_ctx {report['n_ctx']})")
    ax.set_title(title or f"{report['tokens_scored']} tokens scored")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return write_atomic(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
