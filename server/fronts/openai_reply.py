"""Engine events to OpenAI response objects, in vLLM's shapes, with no I/O.

Field for field as vLLM's OpenAI server (`vllm/entrypoints/openai/protocol.py`:
`CompletionResponse`, `CompletionStreamResponse`, `ChatCompletionResponse`,
`ChatCompletionStreamResponse`, `ModelList`), framed as its server-sent events
(`data: {json}` and a blank line; `data: [DONE]` last). Every chunk also carries
a `memorywall` object (token ids and their modelled times, seconds after
arrival); OpenAI clients keep unknown fields and ignore them.

Mid-stream chunks, the hot path, are written from a template: the chunk is
encoded once per request with markers where the text, token ids and times go,
and each group fills them in with the encoders `json.dumps` itself uses, so
the bytes are the same as encoding the whole object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # json.dumps's own (C) string encoder
from typing import Any

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import Finished, FinishReason, ModelCard, TokenGroup, token_text
from memorywall.server.fronts.logprobs import chat_logprobs, completion_logprobs
from memorywall.server.fronts.openai_api import Call, Endpoint, ToolCall, error_for
from memorywall.server.fronts.tool_calls import CHARS_PER_ARGUMENT_TOKEN

DONE = b"data: [DONE]\n\n"
_TEXT, _IDS, _TIMES = "\x00text\x00", "\x00ids\x00", "\x00times\x00"  # template markers


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI clients parse it."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass(slots=True)
class Piece:
    """What one token group becomes in a choice: its text (after stop strings and tool
    arguments have had their say), finish reason and vLLM's `stop_reason`."""

    text: str
    finish: str | None
    stop_reason: int | str | None
    token_ids: tuple[int, ...]
    logprobs: dict[str, Any] | None = None
    tool_delta: dict[str, Any] | None = None  # a chat tool call's delta, instead of text


class StopMatcher:
    """Cuts the text at the first stop string. Streaming holds back the last
    (longest stop - 1) characters, as vLLM does, so a stop string split over two
    groups never shows its first half."""

    def __init__(self, stops: tuple[str, ...], include: bool) -> None:
        self.stops = stops
        self.include = include
        self.keep = max(map(len, stops)) - 1
        self.held = ""

    def feed(self, text: str, final: bool) -> tuple[str, str | None]:
        """The text to write now, and the stop string found, if one was."""
        text = self.held + text
        hits = [(j, s) for s in self.stops if (j := text.find(s)) >= 0]
        if hits:
            j, stop = min(hits)
            self.held = ""
            return text[: j + len(stop) if self.include else j], stop
        cut = len(text) if final else max(0, len(text) - self.keep)
        self.held = text[cut:]
        return text[:cut], None


