"""OpenAI completions and chat request bodies to engine `Request`s, and errors to statuses.

No I/O: the aiohttp front (`http_front.py`) reads bodies and sends what this
module and `openai_reply.py` build. Error bodies are vLLM's `ErrorResponse`
(`vllm/entrypoints/openai/protocol.py`).

Decisions where the emulator differs from a real server:
- `max_tokens` defaults to 16 for completions (OpenAI and vLLM) and, for chat,
  to the rest of the context window capped at `DEFAULT_CHAT_MAX_TOKENS`:
  synthetic outputs end uniformly between `min_tokens` and `max_tokens`, so
  vLLM's uncapped default would average half the context window.
- `stop` strings end the text where one first appears (the engine request is then
  aborted); `stop_token_ids`, `min_tokens`, `ignore_eos` and `seed` act as in vLLM.
- `n` samples are `n` engine requests `{i}_{id}` with seeds `seed + i` (or `i`).
- `logprobs` are synthetic (`logprobs.py`); tool calls are decided by seed and their
  arguments generated from the schema (`tool_calls.py`), the request then generating
  as many tokens as the arguments' text takes.
- Sampling knobs (`temperature`, `top_p`, `top_k`, penalties, ...) are accepted
  and have no effect.
- `model` may name a LoRA adapter (`--enable-lora`): the request runs with it
  (`server/engine/lora.py`) and the response names it.
- Chat messages are joined as `role: content` lines plus `assistant:` and
  counted like any prompt text (no chat template).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any

from memorywall.errors import InvalidRequestError, MemorywallError, NotFoundError
from memorywall.server.engine.api import (
    CHARS_PER_TOKEN,
    LoraAdapter,
    LoraRegistry,
    ModelCard,
    Request,
    digest,
    token_text,
)
from memorywall.server.fronts.logprobs import MAX_TOP_LOGPROBS
from memorywall.server.fronts.status import http_status
from memorywall.server.fronts.tokenizer import PromptTokenizer
from memorywall.server.fronts.tool_calls import (
    CHARS_PER_ARGUMENT_TOKEN,
    SchemaError,
    Tool,
    arguments_json,
    choose_tool,
)

DEFAULT_COMPLETION_MAX_TOKENS = 16
DEFAULT_CHAT_MAX_TOKENS = 1024
MAX_N = 128  # choices per request: each is an engine request
MAX_STOP_STRINGS = 16

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


@dataclass(frozen=True)
class ToolCall:
    """The call a choice makes instead of text: its arguments are a JSON object string."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Choice:
    """One of a call's `n` samples: its engine request, and its tool call if it makes one."""

    request: Request
    tool_call: ToolCall | None = None


