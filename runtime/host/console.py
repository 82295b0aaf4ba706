"""The one place the runtime talks to a person (say, on stderr) and writes an answer (write_out,
on stdout). stdout carries only the answer, so `./model -p ... | other` works; banners, progress
and errors go to stderr."""

from __future__ import annotations

import sys

from ..errors import OutputError
from . import process


def say(msg: str, end: str = "\n") -> None:
    """A line for the person at the terminal (end="": a piece of one, e.g. streamed thinking)."""
    try:
        print(msg, file=sys.stderr, end=end, flush=True)
    except (OSError, ValueError):
        pass  # stderr gone: nothing to tell anyone


def write_out(text: str) -> None:
    """Write to stdout and flush, turning a failure into one clear error (issue 8.11)."""
    if process.STDOUT_WAS_CLOSED:
        raise OutputError("standard output is closed, so the answer has nowhere to go; run it without "
                          "closing stdout (or redirect it to a file)")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        process.silence_stdout()
        raise OutputError(f"cannot write to standard output ({exc.strerror}); check where it goes "
                          "(a full disk, a closed file)") from None
