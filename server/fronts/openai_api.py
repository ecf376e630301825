"""OpenAI completions and chat request bodies to engine `Request`s, and errors to statuses.

No I/O: the aiohttp front (`http_front.py`) reads bodies and sends what this
module and `openai_reply.py` build. Error bodies are vLLM's `ErrorResponse`
(`vllm/entrypoints/openai/protocol.py`).

Decisions where the emulator differs from a real server:
- `max_tokens` defaults to 16 for completions (OpenAI and vLLM) and, for chat,
  to the rest of the context window capped at `DEFAULT_CHAT_MAX_TOKENS`:
  synthetic outputs end uniformly between `min_tokens` and `max_tokens`, so
  vLLM's uncapped default would average half the context window.
- `stop` strings are validated and accepted, but synthetic text never matches
  them; `stop_token_ids`, `min_tokens`, `ignore_eos` and `seed` act as in vLLM.
  Sampling knobs (`temperature`, `top_p`, `top_k`, penalties, ...) are accepted
  and have no effect.
- Chat messages are joined as `role: content` lines plus `assistant:` and
  counted like any prompt text (no chat template).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any

from memorywall.errors import InvalidRequestError, MemorywallError, NotFoundError
from memorywall.server.engine.api import ModelCard, Request
from memorywall.server.fronts.status import http_status
from memorywall.server.fronts.tokenizer import PromptTokenizer

DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 1024

# The `type` of an error body: the OpenAI client's exception class for the status.
ERROR_TYPE = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "BadRequestError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class FieldError(InvalidRequestError):
    """A bad field in a request body; `param` names it, as OpenAI error bodies do."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class UnknownModelError(NotFoundError):
    param = "model"


class Endpoint(Enum):
    COMPLETIONS = "text_completion"
    CHAT = "chat.completion"


@dataclass(frozen=True, kw_only=True)
class Call:
    """One parsed request: what to submit and how to answer."""

    request: Request
    endpoint: Endpoint
    stream: bool
    include_usage: bool
    continuous_usage: bool
    min_interval_s: float


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse: `code` is the HTTP status."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPE.get(status, "APIError"),
            "param": param,
            "code": status,
        }
    }


def error_for(error: MemorywallError) -> tuple[int, dict[str, Any]]:
    status = http_status(error)
    return status, error_body(status, str(error), getattr(error, "param", None))


# Fields no emulated output can honour: a clear 400 instead of a silent difference.
def _reject_unsupported(body: dict[str, Any]) -> None:
    n = _int(body, "n", 1, minimum=1)
    if n > 1:
        raise FieldError("n", f"only n=1 is supported, got {n}")
    best_of = _int(body, "best_of", 1, minimum=1)
    if best_of > 1:
        raise FieldError("best_of", f"only best_of=1 is supported, got {best_of}")
    # Clients send `logprobs: false` and `top_logprobs: 0` by default: those ask for nothing.
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    asked = {
        "logprobs": logprobs is not None and logprobs is not False,
        "top_logprobs": top is not None and top != 0,
        "prompt_logprobs": body.get("prompt_logprobs") is not None,
    }
    for name, asks in asked.items():
        if asks:
            raise FieldError(name, "log probabilities are not supported by the emulator")
    if body.get("echo"):
        raise FieldError("echo", "echoing the prompt is not supported")
    if body.get("suffix") is not None:
        raise FieldError("suffix", "suffix is not supported")
    for name in ("tools", "functions", "function_call"):
        if body.get(name):
            raise FieldError(name, "tool calling is not supported by the emulator")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise FieldError("tool_choice", "tool calling is not supported by the emulator")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise FieldError("response_format", "only {'type': 'text'} is supported")


