"""The OpenAI surface beyond one plain sample: `n`, logprobs, echo, tool calls, stop strings,
/tokenize and /detokenize. Against the in-memory twin, through HTTP and the official `openai`
client's typed models; tool arguments checked against their schemas with hypothesis."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator

import aiohttp
import pytest
from engine_fakes import model_card
from hypothesis import given, settings
from hypothesis import strategies as st

from memorywall.server.engine.api import token_text
from memorywall.server.engine.twin import TwinEngine
from memorywall.server.fronts.http_front import HttpSite, OpenAIFront
from memorywall.server.fronts.logprobs import distribution
from memorywall.server.fronts.openai_api import Endpoint, OpenAIApi
from memorywall.server.fronts.tokenizer import ApproximateTokenizer
from memorywall.server.fronts.tool_calls import SchemaError, arguments, choose_tool, validate

openai = pytest.importorskip("openai")

CARD = model_card()
API = OpenAIApi(CARD, ApproximateTokenizer(CARD.vocab_size))
USER = [{"role": "user", "content": "what is the weather in Paris?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "days", "unit"],
}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}}]


@pytest.fixture
async def twin_url() -> AsyncIterator[tuple[TwinEngine, str]]:
    twin = TwinEngine(ttft_s=0.05, itl_s=0.01)
    site = HttpSite(OpenAIFront(twin, CARD, ApproximateTokenizer(CARD.vocab_size)).app())
    port = await site.start("127.0.0.1", 0)
    yield twin, f"http://127.0.0.1:{port}"
    await site.stop()


@pytest.fixture
async def client(twin_url) -> AsyncIterator[openai.AsyncOpenAI]:
    c = openai.AsyncOpenAI(base_url=f"{twin_url[1]}/v1", api_key="x", max_retries=0, timeout=10)
    yield c
    await c.close()


# --- n ---------------------------------------------------------------------------------------


def test_n_makes_one_request_per_sample_with_distinct_seeds():
    call = API.to_call({"prompt": "hi", "n": 3, "seed": 10}, Endpoint.COMPLETIONS, "abc")
    assert [c.request.request_id for c in call.choices] == ["0_abc", "1_abc", "2_abc"]
    assert [c.request.sampling_seed for c in call.choices] == [10, 11, 12]
    unseeded = API.to_call({"prompt": "hi", "n": 2}, Endpoint.COMPLETIONS, "abc")
    assert [c.request.sampling_seed for c in unseeded.choices] == [0, 1]
    one = API.to_call({"prompt": "hi"}, Endpoint.COMPLETIONS, "abc")
    assert one.request.request_id == "abc" and one.request.sampling_seed is None


async def test_n_choices_are_counted_in_usage(client, twin_url):
    twin, _ = twin_url
    out = await client.completions.create(
        model="m", prompt="hi", n=3, max_tokens=4, seed=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) == 3  # independent samples
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(twin.submitted[0].prompt_ids)


async def test_n_streams_with_an_index_per_choice(client):
    stream = await client.chat.completions.create(
        model="m",
        messages=USER,
        n=2,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    usage = None
    async for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert finishes == {0: "length", 1: "length"}
    assert all(len(t.split()) == 3 for t in text.values()) and text[0] != text[1]
    assert usage.completion_tokens == 6


# --- logprobs --------------------------------------------------------------------------------


def test_synthetic_distribution_is_deterministic_and_valid():
    dist = distribution(17, 3, 5, 1000)
    assert dist == distribution(17, 3, 5, 1000)
    assert dist[0][0] == 17
    lps = [lp for _, lp in dist]
    assert lps == sorted(lps, reverse=True)
    assert sum(math.exp(lp) for lp in lps) <= 1.0


async def test_chat_logprobs_parse_through_the_typed_models(client):
    out = await client.chat.completions.create(
        model="m",
        messages=USER,
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == t.logprob <= 0
        assert bytes(t.bytes).decode() == t.token
    again = await client.chat.completions.create(
        model="m", messages=USER, max_tokens=4, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert again.choices[0].logprobs == out.choices[0].logprobs


async def test_completion_logprobs_streamed_and_whole_agree(client):
    body = dict(model="m", prompt="hi", max_tokens=5, logprobs=2, extra_body={"ignore_eos": True})
    whole = (await client.completions.create(**body)).choices[0]
    lp = whole.logprobs
    assert lp.tokens and "".join(lp.tokens) == whole.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(
        len(top) <= 2 and tok in top for tok, top in zip(lp.tokens, lp.top_logprobs, strict=True)
    )
    streamed = [c async for c in await client.completions.create(**body, stream=True)]
    tokens = [t for c in streamed if c.choices for t in c.choices[0].logprobs.tokens]
    values = [v for c in streamed if c.choices for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == lp.tokens and values == lp.token_logprobs


# --- echo ------------------------------------------------------------------------------------


async def test_echo_writes_the_prompt_before_the_output(client):
    out = await client.completions.create(
        model="m", prompt="hello wafer", max_tokens=2, echo=True, logprobs=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = out.choices[0]
    assert choice.text.startswith("hello wafer") and len(choice.text.split()) == 4
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    stream = await client.completions.create(
        model="m", prompt=[5, 6], max_tokens=2, echo=True, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].text.startswith(token_text(5) + token_text(6))


# --- stop strings ----------------------------------------------------------------------------


async def test_a_stop_string_ends_the_text_and_aborts_the_request(client, twin_url):
    twin, _ = twin_url
    full = await client.completions.create(
        model="m", prompt="hi", max_tokens=20, extra_body={"ignore_eos": True}
    )
    words = full.choices[0].text.split(" ")
    stop = " " + words[4]  # the fourth generated word (text starts with a space)
    cut = full.choices[0].text.index(stop)
    for stream in (False, True):
        twin.aborted.clear()
        body = dict(model="m", prompt="hi", max_tokens=20, stop=[stop, "zzz"])
        out = await client.completions.create(
            **body, stream=stream, extra_body={"ignore_eos": True}
        )
        if stream:
            chunks = [c async for c in out]
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            last = [c.choices[0] for c in chunks if c.choices][-1]
        else:
            text, last = out.choices[0].text, out.choices[0]
        assert text == full.choices[0].text[:cut]
        assert last.finish_reason == "stop"
        assert last.model_extra["stop_reason"] == stop
        assert len(twin.aborted) == 1  # the engine did not generate the other 16 tokens


# --- tools -----------------------------------------------------------------------------------


async def test_a_required_tool_call_parses_and_validates(client):
    for stream in (False, True):
        out = await client.chat.completions.create(
            model="m", messages=USER, tools=TOOLS, tool_choice="required", stream=stream
        )
        if stream:
            chunks = [c async for c in out]
            deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            name = deltas[0].function.name
            args = "".join(d.function.arguments or "" for d in deltas)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            (call,) = out.choices[0].message.tool_calls
            assert out.choices[0].message.content is None and call.type == "function"
            name, args, finish = call.function.name, call.function.arguments, None
            finish = out.choices[0].finish_reason
        assert name == "weather" and finish == "tool_calls"
        assert validate(json.loads(args), WEATHER) == []


async def test_tool_choice_none_named_and_auto(client):
    out = await client.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=3
    )
    assert not out.choices[0].message.tool_calls and out.choices[0].message.content
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}
    named = {"type": "function", "function": {"name": "noop"}}
    out = await client.chat.completions.create(
        model="m", messages=USER, tools=[*TOOLS, other], tool_choice=named
    )
    assert out.choices[0].message.tool_calls[0].function.arguments == "{}"
    # auto decides by seed: some seeds call, some answer, each the same every time
    calls = []
    for seed in range(8):
        out = await client.chat.completions.create(
            model="m", messages=USER, tools=TOOLS, seed=seed, max_tokens=50
        )
        calls.append(bool(out.choices[0].message.tool_calls))
    assert 0 < sum(calls) < 8
    again = await client.chat.completions.create(
        model="m", messages=USER, tools=TOOLS, seed=0, max_tokens=50
    )
    assert bool(again.choices[0].message.tool_calls) == calls[0]


def test_choose_tool_is_deterministic():
    tools = [object(), object()]
    assert choose_tool(tools, "required", (1,)) is choose_tool(tools, "required", (1,))
    assert choose_tool(tools, "none", (1,)) is None


def test_unsatisfiable_schemas_are_refused():
    for bad in (
        {"type": "object", "required": ["a"], "properties": {"a": {"type": "date"}}},
        {"type": "array", "minItems": 3, "maxItems": 1},
        {"type": "string"},
    ):
        with pytest.raises(SchemaError):
            arguments(bad, (0,))


_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(-50, 50).flatmap(
        lambda lo: st.integers(lo, lo + 100).map(
            lambda hi: {"type": "integer", "minimum": lo, "maximum": hi}
        )
    ),
    st.floats(-1e6, 1e6).map(lambda lo: {"type": "number", "minimum": lo, "maximum": lo + 1}),
    st.integers(0, 30).map(lambda n: {"type": "string", "minLength": n}),
    st.integers(1, 30).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(st.text(max_size=5), min_size=1, max_size=4, unique=True).map(lambda xs: {"enum": xs}),
    st.just({"type": ["string", "null"]}),
    st.just({"anyOf": [{"type": "integer"}, {"type": "string"}]}),
)


def _object(children):
    return st.dictionaries(st.text(min_size=1, max_size=8), children, max_size=5).flatmap(
        lambda props: st.sets(st.sampled_from(sorted(props)) if props else st.nothing()).map(
            lambda req: {
                "type": "object",
                "properties": props,
                "required": sorted(req),
                "additionalProperties": False,
            }
        )
    )


_schema = st.recursive(
    _leaf,
    lambda children: st.one_of(
        _object(children),
        children.map(lambda items: {"type": "array", "items": items, "minItems": 1}),
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(schema=_object(_schema), seed=st.integers(0, 2**32))
def test_generated_arguments_always_validate(schema, seed):
    value = arguments(schema, (seed,))
    assert validate(value, schema) == []
    assert json.loads(json.dumps(value)) == value
    assert arguments(schema, (seed,)) == value


# --- /tokenize and /detokenize ---------------------------------------------------------------


async def test_tokenize_and_detokenize_in_vllms_shapes(twin_url):
    _, url = twin_url
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{url}/tokenize", json={"model": "m", "prompt": "hello wafer"}) as r:
            assert r.status == 200
            out = await r.json()
        assert out == {
            "count": 3,
            "max_model_len": CARD.context_window,
            "tokens": list(API.tokenizer.encode("hello wafer")),
            "token_strs": None,
        }
        async with s.post(f"{url}/tokenize", json={"messages": USER}) as r:
            chat = await r.json()
        assert chat["count"] > out["count"]
        async with s.post(f"{url}/detokenize", json={"tokens": [5, 6]}) as r:
            assert await r.json() == {"prompt": token_text(5) + token_text(6)}
        async with s.post(f"{url}/detokenize", json={"tokens": [10**9]}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "tokens"
        async with s.post(f"{url}/tokenize", json={"prompt": 5}) as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "prompt"


def test_the_call_keeps_its_own_id():
    call = API.to_call({"prompt": "hi"}, Endpoint.COMPLETIONS, "0_x")
    assert call.request_id == "0_x" and call.request.request_id == "0_x"
    call = API.to_call({"prompt": "hi", "n": 2}, Endpoint.COMPLETIONS, "x")
    assert call.request_id == "x"
