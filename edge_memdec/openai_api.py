"""OpenAI's wire format: request bodies in, prompt tokens and sampling settings out; answers back as its objects.

Every request field is either honoured, ignored because it changes no token (it only tunes a hosted service:
user, store, metadata, ...), accepted only at the value that turns it off (n=1, no tools), or
refused with a 400 that names it; unknown fields are refused too. llama-server's own sampling fields
(top_k, min_p, repeat_penalty, repeat_last_n, ignore_eos) and our `lambda` (a number, or with several memory
decoders {"decoder name": lambda}), `lambda_gate` ("SLOPE,OFFSET[,BASE_SLOPE]" or "off") and `base_special_tokens` are honoured. Omitted sampling
fields take llama.cpp's defaults (`SamplingParams`), not OpenAI's.

`logprobs` (chat: true plus `top_logprobs` 0..20; completions: the number of alternatives 0..20) reports the
mixture the tokens are drawn from (temperature 1, before penalties and filters, as llama-server by default),
and each token entry carries a `memdec` extension: the chosen token's probability under the base, the memory
decoder and the mixture, its ranks, whether the decoder changed the top token, and each model's alternatives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_memdec.api import MemoryDecoderLM
from edge_memdec.decode import Generation
from edge_memdec.defaults import LAMBDA_MAX, LAMBDA_MIN
from edge_memdec.errors import UserError
from edge_memdec.lambda_gate import request_gate
from edge_memdec.trace import MAX_ALTERNATIVES, Alternative, TokenTrace

CHAT, TEXT = "chat", "text"  # /v1/chat/completions and /v1/completions
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
CHAT_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


class ApiError(Exception):
    """A request the server refuses: HTTP status plus the fields of OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """A checked request: what to feed the decode loop and how to answer."""

    kind: str  # CHAT or TEXT
    prompt_tokens: list[int]
    sampling: dict[str, Any]  # keywords of SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carrying `usage`
    explain: int | None = None  # logprobs asked for: alternatives per token (None: no logprobs)


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, name: str, low: float | None = None, high: float | None = None) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"'{name}' must be a number, got {value!r}")
    if low is not None and value < low:
        raise _bad(name, f"'{name}' must be at least {low}, got {value}")
    if high is not None and value > high:
        raise _bad(name, f"'{name}' must be at most {high}, got {value}")
    return float(value)


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"'{name}' must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        span = f"at least {low}" if high is None else f"from {low} to {high}"
        raise _bad(name, f"'{name}' must be {span}, got {value}")
    return value


