"""memorywall: an LLM inference-serving emulator for wafer-scale and GPU backends.

The performance core lives in `memorywall.core`; the serving engine in
`memorywall.server`; the client library in `memorywall.client`; the load
generator in `memorywall.loadgen`.
"""

from memorywall.errors import (
    CapacityError,
    ConfigError,
    MemorywallError,
    NotFoundError,
)

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "ConfigError",
    "MemorywallError",
    "NotFoundError",
    "__version__",
]
