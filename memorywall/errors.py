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
      `RequestTooLargeError` (more KV than the whole deployment holds).
    - `DuplicateRequestError`: a request id that is already live.
    - `DrainingError`: the server is shutting down and admits nothing new.
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


class DuplicateRequestError(MemorywallError):
    """A request id that is already in flight."""


class DrainingError(MemorywallError):
    """The engine is shutting down."""
