"""`edge-memdec compare`: the ways of adapting a base to a domain, measured on one text with one protocol.

Rows (each one whose files are given): the base; base + LoRA; the DAPT model (every weight fine-tuned); kNN-LM
(the base with a datastore, run in PyTorch); base + memory decoder; base + LoRA + memory decoder. Per row: PPL
+/- stderr on the domain text under the paper protocol (the same windows for every row), the PPL on a general
text (what adapting forgot), greedy decode speed, the training cost its files record (`memdec.train.*`:
positions, seconds, peak memory) and the size of the files it needs besides the base (DAPT: its whole model).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from edge_memdec.corpus import general_text
from edge_memdec.decode import Generation, SamplingParams
from edge_memdec.defaults import COMPARE_DECODE_TOKENS, PERPLEXITY_SETTINGS, check_lambda
from edge_memdec.describe import size_text
from edge_memdec.errors import UserError
from edge_memdec.files import check_output_path, read_text_file, write_json_atomic
from edge_memdec.gguf_file import read_any_gguf
from edge_memdec.knn_baseline import KnnBaseline
from edge_memdec.llama_model import ModelOptions
from edge_memdec.lora_file import lora_spec
from edge_memdec.pair import ModelPair
from edge_memdec.perplexity import perplexity

PROMPT_TOKENS = 64  # decode speed: greedy tokens after the text's first 64 (at most half the context)


@dataclass(frozen=True)
class Row:
    """One way of running the domain: a base (with adapters) and maybe a memory decoder, or kNN-LM."""

    name: str
    base: Path  # the model llama.cpp runs (the DAPT row's own)
    lora: tuple[Path | tuple[Path, float] | str, ...] = ()
    memdec: Path | None = None
    knn: KnnBaseline | None = None  # kNN-LM from a datastore instead of a llama.cpp pair
    files: tuple[Path, ...] = ()  # what the row adds to the base: its size and recorded training cost


@dataclass(frozen=True)
class CompareSettings:
    """The protocol every row is measured with."""

    n_ctx: int = PERPLEXITY_SETTINGS["paper"]["n_ctx"]  # window, tokens
    stride: int | None = None  # None: n_ctx // 2
    lam: float | None = None  # memory decoder weight (None: the decoder's memdec.lambda)
    decode_tokens: int = COMPARE_DECODE_TOKENS  # greedy tokens timed per row (0: no timing)
    options: ModelOptions = field(default_factory=ModelOptions)


def rows_of(
    base: Path, lora: tuple[str, ...], dapt: Path | None, knn: KnnBaseline | None, memdec: Path | None
) -> list[Row]:
    """The rows the given files make, in the report's order; `lora` holds `--lora` FILE[:SCALE] specs."""
    adapters = tuple(lora_spec(spec)[0] for spec in lora)
    rows = [Row("base", base)]
    if lora:
        rows.append(Row("base + LoRA", base, lora=lora, files=adapters))
    if dapt is not None:
        rows.append(Row("DAPT (full fine-tune)", dapt, files=(dapt,)))
    if knn is not None:
        rows.append(Row("kNN-LM", base, knn=knn))
    if memdec is not None:
        rows.append(Row("base + memory decoder", base, memdec=memdec, files=(memdec,)))
        if lora:
            rows.append(Row("base + LoRA + memory decoder", base, lora=lora, memdec=memdec, files=(*adapters, memdec)))
    return rows


def compare(
    rows: list[Row], text: str, general: str | None, settings: CompareSettings, progress: bool = False
) -> dict:
    """The comparison report: {"protocol", "n_ctx", "stride", "tokens_scored", "general_tokens_scored", "rows":
    [{"name", "ppl", "stderr", "general_ppl", "general_stderr", "decode_ms_per_token", "training", "bytes"}]}."""
    measured = []
    for row in rows:
        if row.knn is not None:
            result = _knn_row(row, text, general, settings)
        else:
            result = _pair_row(row, text, general, settings, progress)
        measured.append({"name": row.name, **result, **_cost(row)})
    first = measured[0]
    return {
        "protocol": "paper",
        "n_ctx": settings.n_ctx,
        "stride": first.pop("stride"),
        "tokens_scored": first["tokens_scored"],
        "general_tokens_scored": first["general_tokens_scored"],
        "rows": [{k: v for k, v in r.items() if k != "stride"} for r in measured],
    }


@dataclass
class CompareJob:
    """One `edge-memdec compare` run: everything that can be refused is checked before the first row is
    measured; then the rows are measured on `text_file` (and `general_file`), and the report saved."""

    text_file: Path
    general_file: Path | None
    rows: list[Row]
    settings: CompareSettings
    json_out: Path | None = None
    plot_out: Path | None = None

    def check(self) -> tuple[str, str | None]:
        """The domain text and the general text (or None), or a UserError for anything refused."""
        text = read_text_file(self.text_file)
        general = general_text(self.general_file) if self.general_file is not None else None
        for out in (self.json_out, self.plot_out):
            if out is not None:
                check_output_path(out)
        if self.settings.lam is not None:
            check_lambda(self.settings.lam)
        for row in self.rows:
            if row.knn is not None:
                row.knn.check()
        if self.settings.n_ctx < 2:
            raise UserError(f"-c must be at least 2, got {self.settings.n_ctx}")
        return text, general

    def run(self, progress: bool = True) -> dict:
        """Check, then measure every row (`compare`'s report)."""
        text, general = self.check()
        return compare(self.rows, text, general, self.settings, progress)

    def save(self, report: dict) -> None:
        """--json and --plot, each written atomically."""
        if self.json_out is not None:
            write_json_atomic(self.json_out, report, indent=2)
        if self.plot_out is not None:
            from edge_memdec.plot import plot_compare

            plot_compare(report, self.plot_out)


