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


def _root_ref_inlined(schema: dict) -> dict:
    """A schema whose root is only a local `$ref` (what Pydantic writes for a model that refers to
    itself: {"$defs": {"Node": …}, "$ref": "#/$defs/Node"}) as the definition it names, with the
    definitions kept beside it: the converter resolves references below the root, not the root."""
    for _ in range(8):  # a root $ref to a definition that is itself a $ref, a few deep
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target = schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"the schema's $ref {ref!r} names nothing in the schema")
            target = target[part]
        if not isinstance(target, dict):
            raise SchemaError(f"the schema's $ref {ref!r} does not name a schema")
        defs = {k: schema[k] for k in ("$defs", "definitions") if k in schema}
        schema = {**{k: v for k, v in schema.items() if k != "$ref"}, **target, **defs}
    raise SchemaError("the schema's root $ref goes round in a circle")


def schema_grammar(schema: dict) -> str:
    """GBNF for the JSON documents schema allows."""
    schema = _root_ref_inlined(schema)
    text = json.dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
    try:
        return _converter().json_schema_to_gbnf(text)
    except _CONVERTER_ERRORS as exc:
        raise SchemaError(f"this JSON schema cannot be enforced: {exc}") from None
