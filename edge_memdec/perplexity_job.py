"""One `edge-memdec perplexity` run as typed settings: checked before any scoring, then scored, then saved.

The CLI only parses options into a `PerplexityJob`; the checks (output paths, the kNN-LM datastore, the
protocol's defaults), the pair, the scoring pass and the optional kNN-LM row live here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_memdec import defaults
from edge_memdec.errors import UserError
from edge_memdec.files import check_output_path, read_text_file, write_json_atomic
from edge_memdec.knn_baseline import KnnBaseline
from edge_memdec.scoring import Accumulator


@dataclass
class PerplexityJob:
    """Score `text_file` with base (+ LoRA), memory decoders and the mixture at each of `lambdas`.

    `memdec`: one GGUF or several; `lam`: as `MemoryDecoderLM`'s (one per decoder); `lambdas` sweep the lambda
    of the decoder named `sweep` (default the first) with the others fixed (None: 0, 0.1, ..., 1, as far as
    the lambdas may go).

    n_ctx, n_ubatch and flash_attn (on/off/auto) None take the protocol's defaults
    (defaults.PERPLEXITY_SETTINGS); model_options are further `MemoryDecoderLM` keywords (threads, GPU layers,
    LoRA, shared trunk, llama.cpp's log)."""

    text_file: Path
    base: Path
    memdec: Path | Sequence[Path] | None
    lam: float | Sequence[float] | None = None
    lambdas: Sequence[float] | None = None
    protocol: str = "paper"
    n_ctx: int | None = None
    n_ubatch: int | None = None
    flash_attn: str | None = None
    stride: int | None = None
    max_windows: int | None = None
    state: Path | None = None
    json_out: Path | None = None
    plot_out: Path | None = None
    knn: KnnBaseline | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    sweep: str | None = None

    def __post_init__(self) -> None:
        settings = defaults.PERPLEXITY_SETTINGS.get(self.protocol, defaults.PERPLEXITY_SETTINGS["paper"])
        self.n_ctx = settings["n_ctx"] if self.n_ctx is None else self.n_ctx
        self.n_ubatch = settings["n_ubatch"] if self.n_ubatch is None else self.n_ubatch
        self.flash_attn = settings["flash_attn"] if self.flash_attn is None else self.flash_attn

    def check(self) -> str:
        """Everything that can be refused before the scoring pass; returns the text to score."""
        text = read_text_file(self.text_file)
        for out in (self.json_out, self.plot_out):
            if out is not None:
                check_output_path(out)
        if self.plot_out is not None and self.memdec is None:
            raise UserError("--plot draws the lambda sweep, which needs a memory decoder; drop --no-memdec or --plot")
        if self.knn is not None:
            if self.protocol != "paper":
                raise UserError("--knn scores the paper protocol's windows; drop --protocol llama")
            self.knn.check()  # a wrong or unfinished datastore fails now, not after the scoring pass
        if self.n_ctx < 2:
            raise UserError(f"-c must be at least 2, got {self.n_ctx}")
        return text

    def run(self, on_window: Callable[[int, Accumulator], None] | None = None) -> dict:
        """Check, open the pair, score (progress bar; `on_window` after each window), add the kNN-LM row."""
        from edge_memdec.api import MemoryDecoderLM
        from edge_memdec.perplexity import perplexity

        text = self.check()
        with MemoryDecoderLM(
            self.base,
            self.memdec,
            self.lam,
            skip_blas_probe=True,  # the CLI imports no scipy.linalg meanwhile (see edge_memdec.kernels.warmup)
            n_ctx=self.n_ctx,
            n_batch=self.n_ctx,
            n_ubatch=self.n_ubatch,
            flash_attn=defaults.flash_attn_setting(self.flash_attn),
            **self.model_options,
        ) as lm:
            report = perplexity(
                lm.pair, text, self.protocol, self.n_ctx, self.stride, self.lambdas, self.max_windows,
                progress=True, on_window=on_window, state_path=self.state, sweep=self.sweep,
            )  # fmt: skip
        if self.knn is not None:
            lambdas = self.lambdas or defaults.PERPLEXITY_LAMBDAS
            report["knn_lm"] = self.knn.report(self.base, text, self.n_ctx, report["stride"], lambdas)
        return report

    def save(self, report: dict) -> None:
        """--json and --plot, each written atomically."""
        if self.json_out is not None:
            write_json_atomic(self.json_out, report, indent=2)
        if self.plot_out is not None:
            from edge_memdec.plot import plot_lambda_sweep

            plot_lambda_sweep(report, self.plot_out)