class Reply:
    """The response objects for one choice of a call (`index`), in vLLM's shapes."""

    def __init__(self, call: Call, model: str, created: int, index: int = 0) -> None:
        self.call = call
        self.model = model
        self.created = created
        self.index = index
        self.choice = call.choices[index]
        chat = call.endpoint is Endpoint.CHAT
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{call.request_id}"
        self.chat = chat
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set once a chunk carried it
        self.stopped = False  # a stop string ended the text: the engine request is not needed
        self._template: tuple[bytes, bytes, bytes, bytes] | None = None
        self._stops = StopMatcher(call.stop, call.include_stop_str) if call.stop else None
        self._echo = call.echo  # written before the first group, then None
        self._args_at = 0  # how much of the tool call's arguments went out
        self._text_at = 0  # characters of the tokens given logprobs so far (text_offset)
        # What `take` saw, for a choice that ends before the engine's `Finished`.
        self._prompt_tokens = self._cached_tokens = 0
        self._times: tuple[float, ...] = ()  # first and latest token times
        self._plain = call.top_logprobs is None and not call.stop and self.tool is None

    @property
    def tool(self) -> ToolCall | None:
        return self.choice.tool_call

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str, reason: str | None, stop_reason: int | str | None) -> dict:
        choice: dict[str, Any] = {"index": self.index}
        if self.chat:
            choice["delta"] = {"content": text} if text or reason is None else {}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=reason, stop_reason=stop_reason)
        return choice

    def role_event(self) -> bytes:
        """Chat streams open with the assistant's role, as vLLM's do."""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return sse(self._chunk([choice]))

    def _mid_template(self) -> tuple[bytes, bytes, bytes, bytes]:
        """A chunk with no finish reason and no usage, split where text, ids and times go."""
        chunk = self._chunk([self._choice(_TEXT, None, None)])
        chunk["memorywall"] = {"token_ids": _IDS, "modelled_times_s": _TIMES}
        head, rest = sse(chunk).split(encode_basestring_ascii(_TEXT).encode())
        middle, rest = rest.split(encode_basestring_ascii(_IDS).encode())
        before_times, tail = rest.split(encode_basestring_ascii(_TIMES).encode())
        return head, middle, before_times, tail

    def group_event(self, group: TokenGroup) -> bytes:
        """One token group; the last carries the finish reason."""
        if not self._plain or self._echo is not None:
            return sse(self.group_chunk(group, self.take(group)))
        token_ids, times_s = group.token_ids, group.times_s
        self.completion_tokens += len(token_ids)
        reason = group.finish_reason
        if reason is not None or self.call.continuous_usage:  # not the hot path: mid-stream
            finish = reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None
            self.finish_reason = finish
            if finish is not None or self.call.continuous_usage:
                return sse(self.group_chunk(group))
        template = self._template
        if template is None:
            template = self._template = self._mid_template()
        head, middle, before_times, tail = template
        text = encode_basestring_ascii(group.text).encode()
        if len(token_ids) == 1 == len(times_s):  # a token a message: one formatting, not six
            # %d and %r write an int and a float as json.dumps does (their repr).
            fields = (head, text, middle, token_ids[0], before_times, times_s[0], tail)
            return b"%b%b%b[%d]%b[%r]%b" % fields
        ids = ",".join(map(str, token_ids))
        times = ",".join(map(float.__repr__, times_s))  # as json.dumps writes floats
        return b"".join(
            (head, text, middle, f"[{ids}]".encode(), before_times, f"[{times}]".encode(), tail)
        )

    def take(self, group: TokenGroup) -> Piece:
        """Count a group and say what it becomes: text cut at a stop string, the tool
        call's next arguments, logprobs; the echoed prompt before the first."""
        ids = group.token_ids
        start = self.completion_tokens
        self.completion_tokens += len(ids)
        self._prompt_tokens, self._cached_tokens = group.prompt_tokens, group.cached_tokens
        if group.times_s:
            self._times = (self._times or group.times_s)[:1] + group.times_s[-1:]
        reason = group.finish_reason
        finish = reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None
        stop_reason: int | str | None = self._stop_reason(ids, reason)
        text, tool_delta = group.text, None
        if self.tool is not None:
            text, tool_delta, finish = "", *self._tool_piece(finish)
        elif self._stops is not None:
            text, hit = self._stops.feed(text, final=finish is not None)
            if hit is not None:
                finish, stop_reason, self.stopped = "stop", hit, True
        logprobs = None
        if self.call.top_logprobs is not None:
            logprobs = self._logprobs(ids, start)
        if self._echo is not None:
            text, self._echo = self._echo + text, None
        self.finish_reason = finish
        return Piece(text, finish, stop_reason, ids, logprobs, tool_delta)

    def _tool_piece(self, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The arguments' next characters, CHARS_PER_ARGUMENT_TOKEN a token; all of them
        by the last token the call needs (then the finish reason is `tool_calls`)."""
        tool, at = self.tool, self._args_at
        assert tool is not None, "take() calls this only for a tool call"
        n = len(tool.arguments)
        end = min(n, self.completion_tokens * CHARS_PER_ARGUMENT_TOKEN)
        if self.completion_tokens >= -(-n // CHARS_PER_ARGUMENT_TOKEN):
            end = n
        self._args_at = end
        call: dict[str, Any] = {"index": 0, "function": {"arguments": tool.arguments[at:end]}}
        if at == 0:
            call = {"index": 0, "id": tool.id, "type": "function"}
            call["function"] = {"name": tool.name, "arguments": tool.arguments[:end]}
        if finish is not None and end == n:
            finish = "tool_calls"
        return {"tool_calls": [call]}, finish

    def _logprobs(self, ids: tuple[int, ...], start: int) -> dict[str, Any]:
        call = self.call
        top = call.top_logprobs
        assert top is not None, "take() calls this only when the call asked for logprobs"
        eos = call.eos_token_ids
        texts = ["" if t in eos else token_text(t) for t in ids]
        if self.chat:
            return chat_logprobs(ids, texts, start, top, call.vocab_size)
        all_ids: list[int | None] = list(ids)
        if self._echo is not None:  # the echoed prompt's tokens first, the first with none
            prompt = call.request.prompt_ids
            all_ids = [None, *prompt[1:], *ids]
            texts = [*call.echo_pieces, *texts]
            start -= len(prompt)
        offset = self._text_at
        self._text_at += sum(map(len, texts))
        return completion_logprobs(all_ids, texts, start, top, call.vocab_size, offset)

    def group_chunk(self, group: TokenGroup, piece: Piece | None = None) -> dict[str, Any]:
        """One token group's chunk as an object (what `group_event` encodes); `piece`: what
        `take` made of it, else the group as it came."""
        if piece is None:
            reason = group.finish_reason
            finish = reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None
            piece = Piece(group.text, finish, self._stop_reason(group.token_ids, reason), ())
        choice = self._choice(piece.text, piece.finish, piece.stop_reason)
        if piece.tool_delta is not None:
            choice["delta"] = piece.tool_delta
        choice["logprobs"] = piece.logprobs
        chunk = self._chunk([choice])
        chunk["memorywall"] = {
            "token_ids": list(group.token_ids),
            "modelled_times_s": list(group.times_s),
        }
        if self.call.continuous_usage:
            chunk["usage"] = _usage(len(self.call.request.prompt_ids), 0, self.completion_tokens)
        return chunk

    def finish_event(self, f: Finished) -> bytes:
        """A finish chunk if no group carried the finish reason (with any held-back text)."""
        if self.finish_reason is not None:
            return b""
        text = self._stops.feed("", final=True)[0] if self._stops is not None else ""
        self.finish_reason = f.reason.value
        return sse(self._chunk([self._choice(text, f.reason.value, None)]))

    def end_events(self, f: Finished) -> bytes:
        """After the last group: a finish chunk if none carried it, usage if asked, [DONE]."""
        return self.finish_event(f) + final_events([self], [f])

    def error_events(self, error: MemorywallError) -> bytes:
        """An error after the stream began (the server drained): vLLM's error event, [DONE]."""
        return sse(error_for(error)[1]) + DONE

    def choice_body(self, pieces: list[Piece], f: Finished) -> dict[str, Any]:
        """This choice of the non-streaming response, from what `take` made of its groups."""
        if self._stops is not None and not self.stopped:
            pieces = [*pieces, Piece(self._stops.feed("", final=True)[0], None, None, ())]
        text = "".join(p.text for p in pieces)
        last = tuple(t for p in pieces for t in p.token_ids[-1:])[-1:]
        stop_reason: int | str | None = self._stop_reason(last, f.reason)
        finish = f.reason.value
        if self.stopped:
            finish, stop_reason = "stop", next(p.stop_reason for p in pieces if p.finish)
        elif self.finish_reason is not None:
            finish = self.finish_reason
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": []}
            if self.tool is not None:
                tool = self.tool
                call = {"name": tool.name, "arguments": tool.arguments[: self._args_at]}
                function = {"id": tool.id, "type": "function", "function": call}
                message.update(content=None, tool_calls=[function])
            choice = {"index": self.index, "message": message}
        else:
            choice = {"index": self.index, "text": text}
        logprobs = None
        if self.call.top_logprobs is not None:
            logprobs = _joined([p.logprobs for p in pieces if p.logprobs is not None], self.chat)
        choice.update(logprobs=logprobs, finish_reason=finish, stop_reason=stop_reason)
        return choice

    def body(self, groups: list[TokenGroup], f: Finished) -> dict[str, Any]:
        """The whole non-streaming response of a one-choice call."""
        return response_body([self], [[self.take(g) for g in groups]], [f])

    def stopped_finished(self) -> Finished:
        """The end of a choice a stop string cut short, from the tokens it read: the engine
        aborts the request and its own account never reaches the reply."""
        first, last = self._times or (0.0, 0.0)
        return Finished(
            request_id=self.choice.request.request_id,
            reason=FinishReason.STOP,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=self._cached_tokens,
            queue_s=0.0,
            prefill_s=0.0,
            decode_s=last - first,
            ttft_s=first,
            e2e_s=last,
            preemptions=0,
            energy_j=0.0,
            last_token_id=None,
        )

    def usage(self, f: Finished) -> tuple[int, int, int]:
        """Prompt, cached and completion tokens; a choice a stop string ended counts the
        tokens it read, not what the engine made before the abort reached it."""
        completion = self.completion_tokens if self.stopped else f.completion_tokens
        return f.prompt_tokens, f.cached_tokens, completion

    def _stop_reason(self, ids: tuple[int, ...], reason: FinishReason | None) -> int | None:
        """The stop token id that ended the request (vLLM's `stop_reason`), else None."""
        stops = self.choice.request.stop_token_ids
        if reason is FinishReason.STOP and ids and ids[-1] in stops:
            return ids[-1]
        return None


def final_events(replies: list[Reply], finished: list[Finished]) -> bytes:
    """The usage chunk if the call asked for it (every choice counted), then [DONE]."""
    first = replies[0]
    if not first.call.include_usage:
        return DONE
    chunk = first._chunk([])
    chunk["usage"] = _total_usage(replies, finished)
    chunk["memorywall"] = summary(finished[0])
    return sse(chunk) + DONE


def response_body(
    replies: list[Reply], pieces: list[list[Piece]], finished: list[Finished]
) -> dict[str, Any]:
    """The whole non-streaming response: one choice per reply."""
    first = replies[0]
    choices = [r.choice_body(p, f) for r, p, f in zip(replies, pieces, finished, strict=True)]
    return {
        "id": first.id,
        "object": "chat.completion" if first.chat else "text_completion",
        "created": first.created,
        "model": first.model,
        "choices": choices,
        "usage": _total_usage(replies, finished),
        "memorywall": summary(finished[0]),
    }


def _total_usage(replies: list[Reply], finished: list[Finished]) -> dict[str, Any]:
    """vLLM's usage of an n-choice request: the prompt once, every choice's completion."""
    counts = [r.usage(f) for r, f in zip(replies, finished, strict=True)]
    prompt, cached, _ = counts[0]
    return _usage(prompt, cached, sum(c for _, _, c in counts))


def _usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _joined(parts: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """One choice's logprobs from its groups' pieces (their offsets already run on)."""
    if chat:
        return {"content": [e for p in parts for e in p["content"]]}
    keys = ("text_offset", "token_logprobs", "tokens", "top_logprobs")
    return {k: [v for p in parts for v in p[k]] for k in keys}


def summary(f: Finished) -> dict[str, Any]:
    """The engine's modelled account of one request, as gRPC's `Finished` carries it."""
    out: dict[str, Any] = {
        "timing": {
            "queue_s": f.queue_s,
            "prefill_s": f.prefill_s,
            "decode_s": f.decode_s,
            "ttft_s": f.ttft_s,
            "e2e_s": f.e2e_s,
            "preemptions": f.preemptions,
            "received_monotonic_ns": f.received_monotonic_ns,
        },
        "energy_j": f.energy_j,
        "lag": {
            "host_stall_s": f.host_stall_s,
            "decode_host_stall_s": f.decode_host_stall_s,
            "max_lag_s": f.max_lag_s,
        },
    }
    if f.fault is not None:
        out["fault"] = f.fault
    return out


def model_list(card: ModelCard, created: int) -> dict[str, Any]:
    """GET /v1/models: the served model, with vLLM's `max_model_len`, plus the emulated
    `hardware` and `devices` (memorywall's extension: lets a load generator ask the core
    for its prediction)."""
    model = {
        "id": card.model,
        "object": "model",
        "created": created,
        "owned_by": "memorywall",
        "root": card.model,
        "parent": None,
        "max_model_len": card.context_window,
        "permission": [],
        "hardware": card.hardware,
        "devices": card.devices,
    }
    return {"object": "list", "data": [model]}
