"""What `memorywall serve` asks of a server: its listeners, admission, faults, roles.

One frozen config for the whole server; the CLI builds it. `app.EmulatorServer`
and the multi-process server (`multi/`) read it, and `listeners.Listeners`
binds the ports it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.core import Deployment
from memorywall.errors import ConfigError
from memorywall.server.engine.guard import GuardConfig
from memorywall.server.engine.lora import LoraConfig
from memorywall.server.grpc_services import DEFAULT_GRPC_SERVICES, SGLANG, check_services
from memorywall.server.pd.config import PdConfig, Role

if TYPE_CHECKING:  # the TLS module loads grpc; a config (and the CLI that builds it) need not
    from memorywall.server.fronts.tls import TlsConfig

# The largest request body (HTTP) or message (gRPC) a server takes by default. Prompts
# given as token ids run to ~7 bytes a token: room for a 128k-token context.
MAX_BODY_BYTES = 16 * 2**20

# vLLM's formats that read weights (timed the same: bytes over the host link), and dummy.
LOAD_FORMATS = ("auto", "safetensors", "pt", "dummy")


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # gRPC
    grpc: bool = True
    # The worker protocols on the gRPC port (`--grpc-services`; see grpc_services.py).
    grpc_services: tuple[str, ...] = DEFAULT_GRPC_SERVICES
    http_port: int | None = None  # the OpenAI HTTP front (with /metrics); None: off
    metrics_port: int | None = None  # /metrics alone, for a gRPC-only server; None: off
    dcgm_port: int | None = None  # the emulated dcgm-exporter's /metrics; None: off
    otlp_endpoint: str | None = None  # OTLP/HTTP trace collector; None: no tracing
    tokenizer: Path | None = None  # HF tokenizer.json for HTTP prompt text; None: ~4 chars/token
    grace_s: float = 5.0
    # The message budget's ceiling: about what grpc.aio carries on two cores shared with
    # the client. Below it the engine lowers the budget by itself whenever it wakes late
    # (server/engine/pacing.py), and only then groups tokens, up to 4 ms (or one step).
    max_messages_per_s: float = 40_000.0
    # Tokens per streamed message after a stream's first; None: `auto` (one a message while
    # the budget above lasts). SGLang's and vLLM's `--stream-interval`.
    stream_interval: int | None = None
    disaggregation: PdConfig = field(default_factory=PdConfig)  # --role prefill|decode
    guard: GuardConfig = field(default_factory=GuardConfig)  # admission limit, faults
    # One request's body (HTTP) or message (gRPC): beyond it 413 / INVALID_ARGUMENT.
    max_request_bytes: int = MAX_BODY_BYTES
    tls: TlsConfig | None = None  # None: plaintext on every port
    api_key: str | None = None  # None: no key asked (see fronts/auth.py for what it guards)
    # How the weights load (vLLM's --load-format): "dummy" at once, any other takes the
    # core's load time (`Deployment.weight_load_s`) before the server is ready.
    load_format: str = "auto"
    # `serve --dashboard`: the live dashboard (memorywall.dashboard) under /dashboard/ of the
    # HTTP front, reading this server's metrics in-process.
    dashboard: bool = False
    lora: LoraConfig | None = None  # --enable-lora and its limits; None: LoRA off

    def __post_init__(self) -> None:
        if not self.grpc and self.http_port is None:
            raise ConfigError("nothing to serve: gRPC is off and no HTTP port is given")
        if self.dashboard and self.http_port is None:
            raise ConfigError("--dashboard: it is served on the HTTP front; add --http-port")
        if self.stream_interval is not None and self.stream_interval < 1:
            raise ConfigError(f"stream_interval: must be >= 1, got {self.stream_interval}")
        try:
            check_services(self.grpc_services)
        except ValueError as e:
            raise ConfigError(f"grpc services: {e}") from None
        if self.disaggregation.role is not Role.BOTH and SGLANG not in self.grpc_services:
            raise ConfigError(
                f"--role {self.disaggregation.role.value}: disaggregated halves meet through "
                "SGLang's worker service; add sglang to --grpc-services"
            )
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(
                f"load_format: expected one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}"
            )

    def weight_load_s(self, deployment: Deployment) -> float:
        """How long loading the weights takes at startup and wake-up: 0 for dummy weights."""
        return 0.0 if self.load_format == "dummy" else deployment.weight_load_s

    @property
    def scheme(self) -> str:
        """The HTTP listeners' URL scheme."""
        return "https" if self.tls is not None else "http"
