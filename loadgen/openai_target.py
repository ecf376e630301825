"""An OpenAI-compatible HTTP server (vLLM, SGLang, memorywall's HTTP front) as a `Target`.

Requests and timing follow vLLM's `bench serve` (`benchmarks/lib/endpoint_request_func.py`):
a streaming POST with `max_tokens`, `ignore_eos: true` and
`stream_options: {include_usage: true}`; the send time is taken just before the
POST, and each server-sent event is stamped with the `perf_counter_ns()` of the
network read that completed it. Differences from vLLM, each on purpose:

- The request body is serialised before the send time is taken, so a long prompt's
  JSON encoding is not counted as time to first token.
- A chunk counts as a token-carrying message only when it carries tokens: a non-empty
  `text` (completions) or `delta.content` / `delta.reasoning_content` (chat). vLLM
  counts every chunk with `choices`, which makes a server's early role-only chat
  chunk the "first token". When a choice lists its tokens (`token_ids`, vLLM's
  `return_token_ids` form, or our `memorywall.token_ids` extension on the chunk),
  the chunk counts that many tokens and may count even if its text is empty (text
  held back by the detokenizer); otherwise one token per chunk. The request's total
  comes from the final usage chunk whenever the server sends one.
- Chat requests send both `max_completion_tokens` (what vLLM's bench sends) and
  `max_tokens` (what older servers read); vLLM uses the first when both are given.
- Every failure (HTTP status, connection, timeout, malformed stream, an `error`
  event) becomes `record.error`, never an exception.

memorywall's HTTP front adds a `memorywall` object to its chunks: `token_ids` per
chunk, and on the usage chunk `timing` (`ttft_s`, `e2e_s`, `decode_s`), the modelled
timeline that `GrpcTarget` records too. Other servers leave `modelled_*` None.

Synthetic prompts: completions send `prompt_tokens` token ids (as vLLM's random data
set does), drawn from [1000, 30000), which fits every common vocabulary. Chat
sends that many common three-letter English words joined by spaces: four
characters per word is the emulator's four-characters-per-token rule, and such words
are one token each in Llama and GPT BPE vocabularies (the chat template adds a few
tokens; `usage.prompt_tokens` records the true count). Prompts are drawn from a
numpy Generator seeded by (salt, request index); the salt is fresh per target unless
given, so a server's prefix cache never answers one sweep level with another's
prompts (a hit would show in `usage_cached_tokens`).
"""

from __future__ import annotations

import codecs
import json
import secrets
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import orjson

# TOKEN_ID_* and prompt_token_ids: re-exported, callers have imported them from here.
from memorywall.loadgen.prompts import TOKEN_ID_HIGH as TOKEN_ID_HIGH
from memorywall.loadgen.prompts import TOKEN_ID_LOW as TOKEN_ID_LOW
from memorywall.loadgen.prompts import (
    hash_block_rng,
    prefix_rng,
    prompt_rng,
    shared_tokens,
    spec_token_ids,
    turn_parts,
)
from memorywall.loadgen.prompts import prompt_token_ids as prompt_token_ids
from memorywall.loadgen.records import RequestRecord, RequestSpec
from memorywall.loadgen.target import Access

# Common words that are one token each (with their leading space) in Llama and GPT vocabularies.
WORDS = (
    "the", "and", "for", "are", "but", "not", "you", "all", "any", "can", "had", "her", "was",
    "one", "our", "out", "day", "get", "has", "him", "his", "how", "man", "new", "now", "old",
    "see", "two", "way", "who", "boy", "did", "its", "let", "put", "say", "she", "too", "use",
)  # fmt: skip
MAX_ERROR_CHARS = 300
KEEPALIVE_S = 60.0
CONNECT_TIMEOUT_S = 5.0  # for the connection opened by `connect`


class EndpointError(Exception):
    """The server cannot be used: unreachable, or `/v1/models` gave no usable answer."""