class OpenAIApi:
    """Converts bodies for one served model; holds no per-request state."""

    def __init__(self, card: ModelCard, tokenizer: PromptTokenizer) -> None:
        self.card = card
        self.tokenizer = tokenizer

    def to_call(self, body: Any, endpoint: Endpoint, request_id: str | None = None) -> Call:
        if not isinstance(body, dict):
            raise InvalidRequestError("request body: must be a JSON object")
        # It comes back in a header and in every chunk's id: printable ASCII only.
        if request_id is not None and not (request_id.isascii() and request_id.isprintable()):
            raise InvalidRequestError(f"X-Request-Id: must be printable ASCII, got {request_id!a}")
        model = body.get("model")
        if model is not None and model != self.card.model:
            raise UnknownModelError(
                f"The model `{model}` does not exist; this server serves `{self.card.model}`."
            )
        _reject_unsupported(body)
        if endpoint is Endpoint.CHAT:
            prompt = self._encode("messages", chat_text(body.get("messages")))
            limit = min(self.card.context_window, self.card.kv_capacity_tokens) - len(prompt)
            default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, limit))
            max_tokens = _int(body, "max_completion_tokens", None, minimum=1)
            if max_tokens is None:
                max_tokens = _int(body, "max_tokens", default, minimum=1)
        else:
            prompt = self._prompt(body.get("prompt"))
            max_tokens = _int(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, minimum=1)
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise FieldError("stream_options", "only allowed when stream is true")
        if options is not None and not isinstance(options, dict):
            raise FieldError("stream_options", "must be an object")
        options = options or {}
        min_interval_s = _number(options, "min_interval_s", "stream_options.min_interval_s")
        if min_interval_s is not None and min_interval_s < 0:
            raise FieldError("stream_options.min_interval_s", "must be >= 0")
        _stop_strings(body.get("stop"))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _number(body, name)
        for name in ("presence_penalty", "frequency_penalty"):
            _number(body, name)
        _int(body, "top_k", None, minimum=-1)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FieldError("seed", f"must be an integer, got {seed!r}")
        request = Request(
            request_id=request_id or uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=_int(body, "min_tokens", 0, minimum=0),
            ignore_eos=_flag(body, "ignore_eos"),
            stop_token_ids=frozenset(self._token_ids("stop_token_ids", body.get("stop_token_ids"))),
            sampling_seed=seed,
        )
        return Call(
            request=request,
            endpoint=endpoint,
            stream=stream,
            include_usage=_flag(options, "include_usage", "stream_options.include_usage"),
            continuous_usage=_flag(
                options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
            ),
            min_interval_s=min_interval_s or 0.0,
        )

    def _prompt(self, prompt: Any) -> tuple[int, ...]:
        """A string, a list of token ids, or a list holding one of those."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self._encode("prompt", prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            raise FieldError(
                "prompt", f"{len(prompt)} prompts in one request; send one prompt per request"
            )
        if isinstance(prompt, list) and prompt:
            return self._token_ids("prompt", prompt)
        if isinstance(prompt, list):
            raise FieldError("prompt", "empty")
        raise FieldError("prompt", "required: a string, a list of token ids, or a list of one")

    def _encode(self, param: str, text: str) -> tuple[int, ...]:
        if not text:
            raise FieldError(param, "empty")
        ids = self.tokenizer.encode(text)
        if not ids:
            raise FieldError(param, "no tokens in the prompt text")
        return ids

    def _token_ids(self, param: str, ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, list):
            raise FieldError(param, "must be a list of token ids")
        vocab = self.card.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                raise FieldError(param, f"token id {t!r} is outside the vocabulary of {vocab}")
        return tuple(ids)


def chat_text(messages: Any) -> str:
    """The prompt text of a conversation: `role: content` lines, then `assistant:`."""
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "required: a non-empty list of messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise FieldError(f"messages[{i}]", "must be an object with a string role")
        content = m.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "".join(_text_part(i, part) for part in content)
        else:
            raise FieldError(f"messages[{i}].content", "must be a string or a list of parts")
        lines.append(f"{m['role']}: {text}\n")
    lines.append("assistant:")
    return "".join(lines)


def _text_part(i: int, part: Any) -> str:
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    raise FieldError(f"messages[{i}].content", f"part type {kind!r} is not supported; only text")


def _int(body: dict[str, Any], name: str, default: Any, *, minimum: int) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(name, f"must be an integer, got {v!r}")
    if v < minimum:
        raise FieldError(name, f"must be >= {minimum}, got {v}")
    return v


def _number(body: dict[str, Any], name: str, param: str | None = None) -> float | None:
    v = body.get(name)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
        raise FieldError(param or name, f"must be a number, got {v!r}")
    if v is not None and not math.isfinite(v):  # JSON bodies may carry NaN and Infinity
        raise FieldError(param or name, f"must be finite, got {v!r}")
    return v


def _flag(body: dict[str, Any], name: str, param: str | None = None) -> bool:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise FieldError(param or name, f"must be true or false, got {v!r}")
    return bool(v)


def _stop_strings(stop: Any) -> None:
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise FieldError("stop", "must be a string or a list of strings")
