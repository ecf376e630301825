"""The error tree shared by every layer. It imports nothing, so the core may use it."""


class MemorywallError(Exception):
    """Root of every error memorywall raises on purpose.

    Subclasses:
    - `ConfigError`: a bad value in a profile, model config, deployment or
      argument; the message names the field.
    - `NotFoundError`: an unknown hardware or model name; the message lists the
      valid names.
    - `CapacityError`: a model that does not fit the devices given; the message
      says how many are needed.
    - `InvalidRequestError`: a generate request with a bad field; subclasses
      `ContextLengthError` (prompt + output beyond the context window) and
      `RequestTooLargeError` (more KV than the whole deployment holds) and
      `PayloadTooLargeError` (a request body or prompt beyond the server's limits).
    - `DuplicateRequestError`: a request id that is already live.
    - `DrainingError`: the server is shutting down and admits nothing new.
    - `NotReadyError`: the weights are loading, or the engine sleeps (`/sleep`).
    - `LifecycleError`: a sleep or cache reset the engine's state does not allow now.
    - `DisaggregationError`: a prefill/decode pair that could not complete its KV
      hand-off; subclasses `PartnerTimeoutError` (the other half never came) and
      `PartnerLostError` (the other half or its worker went away mid-transfer).
    - `OverloadedError`: the waiting queue is full (`--max-waiting`); carries
      `retry_after_s`.
    - `UnauthenticatedError`: a missing or wrong API key.
    - `InjectedFaultError`: a fault injected on purpose (`--faults`); one
      subclass per status it answers with: `InjectedUnavailableError`,
      `InjectedOverloadError`, `InjectedInternalError`, `InjectedTimeoutError`.
    """


class ConfigError(MemorywallError, ValueError):
    """A value is missing, malformed or out of range."""


class NotFoundError(MemorywallError, LookupError):
    """A name that is not built in and is not a readable file."""


class CapacityError(MemorywallError):
    """A model, request or batch does not fit the memory available."""


class InvalidRequestError(MemorywallError, ValueError):
    """A generate request field is missing or out of range."""


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested output exceed the model's context window."""


class RequestTooLargeError(InvalidRequestError):
    """A request needs more KV cache than the whole deployment has."""


class PayloadTooLargeError(InvalidRequestError):
    """A request body or prompt beyond the server's limits (`--max-request-bytes`)."""


class DuplicateRequestError(MemorywallError):
    """A request id that is already in flight."""


class DrainingError(MemorywallError):
    """The engine is shutting down."""


class NotReadyError(MemorywallError):
    """The engine has no weights loaded yet (startup, wake-up) or sleeps."""


class LifecycleError(MemorywallError):
    """A lifecycle call (sleep, prefix-cache reset) that the engine's state refuses now."""


class DisaggregationError(MemorywallError):
    """A disaggregated request's prefill and decode halves could not hand off its KV."""


class PartnerTimeoutError(DisaggregationError):
    """The other half of a bootstrap room did not arrive in time."""


class PartnerLostError(DisaggregationError):
    """The other half, or its worker, went away before the KV transfer completed."""


class OverloadedError(MemorywallError):
    """The waiting queue is at its bound; the client may retry after `retry_after_s`."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class UnauthenticatedError(MemorywallError):
    """No API key, or not the server's."""


class InjectedFaultError(MemorywallError):
    """A failure injected on purpose; `fault` names it as the spec does (`error:internal`)."""

    def __init__(self, message: str, *, fault: str) -> None:
        super().__init__(message)
        self.fault = fault


class InjectedUnavailableError(InjectedFaultError):
    """An injected refusal or mid-stream abort that answers UNAVAILABLE / 503."""


class InjectedOverloadError(InjectedFaultError):
    """An injected refusal that answers RESOURCE_EXHAUSTED / 429."""


class InjectedInternalError(InjectedFaultError):
    """An injected refusal that answers INTERNAL / 500."""


class InjectedTimeoutError(InjectedFaultError):
    """An injected refusal that answers DEADLINE_EXCEEDED / 504."""