class _StreamError(Exception):
    """The stream itself reported an error or could not be read."""


# ---- URLs and the model list ----------------------------------------------------------------


def base_url(url: str) -> str:
    """`http[s]://host:port[/prefix]`, without a trailing `/` or `/v1`; ValueError otherwise."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected a URL such as http://127.0.0.1:8000, got {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"expected a base URL without query or fragment, got {url!r}")
    path = parts.path.rstrip("/").removesuffix("/v1")
    return f"{parts.scheme}://{parts.netloc}{path}"


async def fetch_models(
    base: str, *, timeout_s: float = 5.0, access: Access | None = None
) -> list[dict[str, Any]]:
    """The entries of `GET /v1/models` (each with a string `id`); EndpointError if none."""
    url = f"{base}/v1/models"
    access = access or Access()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(ssl=aiohttp_ssl(access))
            ) as session,
            session.get(url, headers=access.headers()) as resp,
        ):
            body = await resp.read()
            status, reason = resp.status, resp.reason
    except TimeoutError:
        raise EndpointError(f"GET {url}: no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as e:
        raise EndpointError(f"GET {url}: {str(e) or type(e).__name__}") from None
    if status != 200:
        raise EndpointError(f"GET {url}: HTTP {status}: {error_message(body, reason)}")
    try:
        data = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"GET {url}: not an OpenAI model list") from None
    if not isinstance(data, list):
        raise EndpointError(f"GET {url}: not an OpenAI model list")
    models = [m for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if not models:
        raise EndpointError(f"GET {url}: the server lists no models")
    return models


async def post_stream(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    access: Access,
    record: RequestRecord,
    read: Callable[[aiohttp.ClientResponse, RequestRecord], Awaitable[None]],
    *,
    timeout_error: str,
) -> None:
    """POST `body` as JSON for a server-sent event stream and `read` the answer into
    `record`, its clock started just before the POST; a failure becomes `record.error`
    (`timeout_error` on a timeout), not an exception."""
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    headers |= access.headers()
    record.sent_ns = time.perf_counter_ns()
    try:
        async with session.post(url, data=data, headers=headers) as resp:
            if resp.status != 200:
                message = error_message(await resp.read(), resp.reason)
                record.error = f"HTTP {resp.status}: {message}"
                return
            await read(resp, record)
    except TimeoutError:
        record.error = timeout_error
    except aiohttp.ClientError as e:
        record.error = f"connection error: {str(e) or type(e).__name__}"


def error_message(body: bytes, reason: str | None = None) -> str:
    """The message of an OpenAI error body (`{"error": {"message": ...}}`), vLLM's older
    `{"message": ...}`, FastAPI's `{"detail": ...}`, or the body's start."""
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    message: object = None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            message = err.get("message") or err.get("detail")
        elif isinstance(err, str):
            message = err
    if message is None:
        message = body.decode("utf-8", errors="replace").strip() or reason or "(no message)"
    return str(message)[:MAX_ERROR_CHARS]


# ---- server-sent events ---------------------------------------------------------------------


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str | None = None


class SseDecoder:
    """Incremental server-sent-events decoder (the WHATWG rules the OpenAI clients follow):
    lines end in CRLF, LF or CR; `:` starts a comment; `data:` lines (one leading space
    dropped) join with newlines; a blank line dispatches the event."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += self._utf8.decode(chunk)
        return self._lines(final=False)

    def close(self) -> list[SseEvent]:
        """End of stream: a last event without its blank line still counts."""
        self._buffer += self._utf8.decode(b"", final=True)
        events = self._lines(final=True)
        if self._buffer:
            self._line(self._buffer, events)
            self._buffer = ""
        self._dispatch(events)
        return events

    def _lines(self, *, final: bool) -> list[SseEvent]:
        events: list[SseEvent] = []
        text = self._buffer
        # A CR at the very end may be the first half of a CRLF: keep it for the next read.
        pending = "" if final or not text.endswith("\r") else "\r"
        if pending:
            text = text[:-1]
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._buffer = lines.pop() + pending
        for line in lines:
            self._line(line, events)
        return events

    def _line(self, line: str, events: list[SseEvent]) -> None:
        if not line:
            self._dispatch(events)
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value

    def _dispatch(self, events: list[SseEvent]) -> None:
        if self._data:
            events.append(SseEvent("\n".join(self._data), self._event))
        self._data, self._event = [], None


