"""POST /v1/responses on the in-memory twin, through the official `openai` client's typed
models: text and message input, usage, the length limit, streaming events, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from engine_fakes import model_card

from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
from memorywall.server.fronts.openai_api import FieldError
from memorywall.server.fronts.openai_responses import chat_body
from memorywall.server.fronts.tokenizer import ApproximateTokenizer

openai = pytest.importorskip("openai")

CARD = model_card()


@pytest.fixture
async def twin_client() -> AsyncIterator[tuple[TwinEngine, openai.AsyncOpenAI]]:
    twin = TwinEngine(ttft_s=0.02, itl_s=0.005)
    site = HttpSite(OpenAIFront(twin, CARD, ApproximateTokenizer(CARD.vocab_size)).app())
    port = await site.start("127.0.0.1", 0)
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=10
    )
    yield twin, client
    await client.close()
    await site.stop()


def test_chat_body_from_a_responses_body():
    body = {
        "model": "m",
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": "hi"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "yo"}],
            },
            {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
        ],
        "max_output_tokens": 7,
        "temperature": 0.5,
    }
    assert chat_body(body) == {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "more"},
        ],
        "stream": False,
        "model": "m",
        "temperature": 0.5,
        "max_completion_tokens": 7,
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({}, "input"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
    ],
)
def test_bodies_not_emulated_are_a_field_error(body, param):
    with pytest.raises(FieldError) as e:
        chat_body(body)
    assert e.value.param == param


async def test_text_input_gives_output_text_and_usage(twin_client):
    twin, client = twin_client
    out = await client.responses.create(
        model=CARD.model, input="hello there", max_output_tokens=6, extra_body={"ignore_eos": True}
    )
    assert out.object == "response" and out.id.startswith("resp_")
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert out.output_text and out.output[0].role == "assistant"
    prompt = len(twin.submitted[0].prompt_ids)
    assert (out.usage.input_tokens, out.usage.output_tokens) == (prompt, 6)
    assert out.usage.total_tokens == prompt + 6


async def test_a_stop_token_completes(twin_client):
    twin, client = twin_client
    await client.responses.create(model=CARD.model, input="hi", max_output_tokens=1)
    prompt = len(twin.submitted[0].prompt_ids)
    third = (7 + 31 * (prompt + 2)) % 1000  # the twin's third token for this prompt
    out = await client.responses.create(
        model=CARD.model, input="hi", max_output_tokens=50, extra_body={"stop_token_ids": [third]}
    )
    assert out.status == "completed" and out.incomplete_details is None
    assert out.usage.output_tokens == 3


async def test_streaming_events_in_order(twin_client):
    _, client = twin_client
    stream = await client.responses.create(
        model=CARD.model,
        input=[{"role": "user", "content": "stream please"}],
        max_output_tokens=5,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    done = events[-1].response
    assert "".join(deltas) == events[-4].text == done.output_text
    assert done.usage.output_tokens == 5


async def test_unknown_model_and_bad_body_statuses(twin_client):
    _, client = twin_client
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError) as e:
        await client.responses.create(model=CARD.model, input="hi", previous_response_id="r1")
    assert "previous_response_id" in str(e.value)