@dataclass(frozen=True, kw_only=True)
class Call:
    """One parsed request: what to submit and how to answer."""

    choices: tuple[Choice, ...]
    endpoint: Endpoint
    stream: bool
    include_usage: bool
    continuous_usage: bool
    min_interval_s: float
    top_logprobs: int | None = None  # None: no logprobs; else the alternatives per token
    echo: str | None = None  # completions' echo: the prompt's text, written before the output
    echo_pieces: tuple[str, ...] = ()  # the echoed prompt's text token by token (logprobs)
    stop: tuple[str, ...] = ()
    include_stop_str: bool = False
    vocab_size: int = 0
    eos_token_ids: frozenset[int] = frozenset()  # their text is empty
    base_id: str | None = None  # None: the one request's id
    model: str = ""  # the served name it asked for (a LoRA adapter's); "": the base model

    @property
    def request(self) -> Request:
        """The first choice's request (the only one when n=1)."""
        return self.choices[0].request

    @property
    def request_id(self) -> str:
        """The call's id (X-Request-Id, response ids); its samples' requests add `{i}_`."""
        return self.base_id or self.choices[0].request.request_id


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
    best_of = _int(body, "best_of", 1, minimum=1)
    if best_of > 1:
        raise FieldError("best_of", f"only best_of=1 is supported, got {best_of}")
    if body.get("prompt_logprobs") is not None:
        raise FieldError("prompt_logprobs", "prompt log probabilities are not supported")
    if body.get("suffix") is not None:
        raise FieldError("suffix", "suffix is not supported")
    for name in ("functions", "function_call"):
        if body.get(name):
            raise FieldError(name, "the legacy functions API is not supported; use tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise FieldError("response_format", "only {'type': 'text'} is supported")


class OpenAIApi:
    """Converts bodies for one served model; holds no per-request state."""

    def __init__(
        self, card: ModelCard, tokenizer: PromptTokenizer, lora: LoraRegistry | None = None
    ) -> None:
        self.card = card
        self.tokenizer = tokenizer
        self.lora = lora  # with --enable-lora: adapters served by name, as models

    def to_call(self, body: Any, endpoint: Endpoint, request_id: str | None = None) -> Call:
        if not isinstance(body, dict):
            raise InvalidRequestError("request body: must be a JSON object")
        # It comes back in a header and in every chunk's id: printable ASCII only.
        if request_id is not None and not (request_id.isascii() and request_id.isprintable()):
            raise InvalidRequestError(f"X-Request-Id: must be printable ASCII, got {request_id!a}")
        adapter = self._check_model(body)
        _reject_unsupported(body)
        chat = endpoint is Endpoint.CHAT
        echo: str | None = None
        echo_pieces: tuple[str, ...] = ()
        if chat:
            prompt = self._encode("messages", chat_text(body.get("messages")))
            limit = min(self.card.context_window, self.card.kv_capacity_tokens) - len(prompt)
            default = max(1, min(DEFAULT_CHAT_MAX_TOKENS, limit))
            max_tokens = _int(body, "max_completion_tokens", None, minimum=1)
            if max_tokens is None:
                max_tokens = _int(body, "max_tokens", default, minimum=1)
            if body.get("echo"):
                raise FieldError("echo", "only /v1/completions echoes the prompt")
        else:
            prompt = self._prompt(body.get("prompt"))
            max_tokens = _int(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS, minimum=1)
            if _flag(body, "echo"):
                echo, echo_pieces = self._echo(body.get("prompt"), prompt)
        n = _int(body, "n", 1, minimum=1)
        if n > MAX_N:
            raise FieldError("n", f"at most {MAX_N} choices, got {n}")
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
        stop = _stop_strings(body.get("stop"))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            _number(body, name)
        for name in ("presence_penalty", "frequency_penalty"):
            _number(body, name)
        _int(body, "top_k", None, minimum=-1)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise FieldError("seed", f"must be an integer, got {seed!r}")
        tools, choice = _tools(body) if chat else _no_tools(body)
        rid = request_id or uuid.uuid4().hex
        first = Request(
            request_id=rid,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=_int(body, "min_tokens", 0, minimum=0),
            ignore_eos=_flag(body, "ignore_eos"),
            stop_token_ids=frozenset(self._token_ids("stop_token_ids", body.get("stop_token_ids"))),
            sampling_seed=seed,
            protocol="openai",
            lora=adapter,
        )
        choices = []
        for i in range(n):
            # vLLM names a parent's samples `{i}_{id}`; each its own seed, so its own tokens.
            r = (
                first
                if n == 1
                else replace(first, request_id=f"{i}_{rid}", sampling_seed=_seed(seed, i))
            )
            choices.append(_with_tool(r, tools, choice, i))
        return Call(
            choices=tuple(choices),
            endpoint=endpoint,
            stream=stream,
            include_usage=_flag(options, "include_usage", "stream_options.include_usage"),
            continuous_usage=_flag(
                options, "continuous_usage_stats", "stream_options.continuous_usage_stats"
            ),
            min_interval_s=min_interval_s or 0.0,
            top_logprobs=_logprobs(body, chat),
            echo=echo,
            echo_pieces=echo_pieces,
            stop=stop,
            include_stop_str=_flag(body, "include_stop_str_in_output"),
            vocab_size=self.card.vocab_size,
            eos_token_ids=frozenset(self.card.eos_token_ids),
            base_id=rid,
            model=adapter.name if adapter is not None else "",
        )

    def _echo(self, raw: Any, ids: tuple[int, ...]) -> tuple[str, tuple[str, ...]]:
        """The echoed prompt: its text as sent (token ids decoded), and that text per token
        (the four-character pieces the approximate tokenizer cut it into, where it did)."""
        text = raw[0] if isinstance(raw, list) and len(raw) == 1 else raw
        if not isinstance(text, str):
            pieces = tuple(self.detokenize((t,)) for t in ids)
            return "".join(pieces), pieces
        pieces = tuple(text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN))
        if len(pieces) != len(ids):  # a real tokenizer cut it otherwise
            pieces = tuple(self.detokenize((t,)) for t in ids)
        return text, pieces

    def tokenize(self, body: Any) -> dict[str, Any]:
        """vLLM's POST /tokenize: a `prompt` string, or chat `messages` as a chat request
        would count them."""
        if not isinstance(body, dict):
            raise InvalidRequestError("request body: must be a JSON object")
        self._check_model(body)
        if body.get("messages") is not None:
            ids = self._encode("messages", chat_text(body["messages"]))
        elif isinstance(body.get("prompt"), str):
            ids = self._encode("prompt", body["prompt"])
        else:
            raise FieldError("prompt", "required: a string (or messages)")
        count = len(ids)
        return {
            "count": count,
            "max_model_len": self.card.context_window,
            "tokens": list(ids),
            "token_strs": None,
        }

    def detokenize_body(self, body: Any) -> dict[str, Any]:
        """vLLM's POST /detokenize: `tokens` back to text."""
        if not isinstance(body, dict):
            raise InvalidRequestError("request body: must be a JSON object")
        self._check_model(body)
        ids = self._token_ids("tokens", body.get("tokens"))
        return {"prompt": self.detokenize(ids)}

    def _check_model(self, body: dict[str, Any]) -> LoraAdapter | None:
        """The LoRA adapter `model` names, None for the base model (or none named)."""
        model = body.get("model")
        if model is None or model == self.card.model:
            return None
        adapter = self.lora.get(model) if self.lora is not None and isinstance(model, str) else None
        if adapter is None:
            raise UnknownModelError(
                f"The model `{model}` does not exist; this server serves `{self.card.model}`."
            )
        return adapter

    def detokenize(self, ids: tuple[int, ...]) -> str:
        """Text for token ids: the real tokenizer's decoding, else each id's output word."""
        decode = getattr(self.tokenizer, "decode", None)
        if decode is not None:
            return decode(ids)
        return "".join(map(token_text, ids))

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


