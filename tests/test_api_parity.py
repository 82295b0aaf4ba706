"""The same requests to the bundle and to llama-server (issue 28): llama.cpp's sampling fields,
the Messages API, and the requests agents send that llama-server takes. Both serve the demo model,
llama-server built from the same llama.cpp source (`make reference`); where llama.cpp's sampler
chain with a seed is the same, the text is the same token for token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from test_server import served
from test_template_parity import LLAMA_SERVER, LlamaServer

Q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
NODE = {"$defs": {"Node": {"type": "object", "properties": {
    "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
    "required": ["name"]}}, "$ref": "#/$defs/Node"}
# Every sampler but typical_p, which is tested apart: after top_n_sigma has masked tokens out, llama.cpp's
# typical sampler computes 0 * log(0) = NaN for them and sorts by NaN, so where the tokens land depends on
# the compiler (llama.cpp's own flaw; the bundle's zig build and llama-server's GCC build differ there).
EVERY_SAMPLER = {"min_p": 0.1, "top_n_sigma": 1.0, "xtc_probability": 0.1, "xtc_threshold": 0.2,
                 "dry_multiplier": 0.5, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64,
                 "dry_sequence_breakers": ["\n"], "dynatemp_range": 0.2, "dynatemp_exponent": 1.0}


def _post(port: int, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def both(model, built_bundle, tmp_path_factory):
    """(llama-server's port, the bundle's port), one slot each, the same context."""
    assert LLAMA_SERVER.exists(), "run `make reference` (bench/native.py) first"
    ref = LlamaServer(model)
    try:
        with served(built_bundle, tmp_path_factory, "-c", "512", "--parallel", "1") as ours:
            yield ref.port, ours.port
    finally:
        ref.stop()


def _text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 5,
                         **EVERY_SAMPLER}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "seed": 6,
                         "typical_p": 0.9, "repeat_penalty": 1.2, "presence_penalty": 0.3}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.5, "min_p": 1.0, "seed": 3}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0, "mirostat": 2,
                         "mirostat_tau": 4.0, "mirostat_eta": 0.2, "seed": 3}),
    ("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "seed": 8,
                         "samplers": ["top_k", "temperature"], "top_k": 5}),
    ("/v1/chat/completions", {"messages": Q, "max_tokens": 12, "temperature": 1.0, "seed": 1, **EVERY_SAMPLER}),
])
def test_seeded_sampling_matches_llama_server(both, path, body):
    (s1, ref), (s2, ours) = _post(both[0], path, body), _post(both[1], path, body)
    assert s1 == s2 == 200, (ref, ours)
    assert _text(ours) == _text(ref)


def test_ignore_eos_and_n_predict_as_llama_server(both):
    body = {"prompt": "The capital of France is", "ignore_eos": True, "n_predict": 24, "temperature": 0}
    (s1, ref), (s2, ours) = _post(both[0], "/v1/completions", body), _post(both[1], "/v1/completions", body)
    assert s1 == s2 == 200
    assert ours["usage"]["completion_tokens"] == ref["usage"]["completion_tokens"] == 24
    assert _text(ours) == _text(ref)


@pytest.mark.parametrize("body", [
    {"messages": Q, "tool_choice": "required", "max_tokens": 8, "temperature": 0},  # llama-index sends it
    {"messages": Q, "max_tokens": 30, "temperature": 0,
     "response_format": {"type": "json_schema", "json_schema": {"name": "Node", "schema": NODE}}},
    {"messages": Q, "max_tokens": 8, "temperature": 0, "verbosity": "low", "prompt_cache_retention": "24h"},
])
def test_requests_llama_server_takes_are_taken(both, body):
    (s1, ref), (s2, ours) = (_post(port, "/v1/chat/completions", body) for port in both)
    assert s1 == s2 == 200, (ref, ours)
    if "response_format" in body:
        assert _text(ours).lstrip().startswith('{ "name"') and _text(ref).lstrip().startswith("{")


def test_messages_api_as_llama_server(both):
    ask = {"model": "demo", "max_tokens": 20, "messages": Q, "temperature": 0}
    (s1, ref), (s2, ours) = (_post(port, "/v1/messages", ask) for port in both)
    assert s1 == s2 == 200
    assert ours["content"] == ref["content"] and ours["stop_reason"] == ref["stop_reason"] == "end_turn"
    cut = dict(ask, stop_sequences=["Paris"])
    (_, ref), (_, ours) = (_post(port, "/v1/messages", cut) for port in both)
    assert ours["content"] == ref["content"] and ours["stop_reason"] == "stop_sequence"
    count = {"model": "demo", "messages": Q, "system": "Be brief."}
    (s1, ref), (s2, ours) = (_post(port, "/v1/messages/count_tokens", count) for port in both)
    assert s1 == s2 == 200 and ours == ref
