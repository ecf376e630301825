"""KServe v2 HTTP/REST with Triton's generate extension, on the HTTP front's port.

Routes: GET /v2, /v2/health/live, /v2/health/ready, POST /v2/repository/index,
GET /v2/models/{m},
/v2/models/{m}/ready, /v2/models/{m}/config; POST /v2/models/{m}/infer (JSON
tensors, with the binary tensor data extension tritonclient uses by default),
/v2/models/{m}/generate (one JSON object) and /v2/models/{m}/generate_stream (a
server-sent event per token). A model name may hold slashes. Errors are
`{"error": message}` with the status of the shared table (400 for any bad tensor,
parameter or body).

The generate extension maps a JSON body to tensors as Triton does: each top-level
key but `parameters` and `id` is an input of that name (a value, or a list of
values), `parameters` are the request's parameters; each response is an object of
the outputs' values plus `model_name`, `model_version` and, on the last,
memorywall's summary parameters.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web
from google.protobuf.json_format import MessageToDict

from memorywall import __version__
from memorywall.errors import InvalidRequestError, MemorywallError
from memorywall.server.engine.api import EngineClient, Finished, ModelCard, TokenGroup
from memorywall.server.fronts.kserve_grpc import EXTENSIONS, model_config
from memorywall.server.fronts.kserve_grpc import ready as engine_ready
from memorywall.server.fronts.kserve_tensors import (
    DATATYPES,
    INPUTS,
    OUTPUTS,
    GenerateCall,
    KServeApi,
    Piece,
    Tensor,
    decode_raw,
    encode_raw,
    merge,
    output_tensors,
    per_token,
    piece_of,
    summary_parameters,
)
from memorywall.server.fronts.status import http_fault, http_headers, http_status
from memorywall.server.fronts.tokenizer import PromptTokenizer

HEADER_LENGTH = "Inference-Header-Content-Length"


def error_reply(error: MemorywallError) -> web.Response:
    return web.json_response(
        {"error": str(error)}, status=http_status(error), headers=http_headers(error)
    )


class KServeHttp:
    """KServe v2 routes over `engine`, to add to an aiohttp application."""

    def __init__(self, engine: EngineClient, card: ModelCard, tokenizer: PromptTokenizer) -> None:
        self.engine = engine
        self.card = card
        self.api = KServeApi(card, tokenizer, protocol="kserve-http")

    def add_routes(self, app: web.Application, expect_handler=None) -> None:
        # Suffixed routes first: `{model:.+}` alone would swallow "m/ready".
        model = "/v2/models/{model:.+}"
        routes = [
            ("GET", "/v2", self.server_metadata),
            ("GET", "/v2/health/live", self.live),
            ("GET", "/v2/health/ready", self.ready),
            ("POST", "/v2/repository/index", self.repository_index),
            ("GET", f"{model}/ready", self.model_ready),
            ("GET", f"{model}/config", self.model_config),
            ("POST", f"{model}/infer", self.infer),
            ("POST", f"{model}/generate", self.generate),
            ("POST", f"{model}/generate_stream", self.generate_stream),
            ("GET", model, self.model_metadata),
        ]
        for method, path, handler in routes:
            app.router.add_route(method, path, handler, expect_handler=expect_handler)

    # --- health and metadata ---------------------------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        body = {"name": "memorywall", "version": __version__, "extensions": list(EXTENSIONS)}
        return web.json_response(body)

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if engine_ready(self.engine) else 503)

    async def repository_index(self, request: web.Request) -> web.Response:
        """The one served model, READY (Triton's model repository extension)."""
        return web.json_response([{"name": self.card.model, "version": "1", "state": "READY"}])

    async def model_ready(self, request: web.Request) -> web.Response:
        served = request.match_info["model"] == self.card.model
        return web.Response(status=200 if served and engine_ready(self.engine) else 400)

    async def model_metadata(self, request: web.Request) -> web.Response:
        try:
            self.api.check_model(request.match_info["model"])
        except MemorywallError as e:
            return error_reply(e)

        def meta(s) -> dict:
            return {"name": s.name, "datatype": s.datatype, "shape": list(s.dims)}

        return web.json_response(
            {
                "name": self.card.model,
                "versions": ["1"],
                "platform": "memorywall",
                "inputs": [meta(s) for s in INPUTS.values()],
                "outputs": [meta(s) for s in OUTPUTS.values()],
            }
        )

    async def model_config(self, request: web.Request) -> web.Response:
        try:
            self.api.check_model(request.match_info["model"])
        except MemorywallError as e:
            return error_reply(e)
        return web.json_response(
            MessageToDict(
                model_config(self.card),
                preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True,
            )
        )

    # --- inference -------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.StreamResponse:
        arrival_s = self.engine.now()
        try:
            self.api.check_model(request.match_info["model"])
            body, blobs = await _infer_body(request)
            inputs = body.get("inputs")
            if not isinstance(inputs, list):
                raise InvalidRequestError("inputs: required, a list of tensors")
            tensors = _json_tensors(inputs, blobs)
            outputs = body.get("outputs", [])
            if not isinstance(outputs, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
            ):
                raise InvalidRequestError("outputs: must be a list of {name: ...} objects")
            parameters = _parameters(body)
            binary_all = parameters.pop("binary_data_output", False) is True
            binary = {
                o["name"]
                for o in outputs
                if binary_all or (o.get("parameters") or {}).get("binary_data") is True
            }
            call = self.api.to_call(tensors, parameters, [o["name"] for o in outputs])
            if binary_all and not outputs:
                binary = set(call.outputs)
            if call.stream:
                raise InvalidRequestError(
                    "input 'stream': infer answers once; stream with generate_stream"
                )
            events = self._submit(request, call, arrival_s)
        except MemorywallError as e:
            return error_reply(e)
        try:
            piece, finished = await _collect(events)
        except MemorywallError as e:
            return error_reply(e)
        finally:
            events.close()
        reply: dict[str, Any] = {"model_name": self.card.model, "model_version": "1"}
        if isinstance(body.get("id"), str):
            reply["id"] = body["id"]
        reply["parameters"] = summary_parameters(finished)
        reply["outputs"] = []
        raw_outputs: list[bytes] = []
        for t in output_tensors(call, piece, first=True):
            out: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            if t.name in binary:  # binary tensor data extension: raw bytes after the JSON
                raw_outputs.append(encode_raw(t))
                out["parameters"] = {"binary_data_size": len(raw_outputs[-1])}
            else:
                out["data"] = list(t.values)
            reply["outputs"].append(out)
        if not raw_outputs:
            return web.json_response(reply)
        header = json.dumps(reply, separators=(",", ":")).encode()
        return web.Response(
            body=header + b"".join(raw_outputs),
            headers={HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
        )

    async def generate(self, request: web.Request) -> web.StreamResponse:
        arrival_s = self.engine.now()
        return await self._generate(request, arrival_s, stream=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        arrival_s = self.engine.now()
        return await self._generate(request, arrival_s, stream=True)

    async def _generate(
        self, request: web.Request, arrival_s: float, *, stream: bool
    ) -> web.StreamResponse:
        try:
            self.api.check_model(request.match_info["model"])
            body = await _json(request)
            if not isinstance(body, dict):
                raise InvalidRequestError("request body: must be a JSON object")
            call = self.api.to_call(
                _generate_tensors(body), _parameters(body), stream_default=stream
            )
            if call.stream and not stream:
                raise InvalidRequestError(
                    "stream: generate answers once; stream with generate_stream"
                )
            events = self._submit(request, call, arrival_s)
        except MemorywallError as e:
            return error_reply(e)
        try:
            if not stream:
                piece, finished = await _collect(events)
                return web.json_response(self._generate_body(call, piece, True, finished))
            return await self._sse(request, call, events)
        except MemorywallError as e:
            return error_reply(e)
        finally:
            # Cancelled or client gone (aiohttp cancels the handler): free slot and KV now.
            events.close()

    async def _sse(self, request: web.Request, call: GenerateCall, events) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        # Headers go out now, not with the first token: clients start TTFT clocks on them.
        await response.prepare(request)
        try:
            first, held = True, None
            try:
                async for event in events:
                    if isinstance(event, Finished):
                        body: dict[str, Any]
                        if held is not None:
                            body = self._generate_body(call, held, first, event)
                        else:
                            body = {"model_name": self.card.model, "model_version": "1"}
                            body.update(summary_parameters(event))
                        await response.write(_event(body))
                        break
                    if not call.stream:
                        held = merge([held, piece_of(event)] if held else [piece_of(event)])
                        continue
                    for piece in per_token(event):
                        if piece.finish_reason is not None:
                            held = piece  # waits for Finished: it carries the summary
                            continue
                        await response.write(_event(self._generate_body(call, piece, first)))
                        first = False
            except MemorywallError as e:  # the server drained before the request finished
                await response.write(_event({"error": str(e)}))
        except ConnectionResetError:
            pass  # the client left; the caller aborts the request
        return response

    def _submit(self, request: web.Request, call: GenerateCall, arrival_s: float):
        """`call` submitted with the request's fault header; the caller closes the stream."""
        return self.engine.submit(
            call.request, arrival_s=arrival_s, fault=http_fault(request.headers)
        )

    def _generate_body(
        self, call: GenerateCall, piece: Piece, first: bool, finished: Finished | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model_name": self.card.model, "model_version": "1"}
        for t in output_tensors(call, piece, first=first):
            body[t.name] = t.values[0] if t.shape == (1,) else list(t.values)
        if finished is not None:
            body.update(summary_parameters(finished))
        return body


async def _collect(events) -> tuple[Piece, Finished]:
    pieces: list[Piece] = []
    async for event in events:
        if isinstance(event, TokenGroup):
            pieces.append(piece_of(event))
        else:
            empty = Piece((), "", (), event.prompt_tokens, event.reason)
            return (merge(pieces) if pieces else empty), event
    raise AssertionError("a request stream ends with Finished")


def _event(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _read(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.RequestPayloadError as e:
        raise InvalidRequestError(f"request body: unreadable ({e})") from None


async def _json(request: web.Request) -> Any:
    return _loads(await _read(request))


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequestError(f"request body: not valid JSON ({e})") from None


async def _infer_body(request: web.Request) -> tuple[dict, bytes]:
    """The JSON part of an infer body and the binary data after it (binary tensor data
    extension: `Inference-Header-Content-Length` says where the JSON ends)."""
    raw = await _read(request)
    length = request.headers.get(HEADER_LENGTH)
    if length is None:
        header, blobs = raw, b""
    else:
        if not length.isdigit() or int(length) > len(raw):
            raise InvalidRequestError(f"{HEADER_LENGTH}: {length!a} is not a length in the body")
        header, blobs = raw[: int(length)], raw[int(length) :]
    body = _loads(header)
    if not isinstance(body, dict):
        raise InvalidRequestError("request body: must be a JSON object")
    return body, blobs


def _json_tensors(inputs: list, blobs: bytes) -> list[Tensor]:
    tensors, offset = [], 0
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidRequestError(f"{where}: must be an object with a string name")
        name, datatype, shape = t["name"], t.get("datatype"), t.get("shape")
        if datatype not in DATATYPES:
            raise InvalidRequestError(f"input {name!r}: unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidRequestError(f"input {name!r}: shape must be a list of sizes")
        params = t.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or offset + size > len(blobs):
                raise InvalidRequestError(f"input {name!r}: binary_data_size {size!r} is wrong")
            values = decode_raw(name, datatype, shape, blobs[offset : offset + size])
            offset += size
        else:
            values = _flatten(name, t.get("data"))
        tensors.append(Tensor(name, datatype, tuple(shape), values))
    return tensors


def _flatten(name: str, data: Any) -> list:
    if not isinstance(data, list):
        raise InvalidRequestError(f"input {name!r}: data must be a list")
    out: list = []
    stack = [iter(data)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            out.append(v)
        else:
            stack.pop()
    return out


def _generate_tensors(body: dict[str, Any]) -> list[Tensor]:
    """Generate-extension keys as input tensors, typed as the model declares them."""
    tensors = []
    for name, value in body.items():
        if name in ("parameters", "id"):
            continue
        spec = INPUTS.get(name)
        values = value if isinstance(value, list) else [value]
        datatype = spec.datatype if spec is not None else "BYTES"
        tensors.append(Tensor(name, datatype, (len(values),), values))
    return tensors


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidRequestError("parameters: must be an object")
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"parameters.{key}: must be finite")
    return params
