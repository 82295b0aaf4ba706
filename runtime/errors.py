"""The runtime's exceptions: one root, converted once at the edge (runtime.launch.main.main), where one
table maps each kind to its exit status.

Every message says what is wrong and what to do next; nothing below main() prints errors.
"""


class RuntimeFailure(Exception):
    """Something went wrong that the user can act on; the message says what to do."""

    exit_status = 1


class UsageError(RuntimeFailure):
    """Bad command-line input or settings."""

    exit_status = 2


class ModelLoadError(RuntimeFailure):
    """llama.cpp could not load the model or make a context for it."""


class LostWorkerError(RuntimeFailure):
    """--rpc: a worker the model runs on died or was cut off; nothing more can be computed."""


class ContextOverflowError(RuntimeFailure):
    """A prompt (or an embedding input) longer than the context."""


class TemplateError(RuntimeFailure):
    """The chat template is broken, refused the conversation or went over its limits."""


class PayloadError(RuntimeFailure):
    """The file is not a bundle, or its payload is damaged. The message says what to do."""


class NotABundleError(PayloadError):
    pass


class IncompleteError(PayloadError):
    pass


class NewerFormatError(PayloadError):
    pass


class DamagedError(PayloadError):
    """A part of the bundle does not match its recorded hash."""


class OutputError(RuntimeFailure):
    """Standard output cannot take the answer (closed, full, a broken pipe)."""
