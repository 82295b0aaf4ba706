"""Exceptions meant for the user: converted once, in bundler.cli.main, into a one-line message."""


class BundleError(Exception):
    """Something the user can fix; the message says what is wrong and what to do next."""


class UsageError(BundleError):
    """Bad command-line input (exit status 2)."""