# ---- requests and chunks --------------------------------------------------------------------


def prompt_text(n: int, rng: np.random.Generator) -> str:
    """About `n` tokens of text: `n` three-letter words, 4 characters each with the space."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=n))


def hash_text(spec: RequestSpec, salt: int) -> str:
    """A Mooncake request as chat text: a block of words per hash id (equal ids, equal
    text), cut to about `prompt_tokens` words, the rest the request's own. How many of its
    tokens a server finds cached depends on its tokenizer; completions send exact ids."""
    parts: list[str] = []
    left = spec.prompt_tokens
    for hash_id in spec.hash_ids:
        if left <= 0:
            break
        take = min(spec.block_tokens, left)
        parts.append(prompt_text(take, hash_block_rng(salt, hash_id)))
        left -= take
    if left > 0:
        parts.append(prompt_text(left, prompt_rng(salt, spec.index)))
    return " ".join(parts)


def tokens_in(chunk: dict[str, Any], *, chat: bool) -> int:
    """How many generated tokens one streamed chunk carries (0: none, e.g. a role delta)."""
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return 0
    choice = choices[0]
    ids = choice.get("token_ids")
    if ids is None and isinstance(ext := chunk.get("memorywall"), dict):
        ids = ext.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    if not chat:
        return 1 if choice.get("text") else 0
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        return 0
    text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
    return 1 if text else 0


def _json(data: str) -> Any:
    """An event's JSON: orjson (a third of the stdlib's time on a streamed chunk, which a
    client parses ~20k of a second at a wafer's pace), the stdlib where orjson refuses what
    the stdlib reads (NaN, integers past 64 bits); _StreamError if neither can."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(data)
    except ValueError:
        raise _StreamError(f"bad event data: {data[:80]!r}") from None


def apply_event(event: SseEvent, received_ns: int, record: RequestRecord, *, chat: bool) -> bool:
    """Fold one event into `record`; True at `[DONE]`. Raises _StreamError on an error event."""
    if event.data.startswith("[DONE]"):
        return True
    if event.event == "error":
        raise _StreamError(f"stream error: {error_message(event.data.encode())}")
    chunk = _json(event.data)
    if not isinstance(chunk, dict):
        raise _StreamError(f"bad event data: {event.data[:80]!r}")
    if chunk.get("error"):
        raise _StreamError(f"stream error: {error_message(event.data.encode())}")
    n = tokens_in(chunk, chat=chat)
    if n:
        record.add_chunk(received_ns, n)
    ext = chunk.get("memorywall")
    if isinstance(ext, dict) and isinstance(timing := ext.get("timing"), dict):
        record.modelled_ttft_s = timing.get("ttft_s")
        record.modelled_e2e_s = timing.get("e2e_s")
        record.modelled_decode_s = timing.get("decode_s")
        record.server_received_ns = timing.get("received_monotonic_ns") or None
    if isinstance(usage := chunk.get("usage"), dict):
        record.usage_prompt_tokens = usage.get("prompt_tokens")
        record.usage_completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details")
        record.usage_cached_tokens = (
            details.get("cached_tokens") if isinstance(details, dict) else None
        )
    return False


# ---- the target -----------------------------------------------------------------------------


