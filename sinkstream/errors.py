"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""


class SinkstreamError(Exception):
    """A problem the user can fix (bad path, bad flag, unsupported model). Printed without a traceback."""


class ModelLoadError(SinkstreamError):
    pass


class UnsupportedModelError(SinkstreamError):
    pass


class ContextOverflowError(SinkstreamError):
    """A bounded policy never raises this; `dense` does once its context is full."""


class EmptyInputError(SinkstreamError, ValueError):
    """A pass was asked to feed no tokens (an empty prompt on a stream whose last token is already cached)."""


class PinError(SinkstreamError, ValueError):
    """A system prompt cannot be pinned: empty, longer than the cache's pin limit, or a policy without sinks."""