def _stop_strings(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad(
            "stop", f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters"
        )
    return [s for s in stops if s]


HONOURED = {
    CHAT: {"messages", "max_completion_tokens", "logprobs", "top_logprobs"},
    TEXT: {"prompt", "logprobs"},
    "both": {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop",
             "presence_penalty", "frequency_penalty", "logit_bias", "response_format",
             "lambda", "lambda_gate", "top_k", "min_p", "repeat_penalty", "repeat_last_n", "ignore_eos",
             "base_special_tokens"},
}  # fmt: skip
IGNORED = frozenset(
    {"user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier", "cache_prompt"}
)
_NO_TOOLS = "tools and functions are not supported"
# OpenAI fields we cannot honour: the values that leave them off, and why any other value is refused
OFF_ONLY: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only one choice per request is supported (n=1)"),
    "best_of": ((1,), "only one choice per request is supported (best_of=1)"),
    "echo": ((False,), "echo is not supported"),
    "suffix": (("",), "'suffix' (text after the insertion) is not supported"),
    "tools": (([],), _NO_TOOLS),
    "functions": (([],), _NO_TOOLS),
    "tool_choice": (("none",), _NO_TOOLS),
    "function_call": (("none",), _NO_TOOLS),
    "parallel_tool_calls": ((True, False), _NO_TOOLS),
    "modalities": ((["text"],), "only text output is supported (modalities ['text'])"),
    "audio": ((), "audio output is not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "'reasoning_effort' is not supported: the models here do not reason first"),
    "verbosity": ((), "'verbosity' is not supported"),
    "web_search_options": ((), "web search is not supported"),
}
MAX_LOGIT_BIAS = 1024  # entries in one request's logit_bias
LOGIT_BIAS_RANGE = 100.0  # OpenAI's: -100 all but bans a token, 100 all but forces it
PENALTY_RANGE = 2.0  # OpenAI's range of presence_penalty and frequency_penalty


def refuse_unknown(body: dict, honoured: set[str], tolerated: frozenset[str] = frozenset()) -> None:
    """400 naming the first field of `body` that is neither `honoured` nor `tolerated` (checked elsewhere)."""
    for name in body:
        if name not in honoured and name not in tolerated:
            raise _bad(name, f"unknown field '{name}'; this endpoint takes {', '.join(sorted(honoured))}")


def _refuse_unsupported(kind: str, body: dict) -> None:
    """400 naming the first field that is unknown, or an OpenAI field we cannot honour at the given value."""
    honoured = HONOURED[kind] | HONOURED["both"]
    refuse_unknown(body, honoured, IGNORED | frozenset(OFF_ONLY))
    for name, value in body.items():
        if name not in OFF_ONLY or value is None:
            continue
        off_values, problem = OFF_ONLY[name]
        if not any(value == off and type(value) is type(off) for off in off_values):
            raise _bad(name, problem)
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise _bad(
            "response_format",
            "only response_format {\"type\": \"text\"} is supported (JSON output is not constrained here)",
        )


def _logit_bias(body: dict, n_vocab: int) -> dict[int, float] | None:
    """OpenAI's logit_bias, {"token id": bias in [-100, 100]}, as {int id: float}."""
    value = body.get("logit_bias")
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids: biases")
    bias = {}
    for key, number in value.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= n_vocab:
            raise _bad("logit_bias", f"'logit_bias' keys must be token ids from 0 to {n_vocab - 1}, got {key!r}")
        if isinstance(number, bool) or not isinstance(number, int | float) or abs(number) > LOGIT_BIAS_RANGE:
            raise _bad("logit_bias", f"'logit_bias' values must be numbers from -100 to 100, got {number!r}")
        bias[int(key)] = float(number)
    return bias


def sampling_settings(body: dict, lm: MemoryDecoderLM, max_tokens_cap: int) -> dict[str, Any]:
    """SamplingParams keywords from the request; max_tokens defaults to, and is capped at, `max_tokens_cap`."""
    requested = _integer(body, "max_completion_tokens", 1)
    if requested is None:
        requested = _integer(body, "max_tokens", 1)
    settings: dict[str, Any] = {"max_tokens": min(requested or max_tokens_cap, max_tokens_cap)}
    for name in ("temperature", "top_p", "min_p"):
        value = _number(body, name, 0.0, None if name == "temperature" else 1.0)
        if value is not None:
            settings[name] = value
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(body, name, -PENALTY_RANGE, PENALTY_RANGE)
        if value is not None:
            settings[name] = value
    repeat_penalty = _number(body, "repeat_penalty", 0.0)
    if repeat_penalty is not None:
        if repeat_penalty == 0.0:
            raise _bad("repeat_penalty", "'repeat_penalty' must be above 0 (1 = off)")
        settings["repeat_penalty"] = repeat_penalty
    for name, low in (("top_k", 0), ("seed", 0), ("repeat_last_n", -1)):
        value = _integer(body, name, low)
        if value is not None:
            settings[name] = value
    for name in ("ignore_eos", "base_special_tokens"):
        flag = body.get(name)
        if flag is not None:
            if not isinstance(flag, bool):
                raise _bad(name, f"'{name}' must be true or false")
            settings[name] = flag
    bias = _logit_bias(body, lm.pair.base.n_vocab)
    if bias:
        settings["logit_bias"] = bias
    settings["stop"] = _stop_strings(body.get("stop"))
    lam = _lambdas(body, lm)
    if lam is not None:
        settings["lam"] = lam
    gate = body.get("lambda_gate")
    if gate is not None:
        try:
            request_gate(gate, len(lm.pair.memdecs))
        except UserError as err:
            raise _bad("lambda_gate", f"'lambda_gate': {err}") from None
        settings["lambda_gate"] = gate
    return settings


def _lambdas(body: dict, lm: MemoryDecoderLM) -> tuple[float, ...] | None:
    """`lambda`: a number (one memory decoder; with several, 0 turns them all off) or {"decoder name": lambda}
    (the decoders not named keep the server's), as one lambda per decoder, checked (their sum at most 1)."""
    value = body.get("lambda")
    if value is None:
        return None
    pair = lm.pair
    if pair.memdec is None:
        raise _bad("lambda", "this server runs the base model without a memory decoder, so 'lambda' has no effect")
    if isinstance(value, dict):
        for name, lam in value.items():
            if isinstance(lam, bool) or not isinstance(lam, int | float) or not LAMBDA_MIN <= lam <= LAMBDA_MAX:
                raise _bad("lambda", f"'lambda' of {name!r} must be a number from 0 to 1, got {lam!r}")
    else:
        value = _number(body, "lambda", LAMBDA_MIN, LAMBDA_MAX)
    try:
        return pair.weights(value)
    except UserError as err:
        raise _bad("lambda", f"'lambda': {err}") from None


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"
        ]
        if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise _bad("messages", f"message {i} needs text content (a string or a list of text parts)")