class OpenAITarget:
    """Streams `/v1/completions` (or `/v1/chat/completions` when `chat`) from `base_url`."""

    def __init__(
        self,
        base_url: str,
        *,
        chat: bool,
        model: str,
        timeout_s: float | None = None,
        prompt_salt: int | None = None,
        access: Access | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.access = access or Access()
        self.chat = chat
        self.model = model
        self.timeout_s = timeout_s
        self.prompt_salt = secrets.randbits(63) if prompt_salt is None else prompt_salt
        self.url = f"{self.base_url}/v1/{'chat/completions' if chat else 'completions'}"
        self._session: aiohttp.ClientSession | None = None

    async def connect(self) -> None:
        """Open the session and one kept-alive connection (a failure here is left to `send`)."""
        # The runner decides how many requests are in flight: the pool must never queue
        # them (aiohttp's default is 100 connections), hence no limit.
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=0,
            ttl_dns_cache=300,
            keepalive_timeout=KEEPALIVE_S,
            ssl=aiohttp_ssl(self.access),
        )
        # total=None is no deadline; aiohttp's default would be 300 s.
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        warm = aiohttp.ClientTimeout(total=CONNECT_TIMEOUT_S)
        try:
            async with self._session.get(
                f"{self.base_url}/v1/models", timeout=warm, headers=self.access.headers()
            ) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    def payload(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"model": spec.model or self.model}
        if self.chat and spec.session is not None:
            # The conversation so far as alternating user and assistant messages.
            parts = turn_parts(spec, self.prompt_salt, prompt_text)
            roles = ("user", "assistant")
            body["messages"] = [
                {"role": roles[i % 2], "content": text} for i, text in enumerate(parts)
            ]
            body["max_completion_tokens"] = spec.output_tokens
        elif self.chat and spec.hash_ids:
            body["messages"] = [{"role": "user", "content": hash_text(spec, self.prompt_salt)}]
            body["max_completion_tokens"] = spec.output_tokens
        elif self.chat:
            rng = prompt_rng(self.prompt_salt, spec.index)
            shared = shared_tokens(spec)
            own = spec.prompt_tokens - shared
            group = prefix_rng(self.prompt_salt, spec.prefix_group or 0) if shared else None
            parts = [prompt_text(shared, group)] if group is not None else []
            if own or not parts:
                parts.append(prompt_text(own, rng))
            body["messages"] = [{"role": "user", "content": " ".join(parts)}]
            body["max_completion_tokens"] = spec.output_tokens
        else:
            body["prompt"] = spec_token_ids(spec, self.prompt_salt)
        body |= {
            "max_tokens": spec.output_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return body

    async def send(self, spec: RequestSpec, record: RequestRecord) -> None:
        """Stream one request into `record`; a failure becomes `record.error`, not an exception."""
        if self._session is None:
            raise RuntimeError("send before connect")
        within = "" if self.timeout_s is None else f" within {self.timeout_s:g} s"
        try:
            await post_stream(
                self._session,
                self.url,
                self.payload(spec),
                self.access,
                record,
                self._read_stream,
                timeout_error=f"timeout: no complete response{within}",
            )
        except _StreamError as e:  # raised by _read_stream; not an aiohttp error
            record.error = str(e)

    async def _read_stream(self, resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
        decoder = SseDecoder()
        seen = 0
        done = False
        received_ns = record.sent_ns
        # Read to the end even after [DONE], so the connection goes back to the pool.
        async for data in resp.content.iter_any():
            received_ns = time.perf_counter_ns()
            for event in decoder.feed(data):
                seen += 1
                if not done and apply_event(event, received_ns, record, chat=self.chat):
                    done = True
                    record.finished_ns = received_ns
        for event in decoder.close():
            seen += 1
            if not done and apply_event(event, received_ns, record, chat=self.chat):
                done = True
        if not seen:
            raise _StreamError(f"no server-sent events in the response ({resp.content_type})")
        if record.finished_ns is None:
            record.finished_ns = received_ns  # the stream ended without [DONE]

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def aiohttp_ssl(access: Access) -> ssl.SSLContext | bool:
    """aiohttp's `ssl=`: the given roots, or True (default verification for https)."""
    return access.ssl_context() or True
