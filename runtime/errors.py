"""Exceptions meant for the user, converted once at the edge (runtime.app.main)."""


class RuntimeFailure(Exception):
    """Something went wrong that the user can act on; the message says what to do."""


class UsageError(RuntimeFailure):
    """Bad command-line input (exit status 2)."""


class ModelLoadError(RuntimeFailure):
    pass
