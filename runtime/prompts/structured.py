"""Structured output: a JSON schema (or any JSON) turned into the GBNF grammar llama.cpp's grammar
sampler enforces, with llama-cpp-python's converter (pure Python, part of the bindings). Used by
the API's response_format and by -j/--json-schema on the command line."""

from __future__ import annotations

import json

MAX_SCHEMA_BYTES = 64 * 1024
# What the converter raises on a schema it cannot express.
_CONVERTER_ERRORS = (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError)


class SchemaError(ValueError):
    """A schema that cannot be enforced; the message says why."""


def _converter():
    from ..host.bindings import grammar

    return grammar()


def any_json_grammar() -> str:
    """GBNF for any JSON object (OpenAI's response_format json_object)."""
    return _converter().JSON_GBNF


def schema_grammar(schema: dict) -> str:
    """GBNF for the JSON documents schema allows."""
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        return _converter().json_schema_to_gbnf(text)
    except _CONVERTER_ERRORS as exc:
        raise SchemaError(f"this JSON schema cannot be enforced: {exc}") from None
