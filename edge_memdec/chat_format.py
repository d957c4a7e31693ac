"""Chat messages -> prompt tokens, with the base GGUF's own chat template (`tokenizer.chat_template`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from edge_memdec.errors import UserError
from edge_memdec.llama_model import LlamaModel

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Sequence[dict[str, Any]]) -> None:
    if not messages:
        raise UserError("the conversation is empty; give at least one user message")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise UserError(f"message {i} needs a role out of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"message {i} needs text content")


class ChatFormat:
    """Renders a conversation with the model's template, ready for the assistant's next turn."""

    def __init__(self, model: LlamaModel) -> None:
        template = model.metadata("tokenizer.chat_template")
        if not isinstance(template, str) or not template:
            raise UserError(f"{model.path.name} has no chat template; use --raw for plain completion")
        self.model = model
        self._formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=model.token_text(model.eos),
            bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
        )
        self._bos_text = model.token_text(model.bos) if model.bos >= 0 else None

    def prompt_text(self, messages: Sequence[dict[str, Any]]) -> str:
        check_messages(messages)
        return self._formatter(messages=list(messages)).prompt

    def tokens(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Prompt token ids; BOS is added only when the model wants one and the template did not write it."""
        text = self.prompt_text(messages)
        starts_with_bos = self._bos_text is not None and text.startswith(self._bos_text)
        return self.model.tokenize(text, add_bos=None if not starts_with_bos else False, special=True)
