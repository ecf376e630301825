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
from json.encoder import encode_basestring_ascii  # json.dumps's own (C) string encoder
from typing import Any

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import Finished, FinishReason, ModelCard, TokenGroup
from memorywall.server.fronts.openai_api import Call, Endpoint, error_for

DONE = b"data: [DONE]\n\n"
_TEXT, _IDS, _TIMES = "\x00text\x00", "\x00ids\x00", "\x00times\x00"  # template markers


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event as OpenAI clients parse it."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class Reply:
    """The response objects for one call, in vLLM's shapes."""

    def __init__(self, call: Call, model: str, created: int) -> None:
        self.call = call
        self.model = model
        self.created = created
        chat = call.endpoint is Endpoint.CHAT
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{call.request.request_id}"
        self.chat = chat
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # set once a chunk carried it
        self._template: tuple[bytes, bytes, bytes, bytes] | None = None

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str, reason: str | None, stop_reason: int | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self.chat:
            choice["delta"] = {"content": text} if text or reason is None else {}
        else:
            choice["text"] = text
        choice.update(logprobs=None, finish_reason=reason, stop_reason=stop_reason)
        return choice

    def role_event(self) -> bytes:
        """Chat streams open with the assistant's role, as vLLM's do."""
        delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
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
        self.completion_tokens += len(group.token_ids)
        reason = group.finish_reason
        finish = reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None
        self.finish_reason = finish
        if finish is not None or self.call.continuous_usage:
            return sse(self.group_chunk(group))
        if self._template is None:
            self._template = self._mid_template()
        head, middle, before_times, tail = self._template
        ids = ",".join(map(str, group.token_ids))
        times = ",".join(map(float.__repr__, group.times_s))  # as json.dumps writes floats
        return b"".join(
            (
                head,
                encode_basestring_ascii(group.text).encode(),
                middle,
                f"[{ids}]".encode(),
                before_times,
                f"[{times}]".encode(),
                tail,
            )
        )

    def group_chunk(self, group: TokenGroup) -> dict[str, Any]:
        """One token group's chunk as an object (what `group_event` encodes)."""
        reason = group.finish_reason
        finish = reason.value if reason in (FinishReason.LENGTH, FinishReason.STOP) else None
        stop_reason = self._stop_reason(group.token_ids, reason)
        chunk = self._chunk([self._choice(group.text, finish, stop_reason)])
        chunk["memorywall"] = {
            "token_ids": list(group.token_ids),
            "modelled_times_s": list(group.times_s),
        }
        if self.call.continuous_usage:
            chunk["usage"] = self._usage(len(self.call.request.prompt_ids), 0)
        return chunk

    def end_events(self, f: Finished) -> bytes:
        """After the last group: a finish chunk if none carried it, usage if asked, [DONE]."""
        out = b""
        if self.finish_reason is None:
            self.finish_reason = f.reason.value
            out += sse(self._chunk([self._choice("", f.reason.value, None)]))
        if self.call.include_usage:
            chunk = self._chunk([])
            chunk["usage"] = self._usage(f.prompt_tokens, f.cached_tokens, f.completion_tokens)
            chunk["memorywall"] = summary(f)
            out += sse(chunk)
        return out + DONE

    def error_events(self, error: MemorywallError) -> bytes:
        """An error after the stream began (the server drained): vLLM's error event, [DONE]."""
        return sse(error_for(error)[1]) + DONE

    def body(self, groups: list[TokenGroup], f: Finished) -> dict[str, Any]:
        """The whole non-streaming response."""
        text = "".join(g.text for g in groups)
        last = tuple(t for g in groups for t in g.token_ids[-1:])[-1:]
        stop_reason = self._stop_reason(last, f.reason)
        if self.chat:
            message = {"role": "assistant", "content": text, "tool_calls": []}
            choice = {"index": 0, "message": message}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=f.reason.value, stop_reason=stop_reason)
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self._usage(f.prompt_tokens, f.cached_tokens, f.completion_tokens),
            "memorywall": summary(f),
        }

    def _usage(self, prompt: int, cached: int, completion: int | None = None) -> dict[str, Any]:
        completion = self.completion_tokens if completion is None else completion
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _stop_reason(self, ids: tuple[int, ...], reason: FinishReason | None) -> int | None:
        """The stop token id that ended the request (vLLM's `stop_reason`), else None."""
        stops = self.call.request.stop_token_ids
        if reason is FinishReason.STOP and ids and ids[-1] in stops:
            return ids[-1]
        return None


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
