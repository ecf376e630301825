"""OpenAI's Responses API (POST /v1/responses), minimal, on the chat path of the same engine.

A Responses body becomes a chat body (`chat_body`): `instructions` a system message,
`input` a string (one user message) or a list of messages (`{"role", "content"}`, the
content a string or `input_text`/`output_text` parts), `max_output_tokens` the chat's
`max_completion_tokens`; `model` (a LoRA adapter's name too), `temperature`, `top_p`,
`stream` and vLLM's extras (`ignore_eos`, `min_tokens`, `stop_token_ids`) pass through.
The answer is one assistant message of `output_text`, with `usage` (`input_tokens`,
cached, `output_tokens`), status `completed`, or `incomplete` (`max_output_tokens`)
when the length limit ended it.

Streaming sends OpenAI's minimal event sequence, each as `event: TYPE` plus its JSON:
response.created, response.in_progress, response.output_item.added,
response.content_part.added, a response.output_text.delta per token group,
response.output_text.done, response.content_part.done, response.output_item.done and
response.completed (or response.incomplete), every event numbered by `sequence_number`.

Not emulated (400): tools, `previous_response_id` (nothing is stored: `store` is
answered false), `background`, and input items other than messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from memorywall.errors import InvalidRequestError
from memorywall.server.engine.api import EventStream, Finished
from memorywall.server.fronts.openai_api import Call, FieldError
from memorywall.server.fronts.openai_reply import Reply

Write = Callable[[bytes], Awaitable[Any]]
_ROLES = ("user", "assistant", "system", "developer")
_EXTRAS = ("ignore_eos", "min_tokens", "stop_token_ids", "top_k")


def chat_body(body: Any) -> dict[str, Any]:
    """The chat completions body a Responses body asks for; FieldError for what is not
    emulated."""
    if not isinstance(body, dict):
        raise InvalidRequestError("request body: must be a JSON object")
    for name in ("tools", "previous_response_id", "background", "conversation"):
        if body.get(name):
            raise FieldError(name, "not supported by this emulator's /v1/responses")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise FieldError("instructions", "must be a string")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    chat: dict[str, Any] = {"messages": messages, "stream": bool(body.get("stream"))}
    # vLLM's sampling extras pass too (ignore_eos, stop_token_ids, ...), as on chat.
    for name in ("model", "temperature", "top_p", "seed", *_EXTRAS):
        if name in body:
            chat[name] = body[name]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    return chat


def _input_messages(raw: Any) -> list[dict[str, Any]]:
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    if not isinstance(raw, list) or not raw:
        raise FieldError("input", "required: a string or a list of messages")
    out = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise FieldError(where, "only messages ({'role', 'content'}) are supported")
        role = item.get("role")
        if role not in _ROLES:
            raise FieldError(f"{where}.role", f"expected one of {', '.join(_ROLES)}")
        out.append({"role": role, "content": _content(item.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FieldError(f"{where}.content", "must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text"):
            raise FieldError(f"{where}.content[{j}]", "only input_text parts are supported")
        text = part.get("text")
        if not isinstance(text, str):
            raise FieldError(f"{where}.content[{j}].text", "must be a string")
        texts.append(text)
    return "".join(texts)


class ResponseReply:
    """The Response object and stream events of one call (one choice, `reply`)."""

    def __init__(self, call: Call, reply: Reply, body: dict[str, Any]) -> None:
        self.reply = reply
        self.id = f"resp_{call.request_id}"
        self.item_id = f"msg_{call.request_id}"
        self.created_at = int(time.time())
        self.model = reply.model
        self.instructions = body.get("instructions")
        self.max_output_tokens = body.get("max_output_tokens")
        self.temperature = body.get("temperature", 1.0)
        self.top_p = body.get("top_p", 1.0)
        self._sequence = 0

    def response(
        self, text: str | None, finish: str | None, usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The Response object: in progress (`text` None), or done with `finish`."""
        status = "in_progress"
        incomplete = None
        output: list[dict[str, Any]] = []
        if text is not None:
            status = "incomplete" if finish == "length" else "completed"
            if finish == "length":
                incomplete = {"reason": "max_output_tokens"}
            output = [self.message(text, "completed")]
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": self.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": self.top_p,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def message(self, text: str | None, status: str) -> dict[str, Any]:
        content = [] if text is None else [_text_part(text)]
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def from_chat(self, chat: dict[str, Any]) -> dict[str, Any]:
        """The non-streaming Response from the chat completion the call produced."""
        choice = chat["choices"][0]
        usage = chat["usage"]
        return self.response(
            choice["message"]["content"] or "",
            choice["finish_reason"],
            _usage(
                usage["prompt_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"],
                usage["completion_tokens"],
            ),
        )

    def event(self, kind: str, **fields: Any) -> bytes:
        """One SSE event, numbered."""
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

    async def stream(self, stream: EventStream, write: Write) -> None:
        """Write the events of the one engine stream as its tokens come."""
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        await write(
            self.event("response.created", response=self.response(None, None, None))
            + self.event("response.in_progress", response=self.response(None, None, None))
            + self.event(
                "response.output_item.added",
                output_index=0,
                item=self.message(None, "in_progress"),
            )
            + self.event("response.content_part.added", part=_text_part(""), **at)
        )
        reply = self.reply
        texts: list[str] = []
        final: Finished | None = None
        async for event in stream:
            if isinstance(event, Finished):
                final = event
                break
            piece = reply.take(event)
            if piece.text:
                texts.append(piece.text)
                await write(
                    self.event("response.output_text.delta", delta=piece.text, logprobs=[], **at)
                )
            if reply.stopped:  # a stop string ended it: the engine request is not needed
                stream.close()
                final = reply.stopped_finished()
                break
        assert final is not None, "an engine stream ends with its Finished"
        text = "".join(texts)
        finish = reply.finish_reason or final.reason.value
        done = self.response(
            text, finish, _usage(final.prompt_tokens, final.cached_tokens, final.completion_tokens)
        )
        await write(
            self.event("response.output_text.done", text=text, logprobs=[], **at)
            + self.event("response.content_part.done", part=_text_part(text), **at)
            + self.event(
                "response.output_item.done", output_index=0, item=self.message(text, "completed")
            )
            + self.event(f"response.{done['status']}", response=done)
        )


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(prompt: int, cached: int, completion: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }
