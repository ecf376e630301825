"""vLLM's LoRA surface over HTTP: load and unload endpoints, adapters as models, the info gauge.

With `--enable-lora` (vLLM also asks VLLM_ALLOW_RUNTIME_LORA_UPDATING=True for the
endpoints; the emulator serves them whenever LoRA is on):

- POST /v1/load_lora_adapter {"lora_name", "lora_path"}: 200 with vLLM's text
  "Success: LoRA adapter 'NAME' added successfully.", or 400 with vLLM's message (a
  missing field, a name taken, a bad folder, a rank above `--max-lora-rank`);
- POST /v1/unload_lora_adapter {"lora_name"}: 200 "... removed successfully.", or 400;
- GET /v1/models lists each adapter after the base model, as vLLM does: `root` its
  path, `parent` the base model;
- `vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters, max_lora}`:
  a gauge whose value is the time of the scrape (vLLM sets it to the current time),
  its labels the adapters of the running and the waiting requests, comma-joined.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from memorywall.errors import MemorywallError
from memorywall.server.engine.api import LoraError, LoraRegistry

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ErrorReply = Callable[[MemorywallError], web.Response]


def lora_routes(registry: LoraRegistry, error_reply: ErrorReply) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) for vLLM's two adapter endpoints."""

    async def body_of(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise LoraError("request body: not valid JSON") from None
        if not isinstance(body, dict):
            raise LoraError("request body: must be a JSON object")
        return body

    async def load(request: web.Request) -> web.Response:
        try:
            body = await body_of(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise LoraError("Both 'lora_name' and 'lora_path' must be provided.")
            registry.load(name, path)
        except MemorywallError as e:
            return error_reply(e)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(request: web.Request) -> web.Response:
        try:
            body = await body_of(request)
            name = body.get("lora_name")
            if not isinstance(name, str) or not name:
                raise LoraError("'lora_name' needs to be provided to unload a LoRA adapter.")
            registry.unload(name)
        except MemorywallError as e:
            return error_reply(e)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    return [
        ("POST", "/v1/load_lora_adapter", load),
        ("POST", "/v1/unload_lora_adapter", unload),
    ]


def adapter_models(registry: LoraRegistry, base: str, created: int) -> list[dict[str, Any]]:
    """`/v1/models` entries for the served adapters (vLLM's ModelCard for a LoRA)."""
    return [
        {
            "id": s.adapter.name,
            "object": "model",
            "created": created,
            "owned_by": "memorywall",
            "root": s.path,
            "parent": base,
            "max_model_len": None,
            "permission": [],
        }
        for s in registry.served()
    ]


class LoraInfoMetrics:
    """`vllm:lora_requests_info`, built when scraped from `state()`: the adapters of the
    running and the waiting requests (`api.lora_state` of the engine core). vLLM's labels
    only: no `model_name`, as vLLM's gauge has none."""

    def __init__(self, max_loras: int, state: Callable[[], tuple[list[str], list[str]]]) -> None:
        self._max_loras = max_loras
        self._state = state

    def collect(self) -> Iterator[Metric]:
        running, waiting = self._state()
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        family.add_metric([str(self._max_loras), ",".join(waiting), ",".join(running)], time.time())
        yield family
