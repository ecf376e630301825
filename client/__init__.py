"""memorywall.client: blocking and asyncio clients for a memorywall engine over gRPC.

Stream one request from a server on 127.0.0.1:50051 (`AsyncClient` is the same
with `async with`, `async for` and `aclose`):

```python
from memorywall.client import Client
with Client("127.0.0.1:50051") as client:
    for chunk in client.generate(prompt="Hello", max_tokens=32):
        print(chunk.token_ids, chunk.modelled_times_s)
    print(client.complete(prompt_tokens=128, max_tokens=32).timing)
```

Arguments are checked before anything is sent (`memorywall.errors.ConfigError`);
failed calls raise a `ClientError` subclass chosen by gRPC status code. A server
behind TLS and an API key: `Client(target, tls=Tls(ca="ca.pem"), api_key="...")`.
"""

from memorywall.client._async import AsyncClient, AsyncGenerateStream
from memorywall.client._base import STATUS_ERRORS, GenerateArgs, Tls, build_generate_request
from memorywall.client._errors import (
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    ProtocolError,
    ResourceExhausted,
    StreamNotFinished,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from memorywall.client._sync import Client, GenerateStream
from memorywall.client._types import (
    FinishReason,
    GenerateResult,
    HostStall,
    LagStats,
    ModelInfo,
    RequestLag,
    RequestTiming,
    SamplingParams,
    ServerInfo,
    TokenChunk,
    Usage,
)

__all__ = [
    "STATUS_ERRORS",
    "AlreadyExists",
    "AsyncClient",
    "AsyncGenerateStream",
    "Cancelled",
    "Client",
    "ClientError",
    "DeadlineExceeded",
    "FinishReason",
    "GenerateArgs",
    "GenerateResult",
    "GenerateStream",
    "HostStall",
    "InvalidRequest",
    "LagStats",
    "ModelInfo",
    "NotFound",
    "ProtocolError",
    "RequestLag",
    "RequestTiming",
    "ResourceExhausted",
    "SamplingParams",
    "ServerInfo",
    "StreamNotFinished",
    "Tls",
    "TokenChunk",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Usage",
    "build_generate_request",
]
