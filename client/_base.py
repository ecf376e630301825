"""The I/O-free half of both clients: request building and validation, errors, health."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Required, TypedDict

import grpc
from grpc_health.v1 import health_pb2

from memorywall.client import _errors as errors
from memorywall.client._types import SamplingParams
from memorywall.errors import ConfigError
from memorywall.v1 import engine_pb2 as pb

ChannelOptions = Sequence[tuple[str, Any]]
HEALTH_REQUEST = health_pb2.HealthCheckRequest(service="")
# Codes that mean "not healthy" to a probe rather than a failed probe: down, unknown, hung.
_UNHEALTHY_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
_UINT32_MAX = 2**32 - 1
_FLOAT_SAMPLING = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)

# The one place a gRPC status becomes an exception class; anything unlisted is ClientError.
STATUS_ERRORS: dict[grpc.StatusCode, type[errors.ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: errors.InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: errors.InvalidRequest,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}


def translate(exc: grpc.RpcError) -> errors.ClientError:
    """The client error for a failed RPC, chosen by status code alone."""
    code = exc.code()
    return STATUS_ERRORS.get(code, errors.ClientError)(code, exc.details() or "")


class GenerateArgs(TypedDict, total=False):
    """The keyword arguments of `generate` / `complete` (see `build_generate_request`)."""

    prompt: str
    prompt_token_ids: Sequence[int]
    prompt_tokens: int
    max_tokens: Required[int]
    min_tokens: int
    ignore_eos: bool
    request_id: str
    model: str
    sampling: SamplingParams
    min_interval_s: float
    timeout_s: float


def _int(name: str, value: object, low: int, high: int) -> int:
    # bool is an int subclass; True as a token count is a bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _float(name: str, value: object, low: float = -math.inf) -> float:
    # bool first: it is an int subclass, and True as a number is a bug.
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < low
    ):
        raise ConfigError(f"{name} must be a finite number >= {low}, got {value!r}")
    return float(value)


def check_timeout(timeout_s: float | None) -> float | None:
    if timeout_s is not None and _float("timeout_s", timeout_s) <= 0:
        raise ConfigError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    return timeout_s


def _sampling_proto(s: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        stop=list(s.stop),
        stop_token_ids=[_int("stop_token_ids[]", t, 0, _UINT32_MAX) for t in s.stop_token_ids],
    )
    for name in _FLOAT_SAMPLING:
        if (value := getattr(s, name)) is not None:
            setattr(msg, name, _float(name, value))
    if s.top_k is not None:
        msg.top_k = _int("top_k", s.top_k, -(2**31), 2**31 - 1)
    if s.seed is not None:
        msg.seed = _int("seed", s.seed, 0, 2**64 - 1)
    if not all(isinstance(text, str) and text for text in s.stop):
        raise ConfigError(f"stop must hold non-empty strings, got {s.stop!r}")
    return msg


def build_generate_request(
    *,
    max_tokens: int,
    prompt: str | None = None,
    prompt_token_ids: Sequence[int] | None = None,
    prompt_tokens: int | None = None,
    min_tokens: int = 0,
    ignore_eos: bool = False,
    request_id: str | None = None,
    model: str = "",
    sampling: SamplingParams | None = None,
    min_interval_s: float = 0.0,
) -> pb.GenerateRequest:
    """Validate the arguments and build the request; raises `ConfigError` before any I/O.

    Exactly one prompt: `prompt` (text), `prompt_token_ids`, or `prompt_tokens`
    (a count, content irrelevant). `request_id` defaults to a fresh uuid4 hex.
    """
    prompts = dict(prompt=prompt, prompt_token_ids=prompt_token_ids, prompt_tokens=prompt_tokens)
    given = [name for name, value in prompts.items() if value is not None]
    if len(given) != 1:
        raise ConfigError(
            f"give exactly one of prompt, prompt_token_ids, prompt_tokens; got {given or 'none'}"
        )
    max_tokens = _int("max_tokens", max_tokens, 1, _UINT32_MAX)
    min_tokens = _int("min_tokens", min_tokens, 0, max_tokens)
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise ConfigError(f"request_id must be a non-empty string or None, got {request_id!r}")
    if not isinstance(model, str):
        raise ConfigError(f"model must be a string, got {model!r}")
    if not isinstance(ignore_eos, bool):
        raise ConfigError(f"ignore_eos must be a bool, got {ignore_eos!r}")
    if sampling is not None and not isinstance(sampling, SamplingParams):
        raise ConfigError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    req = pb.GenerateRequest(
        request_id=request_id,
        model=model,
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        sampling=_sampling_proto(sampling or SamplingParams()),
        stream_options=pb.StreamOptions(min_interval_s=_float("min_interval_s", min_interval_s, 0)),
    )
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"prompt must be a non-empty string, got {prompt!r}")
        req.text = prompt
    elif prompt_token_ids is not None:
        if isinstance(prompt_token_ids, str | bytes) or len(prompt_token_ids) == 0:
            raise ConfigError("prompt_token_ids must be a non-empty sequence of token ids")
        ids = [_int("prompt_token_ids[]", t, 0, _UINT32_MAX) for t in prompt_token_ids]
        req.token_ids.ids.extend(ids)
    else:
        req.token_count = _int("prompt_tokens", prompt_tokens, 1, _UINT32_MAX)
    return req


@dataclass(frozen=True, kw_only=True)
class Tls:
    """TLS to the server: PEM files. `ca`: the roots that sign the server's certificate
    (None: the system's); `cert` and `key`: this client's own, for servers that ask for one."""

    ca: Path | str | None = None
    cert: Path | str | None = None
    key: Path | str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("tls: give both cert and key, or neither")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"tls {name}: no such file {str(path)!r}")

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | str | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


class BaseClient:
    """What both clients hold: the target, the default deadline, the channel options, TLS
    and the API key (sent as `authorization: Bearer KEY` metadata on every call)."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float | None,
        options: ChannelOptions,
        tls: Tls | None = None,
        api_key: str | None = None,
    ) -> None:
        if not isinstance(target, str) or not target:
            raise ConfigError(f"target must be a non-empty 'host:port' string, got {target!r}")
        if tls is not None and not isinstance(tls, Tls):
            raise ConfigError(f"tls must be a Tls, got {type(tls).__name__}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.isprintable()):
            raise ConfigError("api_key must be a printable string")
        self.target = target
        self.timeout_s = check_timeout(timeout_s)
        self._options = list(options)
        self.tls = tls
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _deadline_s(self, timeout_s: float | None) -> float | None:
        """The per-call timeout if given, else the client default."""
        return self.timeout_s if timeout_s is None else check_timeout(timeout_s)

    def _prepare(self, args: dict[str, Any]) -> tuple[pb.GenerateRequest, float | None]:
        timeout_s = self._deadline_s(args.pop("timeout_s", None))
        return build_generate_request(**args), timeout_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout_s={self.timeout_s!r})"


def now_ns() -> int:
    return time.perf_counter_ns()


def is_serving(response: health_pb2.HealthCheckResponse) -> bool:
    return response.status == health_pb2.HealthCheckResponse.SERVING


def unhealthy(exc: grpc.RpcError) -> bool:
    """True if a failed health Check means "not serving"; otherwise the caller raises."""
    return exc.code() in _UNHEALTHY_CODES


def check_request_ids(request_ids: Sequence[str]) -> list[str]:
    if not request_ids or not all(isinstance(r, str) and r for r in request_ids):
        raise ConfigError(f"abort needs one or more non-empty request ids, got {request_ids!r}")
    return list(request_ids)
