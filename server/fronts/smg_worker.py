"""What the smg gateway's worker services share, whichever engine they speak for.

SGLang's scheduler service (`sglang_servicer`), vLLM's engine service
(`vllm_servicer`) and TensorRT-LLM's worker service (`trtllm_servicer`) differ in
their messages, not in what they ask of the engine: a request of prompt ids in,
token groups out, errors through the one status table, the tokenizer shipped as a
zip, prefix-cache events streamed. `generate` is that one call; `TokenizerCache`
builds the zip once per servicer; `stream_chunk` and `complete` fill the messages all
three define with the same fields, each service's own class passed in.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from smg_grpc_proto.generated import common_pb2

from memorywall.errors import InvalidRequestError, MemorywallError
from memorywall.server.engine.api import (
    BlockRemoved,
    BlockStored,
    EngineClient,
    EventStream,
    FaultRule,
    Finished,
    FinishReason,
    KVEvent,
    ModelCard,
    TokenGroup,
)
from memorywall.server.fronts.sglang_tokenizer import TokenizerZip, tokenizer_zip
from memorywall.server.fronts.status import grpc_fault, grpc_status, grpc_trailers

TOKENIZER_CHUNK_BYTES = 512 * 1024
Message = Any  # a service's own response message class
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.ABORT: "abort"}


def prompt_ids(ids: Sequence[int], card: ModelCard, field: str) -> tuple[int, ...]:
    """A request's prompt ids, checked against the vocabulary; InvalidRequestError if not."""
    prompt = tuple(ids)
    if not prompt:
        raise InvalidRequestError(f"{field}: empty (this worker takes token ids)")
    vocab = card.vocab_size
    bad = next((t for t in prompt if t >= vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token id {bad} is outside the vocabulary of {vocab}")
    return prompt


async def generate(
    context: grpc.aio.ServicerContext,
    submit: Callable[[FaultRule | None], EventStream],
    *,
    streaming: bool,
    chunk: Callable[[TokenGroup], Message],
    final: Callable[[Finished, list[int]], Message],
) -> AsyncGenerator[Message, None]:
    """One `Generate` call of a worker service: the messages to send, in order.

    `submit(fault)` builds the request and submits it (to the engine, or to a PD
    pair) with the call's fault header; `chunk` wraps each token group when
    `streaming`, `final` wraps the finish with every output id so far (each
    service decides what its final message repeats). A `MemorywallError` (from
    building, submitting or the stream) aborts the call with its status from the
    table. Initial metadata goes out at once: a gateway starts its TTFT clock on
    it. The stream is closed however the call ends (done, cancelled, client gone),
    which frees the slot and KV.
    """
    try:
        stream = submit(grpc_fault(context))
    except MemorywallError as e:
        await context.abort(grpc_status(e), str(e), trailing_metadata=grpc_trailers(e))
    try:
        await context.send_initial_metadata(())
        output: list[int] = []
        async for event in stream:
            if isinstance(event, TokenGroup):
                output.extend(event.token_ids)
                if streaming:
                    yield chunk(event)
            else:
                yield final(event, output)
    except MemorywallError as e:
        await context.abort(grpc_status(e), str(e), trailing_metadata=grpc_trailers(e))
    finally:
        stream.close()


class TokenizerCache:
    """The card's tokenizer as a zip, built once off the event loop (about a second for a
    128k vocabulary); shielded, so a caller that goes away mid-build does not cancel it
    for the next."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self._zip: asyncio.Future[TokenizerZip] | None = None

    async def bundle(self) -> TokenizerZip:
        if self._zip is None:
            self._zip = asyncio.ensure_future(asyncio.to_thread(tokenizer_zip, self.card))
        return await asyncio.shield(self._zip)

    async def chunks(self, chunk_type) -> AsyncIterator:
        """The zip as `chunk_type(data=..., sha256=...)` messages, the digest on the last."""
        bundle = await self.bundle()
        data = bundle.data
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = start + TOKENIZER_CHUNK_BYTES
            yield chunk_type(data=data[start:end], sha256=bundle.sha256 if end >= len(data) else "")


def stream_chunk(chunk_type, group: TokenGroup):
    """One token group as the service's `GenerateStreamChunk` (`chunk_type`)."""
    return chunk_type(
        token_ids=group.token_ids,
        prompt_tokens=group.prompt_tokens,
        completion_tokens=group.completion_tokens,
        cached_tokens=group.cached_tokens,
    )


def complete(complete_type, f: Finished, ids, *, ids_field: str = "output_ids"):
    """The finish as the service's `GenerateComplete` (`complete_type`); the output ids go
    in `ids_field` (TensorRT-LLM names it `output_token_ids`)."""
    out = complete_type(
        finish_reason=FINISH[f.reason],
        prompt_tokens=f.prompt_tokens,
        completion_tokens=f.completion_tokens,
        cached_tokens=f.cached_tokens,
        **{ids_field: ids},
    )
    if f.reason is FinishReason.STOP and f.last_token_id is not None:
        out.matched_token_id = f.last_token_id
    return out


def kv_event(event: KVEvent, event_id: int) -> common_pb2.KvCacheEvent:
    """One engine KV event as SGLang's KvCacheEvent."""
    if isinstance(event, BlockStored):
        size = event.block_size
        blocks = [
            common_pb2.KvBlock(
                block_hash=h, token_ids=event.token_ids[i * size : (i + 1) * size], block_size=size
            )
            for i, h in enumerate(event.block_hashes)
        ]
        stored = common_pb2.KvBlocksStored(blocks=blocks)
        if event.parent_block_hash is not None:
            stored.parent_block_hash = event.parent_block_hash
        return common_pb2.KvCacheEvent(event_id=event_id, stored=stored)
    if isinstance(event, BlockRemoved):
        removed = common_pb2.KvBlocksRemoved(block_hashes=event.block_hashes)
        return common_pb2.KvCacheEvent(event_id=event_id, removed=removed)
    return common_pb2.KvCacheEvent(event_id=event_id, cleared=common_pb2.KvCacheCleared())


async def kv_event_batches(engine: EngineClient) -> AsyncIterator[common_pb2.KvEventBatch]:
    """The engine's prefix-cache events from now on, one batch per wake-up of the reader."""
    queue: asyncio.Queue[KVEvent] = asyncio.Queue()
    unsubscribe = engine.subscribe_kv_events(queue.put_nowait)
    event_ids = itertools.count()
    try:
        for sequence in itertools.count():
            events = [await queue.get()]
            while not queue.empty():
                events.append(queue.get_nowait())
            yield common_pb2.KvEventBatch(
                sequence_number=sequence,
                timestamp=time.time(),
                events=[kv_event(e, next(event_ids)) for e in events],
            )
    finally:
        unsubscribe()


class WorkerRpcs:
    """The RPCs the SGLang, vLLM and TensorRT-LLM worker services answer alike (their proto
    messages are shared in `common_pb2`); a servicer mixes this in before its generated base
    and sets `engine` and `tokenizer`."""

    engine: EngineClient
    tokenizer: TokenizerCache

    async def GetTokenizer(self, request, context):
        async for chunk in self.tokenizer.chunks(common_pb2.GetTokenizerChunk):
            yield chunk

    async def SubscribeKvEvents(self, request, context):
        await context.send_initial_metadata(())  # the subscription is open from here
        async for batch in kv_event_batches(self.engine):
            yield batch
