"""Reading untrusted JSON: every field read from a bundle is untrusted (issue 8.1). The table
of contents and the manifest are checked whole, against these rules, before anything uses them;
a failure names the field."""

from __future__ import annotations

from .. import digest
from ..text import is_sha256_hex

__all__ = ["Invalid", "as_object", "digest_field", "is_sha256_hex", "sha256_field", "take"]

class Invalid(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")



def take(data: dict, key: str, kind, where: str, *, default=None, required=False, lo=None, hi=None,
          max_len=None, choices=None):
    """data[key] checked: its type (bool is never an int here), bounds, length, choices."""
    if key not in data or data[key] is None:
        if required:
            raise Invalid(f"{where}.{key}", "missing")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise Invalid(f"{where}.{key}", f"expected {kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise Invalid(f"{where}.{key}", f"expected {kinds[0].__name__}, got {type(value).__name__}")
    if isinstance(value, float) and value != value:
        raise Invalid(f"{where}.{key}", "not a number")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise Invalid(f"{where}.{key}", f"{value} is out of range [{lo}, {hi}]")
    if max_len is not None and len(value) > max_len:
        raise Invalid(f"{where}.{key}", f"longer than {max_len}")
    if choices is not None and value not in choices:
        raise Invalid(f"{where}.{key}", f"{str(value)[:40]!r} is not one of {', '.join(map(str, choices))}")
    return value


def as_object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(where, f"expected an object, got {type(value).__name__}")
    return value


def digest_field(data: dict, where: str, required=True) -> str | None:
    """A part's digest, written under its algorithm's name: {"blake3": hex} (bundles built now)
    or {"sha256": hex} (bundles from before); returned as "algorithm:hex" (runtime/digest.py)."""
    for algorithm in digest.ALGORITHMS:
        if algorithm in data:
            value = take(data, algorithm, str, where, required=True)
            if not digest.is_hex(value):
                raise Invalid(f"{where}.{algorithm}", f"not a {algorithm} hex digest")
            return digest.make(algorithm, value)
    if required:
        raise Invalid(where, "has no digest (blake3 or sha256)")
    return None


def sha256_field(data: dict, key: str, where: str, required=True):
    value = take(data, key, str, where, required=required)
    if value is not None and not is_sha256_hex(value):
        raise Invalid(f"{where}.{key}", "not a SHA-256 hex digest")
    return value

