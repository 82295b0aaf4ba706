"""Text from a file (model metadata, names, templates) made safe to print on a terminal.

A GGUF's metadata or a bundle's manifest can hold terminal escape codes (issue 8.10): printed raw
they can rewrite the screen, retitle the window or hide what follows. Control characters, C1
controls and the Unicode bidirectional overrides are shown as visible escapes instead.
"""

from __future__ import annotations

import re

# C0 controls but tab, DEL, C1 controls, bidi embeddings/overrides/isolates, line/paragraph seps.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")
_UNSAFE_MULTILINE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escape(match: re.Match) -> str:
    ch = match.group(0)
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def printable(value, multiline: bool = False) -> str:
    """str(value) with every character that a terminal would act on shown as an escape."""
    text = str(value)
    return (_UNSAFE_MULTILINE if multiline else _UNSAFE).sub(_escape, text)


def printable_tree(value):
    """A JSON-like value with printable() applied to every string in it (keys too)."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(k): printable_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable_tree(v) for v in value]
    return value


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_sha256_hex(value) -> bool:
    """A SHA-256 as the bundle format writes it (64 lowercase hex digits): the only kind of name
    the cache ever builds a path from."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX_DIGITS