def _pair_row(row: Row, text: str, general: str | None, settings: CompareSettings, progress: bool) -> dict:
    options = replace(settings.options, lora=row.lora)
    pair = ModelPair(row.base, row.memdec, settings.lam, options, skip_blas_probe=True)
    try:
        lambdas = [pair.lam] if row.memdec else []
        scores = []
        for which in (text, general):
            if which is not None:
                r = perplexity(pair, which, "paper", settings.n_ctx, settings.stride, lambdas, progress=progress)
                scores.append((r["selected"] if row.memdec else r["base"], r))
        (domain, report), *rest = scores
        out = {
            "ppl": domain["ppl"],
            "stderr": domain["stderr"],
            "lambda": pair.lam if row.memdec else None,
            "general_ppl": rest[0][0]["ppl"] if rest else None,
            "general_stderr": rest[0][0]["stderr"] if rest else None,
            "decode_ms_per_token": _decode_ms(pair, text, settings.decode_tokens),
            "stride": report["stride"],
            "tokens_scored": report["tokens_scored"],
            "general_tokens_scored": rest[0][1]["tokens_scored"] if rest else None,
        }
        return out
    finally:
        pair.close()


def _knn_row(row: Row, text: str, general: str | None, settings: CompareSettings) -> dict:
    knn = row.knn
    stride = settings.stride or settings.n_ctx // 2
    results = [knn.report(row.base, t, settings.n_ctx, stride, [knn.lam]) for t in (text, general) if t is not None]
    domain, *rest = results
    out = {
        "ppl": domain["ppl"],
        "stderr": domain["stderr"],
        "lambda": knn.lam,
        "general_ppl": rest[0]["ppl"] if rest else None,
        "general_stderr": rest[0]["stderr"] if rest else None,
        "decode_ms_per_token": None,  # kNN-LM runs in PyTorch + faiss here, not in the llama.cpp runtime
        "stride": stride,
        "tokens_scored": domain["tokens_scored"],
        "general_tokens_scored": rest[0]["tokens_scored"] if rest else None,
    }
    return out


def _decode_ms(pair: ModelPair, text: str, n_tokens: int) -> float | None:
    """Milliseconds per greedy token (end-of-text ignored) after the text's first PROMPT_TOKENS tokens."""
    if n_tokens <= 0:
        return None
    prompt = pair.base.tokenize(text, add_bos=None)[: min(PROMPT_TOKENS, pair.n_ctx // 2)]
    n_tokens = min(n_tokens, pair.n_ctx - len(prompt) - 1)
    run = Generation(pair, prompt, SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True))
    run.run()
    return 1000.0 * run.decode_seconds / max(len(run.tokens), 1)


def _cost(row: Row) -> dict:
    """The training its files record (`memdec.train.*`, summed over them; the peak is the largest) and their
    size; the base row's size is the base's, a kNN-LM's the datastore folder's."""
    if row.knn is not None:
        folder = Path(row.knn.datastore)
        return {"training": _datastore_cost(row.knn), "bytes": sum(f.stat().st_size for f in folder.iterdir())}
    if not row.files:
        return {"training": None, "bytes": Path(row.base).stat().st_size}
    facts = [read_any_gguf(f).memdec for f in row.files]
    training = None
    if all("train.tokens" in f for f in facts):
        seconds = [f.get("train.seconds") for f in facts]
        peaks = [f.get("train.peak_rss_mib") for f in facts]
        training = {
            "positions": sum(int(f["train.tokens"]) for f in facts),
            "seconds": sum(seconds) if None not in seconds else None,
            "peak_rss_mib": max(peaks) if None not in peaks else None,
        }
    return {"training": training, "bytes": sum(Path(f).stat().st_size for f in row.files)}


def _datastore_cost(knn: KnnBaseline) -> dict:
    """A kNN-LM's training cost: the datastore pass over its positions (the kNN search happens at run time)."""
    manifest = knn.check()
    return {"positions": int(manifest["n_positions"]), "seconds": manifest.get("seconds"), "peak_rss_mib": None}


def format_compare(report: dict) -> str:
    """The report as a terminal table."""
    general = report.get("general_tokens_scored") is not None
    head = f"{'':<30}{'PPL':>10}{'+/-':>9}" + (f"{'general':>10}" if general else "")
    head += f"{'ms/token':>10}{'positions':>11}{'train s':>9}{'peak MiB':>10}{'size':>10}"
    lines = [head]
    for r in report["rows"]:
        t = r["training"] or {}
        line = f"{r['name']:<30}{r['ppl']:>10.3f}{r['stderr']:>9.3f}"
        if general:
            line += _cell(r["general_ppl"], 10, ".3f")
        line += _cell(r["decode_ms_per_token"], 10, ".2f") + _cell(t.get("positions"), 11, "d")
        line += _cell(t.get("seconds"), 9, ".0f") + _cell(t.get("peak_rss_mib"), 10, ".0f")
        line += f"{size_text(r['bytes']):>10}"
        lines.append(line)
    for r in report["rows"]:
        if r["tokens_scored"] != report["tokens_scored"]:
            lines.append(f"note: {r['name']} scored {r['tokens_scored']} tokens (its tokenizer split the text otherwise)")
    lines.append(
        f"{report['tokens_scored']} tokens scored"
        + (f" (general text: {report['general_tokens_scored']})" if general else "")
        + f", paper protocol, n_ctx {report['n_ctx']}, stride {report['stride']}; size: the files a row adds "
        "to the base (DAPT: its whole model)"
    )
    return "\n".join(lines)


def _cell(value: object, width: int, fmt: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{format(value, fmt):>{width}}"
