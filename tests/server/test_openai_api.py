"""OpenAI request conversion and response shapes, with no server: `server/fronts/openai_api.py`,
`server/fronts/openai_reply.py`."""

from __future__ import annotations

import json

import pytest
from engine_fakes import model_card

from memorywall.errors import InvalidRequestError, NotFoundError
from memorywall.server.engine.api import Finished, FinishReason, TokenGroup
from memorywall.server.fronts.openai_api import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    Endpoint,
    FieldError,
    OpenAIApi,
    chat_text,
    error_for,
)
from memorywall.server.fronts.openai_reply import DONE, Reply
from memorywall.server.fronts.tokenizer import ApproximateTokenizer

CARD = model_card(context_window=2048, eos_token_ids=(999,), kv_capacity_tokens=1536)
API = OpenAIApi(CARD, ApproximateTokenizer(CARD.vocab_size))


def finished(reason: FinishReason = FinishReason.LENGTH, completion: int = 3) -> Finished:
    return Finished(
        request_id="r",
        reason=reason,
        prompt_tokens=4,
        completion_tokens=completion,
        cached_tokens=0,
        queue_s=0.0,
        prefill_s=0.01,
        decode_s=0.02,
        ttft_s=0.01,
        e2e_s=0.03,
        preemptions=0,
        energy_j=1.5,
        last_token_id=None,
    )


def group(ids: tuple[int, ...], text: str, times_s: tuple[float, ...], reason=None) -> TokenGroup:
    return TokenGroup(
        token_ids=ids,
        text=text,
        times_s=times_s,
        prompt_tokens=4,
        cached_tokens=0,
        completion_tokens=len(ids),
        finish_reason=reason,
    )


def events(raw: bytes) -> list[dict]:
    return [json.loads(e[6:]) for e in raw.split(b"\n\n") if e and e != DONE.strip()]


def test_chat_text_joins_roles_and_ends_with_the_assistant():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]
    assert chat_text(messages) == "system: s\nuser: ab\nassistant: \nassistant:"


def test_default_max_tokens():
    call = API.to_call({"prompt": "hi"}, Endpoint.COMPLETIONS)
    assert call.request.max_tokens == DEFAULT_COMPLETION_MAX_TOKENS
    call = API.to_call({"messages": [{"role": "user", "content": "hi"}]}, Endpoint.CHAT)
    assert call.request.max_tokens == DEFAULT_CHAT_MAX_TOKENS
    # capped by what the context and the KV pool leave after the prompt
    long = {"messages": [{"role": "user", "content": "x" * 4 * 1000}]}
    call = API.to_call(long, Endpoint.CHAT)
    assert call.request.max_tokens == CARD.kv_capacity_tokens - len(call.request.prompt_ids)


def test_max_completion_tokens_wins_over_max_tokens():
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    assert API.to_call({**body, "max_completion_tokens": 5}, Endpoint.CHAT).request.max_tokens == 5


def test_fields_reach_the_engine_request():
    body = {
        "prompt": [1, 2, 3],
        "max_tokens": 7,
        "min_tokens": 2,
        "ignore_eos": True,
        "stop_token_ids": [5, 6],
        "seed": 11,
        "stream": True,
        "stream_options": {"include_usage": True, "min_interval_s": 0.01},
    }
    call = API.to_call(body, Endpoint.COMPLETIONS, request_id="abc")
    r = call.request
    assert (r.request_id, r.prompt_ids, r.max_tokens, r.min_tokens) == ("abc", (1, 2, 3), 7, 2)
    assert r.ignore_eos and r.stop_token_ids == {5, 6} and r.sampling_seed == 11
    assert call.stream and call.include_usage and call.min_interval_s == 0.01


def test_errors_carry_param_and_status():
    with pytest.raises(FieldError) as e:
        API.to_call({"prompt": ["a", "b"]}, Endpoint.COMPLETIONS)
    assert e.value.param == "prompt" and isinstance(e.value, InvalidRequestError)
    assert error_for(e.value) == (
        400,
        {
            "error": {
                "message": "prompt: 2 prompts in one request; send one prompt per request",
                "type": "BadRequestError",
                "param": "prompt",
                "code": 400,
            }
        },
    )
    with pytest.raises(NotFoundError) as e:
        API.to_call({"model": "x", "prompt": "a"}, Endpoint.COMPLETIONS)
    assert error_for(e.value)[1]["error"]["param"] == "model"
    assert error_for(e.value)[0] == 404


def test_last_group_carries_the_finish_reason_and_the_stop_token():
    call = API.to_call(
        {"prompt": "hi", "stop_token_ids": [7], "stream": True}, Endpoint.COMPLETIONS
    )
    reply = Reply(call, "m", 123)
    first = events(reply.group_event(group((1, 2), " a b", (0.1, 0.1))))[0]
    last = events(reply.group_event(group((7,), " c", (0.2,), FinishReason.STOP)))[0]
    assert first["choices"][0]["finish_reason"] is None
    assert last["choices"][0] == {
        "index": 0,
        "text": " c",
        "logprobs": None,
        "finish_reason": "stop",
        "stop_reason": 7,
    }
    assert last["memorywall"] == {"token_ids": [7], "modelled_times_s": [0.2]}
    assert reply.end_events(finished(FinishReason.STOP)) == DONE  # no usage asked


def test_aborted_stream_gets_a_closing_chunk():
    call = API.to_call({"messages": [{"role": "user", "content": "hi"}]}, Endpoint.CHAT)
    reply = Reply(call, "m", 123)
    raw = reply.end_events(finished(FinishReason.ABORT, completion=0))
    [chunk] = events(raw)
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"][0]["finish_reason"] == "abort"
    assert raw.endswith(DONE)