def chat_messages(body: dict) -> list[dict[str, str]]:
    """The conversation as [{"role", "content"}] with text content; 'developer' is read as 'system'."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise _bad("messages", f"message {i} needs a role out of {', '.join(CHAT_ROLES)}")
        out.append({"role": CHAT_ROLES[message["role"]], "content": _message_text(i, message.get("content"))})
    return out


def prompt_tokens(body: dict, lm: MemoryDecoderLM) -> list[int]:
    """/v1/completions' prompt: a string, or token ids; a list holding one of them is accepted too."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("prompt", "the prompt is empty; give some text to continue")
        return lm.tokenize(prompt)
    n_vocab = lm.pair.base.n_vocab
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in prompt):
            return list(prompt)
        raise _bad("prompt", f"token ids in 'prompt' must be integers in [0, {n_vocab})")
    raise _bad("prompt", "'prompt' must be a non-empty string or token list (one prompt per request)")


def logprobs_asked(kind: str, body: dict) -> int | None:
    """Alternatives per token the request wants logprobs with (None: no logprobs)."""
    if kind == TEXT:
        return _integer(body, "logprobs", 0, MAX_ALTERNATIVES)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad("logprobs", "'logprobs' must be true or false")
    top = _integer(body, "top_logprobs", 0, MAX_ALTERNATIVES)
    if top is not None and not wanted:
        raise _bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    return (top or 0) if wanted else None


