"""Every user-facing default and the lambda rule, defined once; the CLI, the server, the API and the llm plugin
read them from here (this module imports nothing heavy, so the CLI can use it at import time).

lambda is the memory decoder's weight in the mixture p = lambda * p_memdec + (1 - lambda) * p_base; with several
decoders each has its own, p = sum_i lambda_i * p_i + (1 - sum_i lambda_i) * p_base, and they sum to at most 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

from edge_memdec.errors import UserError

LAMBDA_MIN, LAMBDA_MAX = 0.0, 1.0  # lambda is a probability
DEFAULT_LAMBDA = 0.3  # a memory decoder GGUF without memdec.lambda, and kNN-LM's weight in `perplexity/compare --knn`

# kNN-LM and the kNN targets: neighbours per position, and T in softmax(-d / T) over squared L2 distances d
KNN_K = 1024
KNN_TEMPERATURE = 1.0
KNN_CHUNK = 32768  # queries searched (and saved, resumably) together: IVF lists are read once per chunk

# named lambda sweeps
PERPLEXITY_LAMBDAS = tuple(round(0.1 * i, 1) for i in range(11))  # `perplexity`'s table: 0, 0.1, ..., 1
VALIDATION_LAMBDAS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # training: validation, kNN sweep

# the paper's windows: tokens per window, and the step between windows (each scores or trains its last STRIDE
# tokens); `perplexity --protocol paper` and `compare` score with them, the training commands default to them
PAPER_N_CTX = 1024
PAPER_STRIDE = 512

N_CTX = 4096  # `chat`, `serve` (per request) and the llm plugin: context size in tokens, prompt and answer
COMPARE_DECODE_TOKENS = 32  # `compare`: greedy tokens timed per row

# `perplexity` per protocol: window (tokens), flash attention, and tokens per llama.cpp compute batch (None: the
# whole window in one); "llama" takes llama-perplexity's own defaults, so the same flags give the same number
PERPLEXITY_SETTINGS = {
    "paper": {"n_ctx": PAPER_N_CTX, "flash_attn": "off", "n_ubatch": None},  # off: exact attention (CPU fa is f16)
    "llama": {"n_ctx": 512, "flash_attn": "auto", "n_ubatch": 512},
}

# sampling (llama.cpp's names and defaults): SamplingParams, `chat` and the llm plugin
MAX_TOKENS = 256  # most tokens generated; the answer also ends on EOS/EOT, a stop string or a full context
TEMPERATURE = 0.8  # <= 0 means greedy
TOP_K = 40  # 0 = off
TOP_P = 0.95  # 1.0 = off
MIN_P = 0.05  # 0.0 = off
REPEAT_PENALTY = 1.0  # 1.0 = off; tokens among the last REPEAT_LAST_N: logit / p if positive, else * p
REPEAT_LAST_N = 64  # tokens (prompt included) the penalties look at; 0 = off, -1 = the whole context
PRESENCE_PENALTY = 0.0  # subtracted once from the logit of every token among them
FREQUENCY_PENALTY = 0.0  # subtracted per occurrence among them
BASE_SPECIAL_TOKENS = True  # lambda 0 on control/EOS tokens: same facts, 42% of answers end vs 28% (bench/chat_eval.py)

# `serve`
SERVER_HOST = "127.0.0.1"  # the loopback: other machines reach the server only when asked to
SERVER_PORT = 8080  # llama-server's
SERVER_MAX_TOKENS = 1024  # answer length when a request names none, and the most any request gets
SERVER_PARALLEL = 4  # requests decoded together in one batch, each with its own context (README, Serving)


FLASH_ATTN_CHOICES = {"on": True, "off": False, "auto": None}  # -fa: auto (None) is llama.cpp's choice


def flash_attn_setting(value: str) -> bool | None:
    """-fa on|off|auto as ModelOptions.flash_attn, or one sentence."""
    if value not in FLASH_ATTN_CHOICES:
        raise UserError(f"--flash-attn must be on, off or auto, got {value!r}")
    return FLASH_ATTN_CHOICES[value]


def flash_attn_name(setting: bool | None) -> str:
    """ModelOptions.flash_attn as the -fa word that gives it (on, off or auto), for reports."""
    return next(name for name, value in FLASH_ATTN_CHOICES.items() if value is setting)


def is_lambda(lam: object) -> bool:
    """Whether `lam` is a number in [LAMBDA_MIN, LAMBDA_MAX] (not a bool, not NaN)."""
    return isinstance(lam, Real) and not isinstance(lam, bool) and LAMBDA_MIN <= lam <= LAMBDA_MAX


def check_lambda(lam: object, error: type[Exception] = UserError) -> float:
    """`lam` as a float, or `error` (a UserError for users; the kernels raise ValueError) in one sentence."""
    if not is_lambda(lam):
        raise error(f"lambda must be between 0 and 1, got {lam}")
    return float(lam)


LAMBDA_SUM_SLACK = 1e-9  # lambdas summing to 1 in decimal (0.1 + 0.2 + 0.7) may exceed it by float rounding


def check_lambdas(lams: Sequence[object], names: Sequence[str], error: type[Exception] = UserError) -> tuple[float, ...]:
    """One lambda per memory decoder (`names`, in order) as floats, each in [0, 1] and summing to at most 1 (the
    base keeps 1 - sum), or `error` in one sentence."""
    if len(lams) != len(names):
        raise error(
            f"{len(lams)} lambda{'s' * (len(lams) != 1)} for {len(names)} memory decoder{'s' * (len(names) != 1)}"
            f" ({', '.join(names) or 'the base runs alone'}); give one per decoder, in the order the decoders were given"
        )
    values = tuple(check_lambda(lam, error) for lam in lams)
    total = sum(values)
    if total > LAMBDA_MAX + LAMBDA_SUM_SLACK:
        each = ", ".join(f"{name} {lam:g}" for name, lam in zip(names, values, strict=True))
        raise error(
            f"the memory decoders' lambdas sum to {total:g} ({each}), above 1; lower them so that the base keeps "
            "1 - their sum"
        )
    return values


def lambda_total(lams: Sequence[float]) -> float:
    """The memory decoders' weight together, sum_i lambda_i, within [0, 1] (float rounding clipped)."""
    return min(float(sum(lams)), LAMBDA_MAX)