def _stop_strings(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise FieldError("stop", "must be a non-empty string or a list of them")
    if len(stop) > MAX_STOP_STRINGS:
        raise FieldError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    return tuple(stop)


def _seed(seed: int | None, i: int) -> int:
    """Sample i's sampling seed: distinct per sample, the same for the same request."""
    return i if seed is None else seed + i


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request asks for; None: no logprobs.

    Chat: `logprobs: true` and `top_logprobs` 0..20; completions: `logprobs` 0..20.
    Clients send `logprobs: false` and `top_logprobs: 0` by default: those ask for nothing."""
    if chat:
        asked = _flag(body, "logprobs")
        top = _int(body, "top_logprobs", 0, minimum=0)
        if top and not asked:
            raise FieldError("top_logprobs", "needs logprobs: true")
    else:
        v = body.get("logprobs")
        asked = v is not None and v is not False
        top = _int(body, "logprobs", 0, minimum=0) if asked else 0
        if body.get("top_logprobs"):
            raise FieldError("top_logprobs", "completions take the count in logprobs")
    if top > MAX_TOP_LOGPROBS:
        param = "top_logprobs" if chat else "logprobs"
        raise FieldError(param, f"at most {MAX_TOP_LOGPROBS}, got {top}")
    return top if asked else None


def _no_tools(body: dict[str, Any]) -> tuple[list[Tool], str]:
    if body.get("tools") or body.get("tool_choice") not in (None, "none"):
        raise FieldError("tools", "only /v1/chat/completions calls tools")
    return [], "none"


def _tools(body: dict[str, Any]) -> tuple[list[Tool], str]:
    """The request's functions (each schema checked by generating from it) and its
    `tool_choice`: "none", "auto", "required" or a function's name."""
    raw = body.get("tools")
    if raw is not None and not isinstance(raw, list):
        raise FieldError("tools", "must be a list of tools")
    tools: list[Tool] = []
    for i, t in enumerate(raw or []):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(f, dict):
            raise FieldError(f"tools[{i}]", "must be {'type': 'function', 'function': {...}}")
        name, params = f.get("name"), f.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not name:
            raise FieldError(f"tools[{i}].function.name", "required: a non-empty string")
        if not isinstance(params, dict):
            raise FieldError(f"tools[{i}].function.parameters", "must be a JSON schema object")
        try:
            arguments_json(params, ("check",))
        except SchemaError as e:
            raise FieldError(f"tools[{i}].function.parameters", str(e)) from None
        tools.append(Tool(name, params))
    choice = body.get("tool_choice")
    if choice is None:
        return tools, "auto" if tools else "none"
    if isinstance(choice, dict):
        f = choice.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise FieldError("tool_choice", "must name a function: {'type': 'function', ...}")
        if name not in {t.name for t in tools}:
            raise FieldError("tool_choice", f"function {name!r} is not among the tools")
        return tools, name
    if choice not in ("none", "auto", "required"):
        raise FieldError(
            "tool_choice", f"must be none, auto, required or a function, got {choice!r}"
        )
    if choice == "required" and not tools:
        raise FieldError("tool_choice", "required needs tools")
    return tools, choice


def _with_tool(request: Request, tools: list[Tool], choice: str, i: int) -> Choice:
    """The choice, calling a tool if `choice` says so: its request then generates as many
    tokens as the arguments' text takes (capped by max_tokens), so the timing fits them."""
    p = request.prompt_ids
    key = (request.sampling_seed, len(p), p[:32], p[-32:])
    tool = choose_tool(tools, choice, key)
    if tool is None:
        return Choice(request)
    args = arguments_json(tool.parameters, key)
    tokens = min(request.max_tokens, max(1, -(-len(args) // CHARS_PER_ARGUMENT_TOKEN)))
    call = ToolCall(f"chatcmpl-tool-{digest('call', i, *key):016x}", tool.name, args)
    fitted = replace(request, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    return Choice(fitted, call)