def parse_request(kind: str, body: dict, lm: MemoryDecoderLM, max_tokens_cap: int) -> CompletionRequest:
    """Check a chat or text completion body; UserErrors from the runtime (e.g. a too-long prompt) pass through."""
    _refuse_unsupported(kind, body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "'stream' must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("stream_options", "'stream_options' must be an object")
    sampling = sampling_settings(body, lm, max_tokens_cap)
    tokens = lm.chat_format.tokens(chat_messages(body)) if kind == CHAT else prompt_tokens(body, lm)
    explain = logprobs_asked(kind, body)
    return CompletionRequest(kind, tokens, sampling, stream, bool(options.get("include_usage")), explain)


class Answer:
    """Builds the response objects of one request (same id and timestamp in every chunk)."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.model = model
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self._text_offset = 0  # characters of completion text already covered by logprobs (completions)

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    @staticmethod
    def usage(generation: Generation) -> dict[str, int]:
        n_prompt, n_completion = len(generation.prompt_tokens), len(generation.tokens)
        return {
            "prompt_tokens": n_prompt,
            "completion_tokens": n_completion,
            "total_tokens": n_prompt + n_completion,
        }

    def _choice(self, text: str | None, finish: str | None, first: bool, logprobs: Any) -> dict[str, Any]:
        if self.kind == TEXT:
            return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def complete(self, generation: Generation) -> dict[str, Any]:
        """The whole answer: a `chat.completion` or `text_completion` object."""
        finish = FINISH_REASONS[generation.finish_reason or "cancelled"]
        logprobs = self.logprobs(generation, generation.traces)
        if self.kind == CHAT:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }
            head = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": generation.text, "logprobs": logprobs, "finish_reason": finish}
            head = self._head("text_completion")
        return head | {"choices": [choice], "usage": self.usage(generation)}

    def chunk(
        self, text: str | None, finish: str | None = None, first: bool = False, generation: Generation | None = None
    ) -> dict[str, Any]:
        """One streamed piece (`chat.completion.chunk` or `text_completion`); the last one has a finish_reason.
        With logprobs asked for (`generation.explain`), a piece carries its tokens' entries."""
        name = "chat.completion.chunk" if self.kind == CHAT else "text_completion"
        logprobs = None
        if generation is not None and text:
            logprobs = self.logprobs(generation, getattr(text, "tokens", ()))
        return self._head(name) | {"choices": [self._choice(text, finish, first, logprobs)]}

    def logprobs(self, generation: Generation, traces: Sequence[TokenTrace]) -> dict[str, Any] | None:
        """OpenAI's logprobs object for these tokens (None when the request asked for none)."""
        if generation.explain is None:
            return None
        if self.kind == CHAT:
            return {"content": [_chat_entry(t) for t in traces], "refusal": None}
        offsets, at = [], self._text_offset
        for t in traces:
            offsets.append(at)
            at += len(t.text)
        self._text_offset = at
        return {
            "tokens": [t.text for t in traces],
            "token_logprobs": [_finite(t.logprob_mix) for t in traces],
            "top_logprobs": [{a.text: _finite(a.logprob) for a in t.top_mix[: t.n_top]} for t in traces],
            "text_offset": offsets,
            "memdec": [_memdec_entry(t) for t in traces],
        }

    def final_chunk(self, generation: Generation) -> dict[str, Any]:
        return self.chunk(None, FINISH_REASONS[generation.finish_reason or "cancelled"])

    def usage_chunk(self, generation: Generation) -> dict[str, Any]:
        """stream_options.include_usage: a last chunk with no choices and the token counts."""
        name = "chat.completion.chunk" if self.kind == CHAT else "text_completion"
        return self._head(name) | {"choices": [], "usage": self.usage(generation)}


LOGPROB_FLOOR = -9999.0  # OpenAI's stand-in for a log-prob of -inf (JSON has no infinity)


def _finite(logprob: float) -> float:
    return max(logprob, LOGPROB_FLOOR)


def _alternative(a: Alternative) -> dict[str, Any]:
    return {"token": a.text, "logprob": _finite(a.logprob), "bytes": list(a.piece)}


def _memdec_entry(t: TokenTrace) -> dict[str, Any]:
    """Our extension: the chosen token under each model, and each model's alternatives."""
    return {
        "p_base": t.p_base,
        "p_mem": t.p_mem,
        "p_mix": t.p_mix,
        "rank_base": t.rank_base,
        "rank_mem": t.rank_mem,
        "rank_mix": t.rank_mix,
        "changed": t.changed,
        "lambda": t.lam,
        "top_base": [_alternative(a) for a in t.top_base[: t.n_top]],
        "top_mem": None if t.top_mem is None else [_alternative(a) for a in t.top_mem[: t.n_top]],
    }


def _chat_entry(t: TokenTrace) -> dict[str, Any]:
    return {
        "token": t.text,
        "logprob": _finite(t.logprob_mix),
        "bytes": list(t.piece),
        "top_logprobs": [_alternative(a) for a in t.top_mix[: t.n_top]],
        "memdec": _memdec_entry(t),
    }
