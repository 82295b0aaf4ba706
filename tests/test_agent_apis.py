"""What agents, SDKs and llama.cpp's users send (issue 28), in process: the real app over a
stand-in model (tests/fakes.py), so each shape and each refusal is checked exactly. The same
requests from the real clients (the anthropic and openai-agents SDKs, the JavaScript SDK in a
page) against the real bundle are in test_clients.py.

Where llama-server answers the same request, the comment says what it does (measured with
`make reference`, llama.cpp of the same version)."""

from __future__ import annotations

import json

import pytest

from fakes import FakeEngine, FakeScheduler
from test_api_shapes import HI, client, events

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CALL = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}


def roomy(**kw) -> FakeScheduler:
    """A stand-in model with room for the tool instructions and earlier turns (its tokens are bytes)."""
    engine = FakeEngine()
    engine.n_ctx = 8192
    return FakeScheduler(engine=engine, **kw)


def typed_events(text: str) -> list[tuple[str, dict]]:
    """An `event:`/`data:` stream as [(event name, data)]; each data's type must be its name."""
    out, name = [], None
    for line in text.splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            out.append((name, data))
    return out


# --- Anthropic's Messages API ---------------------------------------------------------------------

def test_messages_answer_shape_and_system():
    c, w = client()
    r = c.post("/v1/messages", json={"model": "any", "max_tokens": 20, "system": "Be brief.",
                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["content"] == [{"type": "text", "text": "Paris."}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert w.calls[0].tokens == list(prompt.encode())
    assert body["usage"]["input_tokens"] == len(prompt) and body["usage"]["output_tokens"] == 3
    assert w.calls[0].sampling.max_tokens == 20


def test_messages_system_blocks_text_blocks_and_sampling():
    c, w = client()
    r = c.post("/v1/messages", json={
        "model": "m", "max_tokens": 5, "temperature": 0.3, "top_k": 7, "top_p": 0.5, "metadata": {"user_id": "u"},
        "system": [{"type": "text", "text": "A."}, {"type": "text", "text": "B.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                     {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                                       {"type": "text", "text": "Hello"}]},
                     {"role": "user", "content": "Bye"}]})
    assert r.status_code == 200, r.text
    prompt = bytes(w.calls[0].tokens).decode()
    assert "system\nA.\n\nB.<|im_end|>" in prompt and "assistant\nHello<|im_end|>" in prompt and "hm" not in prompt
    s = w.calls[0].sampling
    assert (s.temp, s.top_k, s.top_p) == (0.3, 7, 0.5)


def test_messages_stop_sequences_and_max_tokens():
    c, w = client(FakeScheduler(answer="One, two, three, four."))
    body = c.post("/v1/messages", json={"model": "m", "max_tokens": 50, "stop_sequences": ["three", "X1", "X2", "X3", "X4"],
                                        "messages": HI}).json()
    assert body["content"][0]["text"] == "One, two, " and body["stop_reason"] == "stop_sequence"
    assert body["stop_sequence"] == "three"
    assert "<|im_end|>" in w.calls[0].sampling.stop  # the template's own stop stays
    c, _ = client(FakeScheduler(answer="Once upon", finish="length"))
    body = c.post("/v1/messages", json={"model": "m", "max_tokens": 2, "messages": HI}).json()
    assert body["stop_reason"] == "max_tokens" and body["content"][0]["text"] == "Once upon"


def test_messages_stream_event_sequence():
    c, _ = client()
    r = c.post("/v1/messages", json={"model": "m", "max_tokens": 20, "messages": HI, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = typed_events(r.text)
    names = [n for n, _ in evs]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert evs[0][1]["message"]["content"] == [] and evs[0][1]["message"]["stop_reason"] is None
    text = "".join(d["delta"]["text"] for n, d in evs if n == "content_block_delta")
    assert text == "Paris."
    assert evs[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert evs[-2][1]["usage"]["output_tokens"] == 3


def test_messages_tool_use_and_tool_result_round_trip():
    tool = {"name": "get_weather", "description": "Weather.", "input_schema": WEATHER_SCHEMA}
    c, w = client(FakeScheduler(answer=CALL))
    body = c.post("/v1/messages", json={"model": "m", "max_tokens": 60, "tools": [tool],
                                        "tool_choice": {"type": "any"},
                                        "messages": [{"role": "user", "content": "Weather in Paris?"}]}).json()
    assert body["stop_reason"] == "tool_use"
    (use,) = body["content"]
    assert use["type"] == "tool_use" and use["name"] == "get_weather" and use["input"] == {"city": "Paris"}
    assert use["id"].startswith("toolu_")
    assert w.calls[0].sampling.grammar  # "any" forces a call: the grammar allows only calls
    c, w = client(roomy())
    r = c.post("/v1/messages", json={"model": "m", "max_tokens": 60, "tools": [tool], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [use]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use["id"],
                                      "content": [{"type": "text", "text": "Sunny, 24 degrees"}]},
                                     {"type": "text", "text": "Thanks."}]}]})
    assert r.status_code == 200, r.text
    prompt = bytes(w.calls[0].tokens).decode()
    assert '"city": "Paris"' in prompt and "Sunny, 24 degrees" in prompt and "Thanks." in prompt
    assert prompt.index("Sunny") < prompt.index("Thanks.")  # the result, then the user's words


def test_messages_tool_use_streamed_as_input_json():
    tool = {"name": "get_weather", "input_schema": WEATHER_SCHEMA}
    c, _ = client(FakeScheduler(answer=CALL))
    r = c.post("/v1/messages", json={"model": "m", "max_tokens": 60, "tools": [tool], "stream": True,
                                     "tool_choice": {"type": "tool", "name": "get_weather"}, "messages": HI})
    evs = typed_events(r.text)
    start = next(d for n, d in evs if n == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    parts = [d["delta"]["partial_json"] for n, d in evs if n == "content_block_delta"]
    assert json.loads("".join(parts)) == {"city": "Paris"}
    assert evs[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert "tool_calls" not in r.text  # the wrapper the grammar forces never shows


def test_messages_count_tokens():
    c, _ = client()
    r = c.post("/v1/messages/count_tokens", json={"model": "m", "system": "Be brief.",
                                                   "messages": [{"role": "user", "content": "Hi"}]})
    prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert r.status_code == 200 and r.json() == {"input_tokens": len(prompt)}


def test_messages_output_config_json_schema_is_a_grammar():
    c, w = client(FakeScheduler(answer='{"city": "Paris"}'))
    r = c.post("/v1/messages", json={"model": "m", "max_tokens": 30, "messages": HI, "output_config": {
        "effort": "low", "format": {"type": "json_schema", "schema": WEATHER_SCHEMA}}})
    assert r.status_code == 200 and "city" in w.calls[0].sampling.grammar


@pytest.mark.parametrize("body, words", [
    ({"messages": HI}, "max_tokens"),
    ({"max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]},
     "image blocks are not supported"),
    ({"max_tokens": 5, "messages": HI, "top_logprobs": 3}, "top_logprobs"),
    ({"max_tokens": 5, "messages": HI, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0"),
    ({"max_tokens": 5, "messages": HI, "stop_sequences": "END"}, "stop_sequences"),
])
def test_messages_errors_in_anthropic_shape(body, words):
    c, _ = client()
    r = c.post("/v1/messages", json={"model": "m", **body})
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert words in err["error"]["message"]


def test_messages_key_as_x_api_key_and_errors_in_anthropic_shape():
    c, _ = client(api_key="sekret")
    ask = {"model": "m", "max_tokens": 5, "messages": HI}
    r = c.post("/v1/messages", json=ask)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert c.post("/v1/messages", json=ask, headers={"x-api-key": "wrong"}).status_code == 401
    assert c.post("/v1/messages", json=ask, headers={"x-api-key": "sekret"}).status_code == 200
    assert c.post("/v1/chat/completions", json={"messages": HI}, headers={"x-api-key": "sekret"}).status_code == 200
    r = c.get("/v1/messages", headers={"x-api-key": "sekret"})
    assert r.status_code == 405 and r.json()["type"] == "error"


# --- the Responses API with function tools --------------------------------------------------------

RESP_TOOL = {"type": "function", "name": "get_weather", "description": "Weather.", "parameters": WEATHER_SCHEMA}


def test_responses_function_call_output_items():
    c, w = client(FakeScheduler(answer=CALL))
    body = c.post("/v1/responses", json={"input": "Weather in Paris?", "tools": [RESP_TOOL],
                                         "tool_choice": "required", "parallel_tool_calls": False}).json()
    (item,) = body["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather" and item["status"] == "completed"
    assert json.loads(item["arguments"]) == {"city": "Paris"} and item["call_id"].startswith("call_")
    assert item["id"].startswith("fc_") and body["tools"] == [RESP_TOOL] and body["status"] == "completed"
    assert w.calls[0].sampling.grammar and '"maxItems": 1' not in w.calls[0].sampling.grammar


def test_responses_function_call_output_is_the_next_turn():
    c, w = client(roomy())
    r = c.post("/v1/responses", json={"tools": [RESP_TOOL], "input": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Rain"}]}]})
    assert r.status_code == 200, r.text
    prompt = bytes(w.calls[0].tokens).decode()
    # both calls in one assistant turn, then each result
    assert prompt.count("<|im_start|>assistant") == 2
    assert '"Paris"' in prompt and '"Rome"' in prompt and "call_1: Sunny" in prompt and "call_2: Rain" in prompt
    assert r.json()["output"][0]["type"] == "message"


def test_responses_tools_streamed_as_typed_events():
    c, _ = client(FakeScheduler(answer=CALL))
    r = c.post("/v1/responses", json={"input": "Weather?", "tools": [RESP_TOOL], "stream": True})
    evs = typed_events(r.text)
    names = [n for n, _ in evs]
    assert names == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert [d["sequence_number"] for _, d in evs] == list(range(len(evs)))
    assert evs[2][1]["item"]["arguments"] == "" and json.loads(evs[4][1]["arguments"]) == {"city": "Paris"}
    assert evs[-1][1]["response"]["output"][0]["call_id"] == evs[5][1]["item"]["call_id"]


def test_responses_refuses_hosted_tools():
    c, _ = client()
    r = c.post("/v1/responses", json={"input": "Hi", "tools": [{"type": "web_search"}]})
    assert r.status_code == 400 and "only function tools" in r.json()["error"]["message"]


# --- tool calls never leak ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_cut_answer_with_tools_gives_only_the_words(stream):
    c, _ = client(FakeScheduler(answer='{"response": "The weather in Par', finish="length"))
    r = c.post("/v1/chat/completions", json={"messages": HI, "tools": [CHAT_TOOL], "stream": stream,
                                             "max_tokens": 9})
    if stream:
        chunks = events(r.text)
        content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
        finish = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1]
        assert not any(ch["choices"][0]["delta"].get("tool_calls") for ch in chunks if ch["choices"])
    else:
        msg = r.json()["choices"][0]
        content, finish = msg["message"]["content"], msg["finish_reason"]
        assert "tool_calls" not in msg["message"]
    assert content == "The weather in Par" and finish == "length"


def test_call_cut_mid_arguments_is_no_call():
    c, _ = client(FakeScheduler(answer='{"tool_calls": [{"name": "get_weather", "arguments": {"ci', finish="length"))
    msg = c.post("/v1/chat/completions", json={"messages": HI, "tools": [CHAT_TOOL], "max_tokens": 9}).json()
    assert msg["choices"][0]["message"]["content"] is None and "tool_calls" not in msg["choices"][0]["message"]
    assert msg["choices"][0]["finish_reason"] == "length"
    for path, shape in (("/v1/responses", "output"), ("/v1/messages", "content")):
        extra = {"input": "Hi", "tools": [RESP_TOOL]} if path == "/v1/responses" else {
            "messages": HI, "max_tokens": 9, "tools": [{"name": "get_weather", "input_schema": WEATHER_SCHEMA}]}
        body = c.post(path, json=extra).json()
        assert "tool_calls" not in json.dumps(body[shape]) and "function_call" not in json.dumps(body[shape])
        assert "tool_use" not in json.dumps(body[shape])


def test_native_call_cut_mid_arguments_is_cut_from_the_content():
    source = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tool_call>{% endif %}"
    c, _ = client(FakeScheduler(answer='Let me check. <tool_call>\n{"name": "get_weather", "argum', finish="length"),
                  template="auto", source=source)
    msg = c.post("/v1/chat/completions", json={"messages": HI, "tools": [CHAT_TOOL], "max_tokens": 9}).json()
    assert msg["choices"][0]["message"]["content"] == "Let me check."
    assert msg["choices"][0]["finish_reason"] == "length"


# --- what llama.cpp's users and newer OpenAI clients send -----------------------------------------

def test_llama_cpp_sampling_fields_reach_the_sampler():
    c, w = client()
    r = c.post("/v1/chat/completions", json={
        "messages": HI, "min_p": 0.2, "typical_p": 0.9, "top_n_sigma": 1.5, "xtc_probability": 0.5,
        "xtc_threshold": 0.2, "dry_multiplier": 0.8, "dry_base": 2, "dry_allowed_length": 3, "dry_penalty_last_n": 64,
        "dry_sequence_breakers": ["\n"], "mirostat": 2, "mirostat_tau": 4, "mirostat_eta": 0.2,
        "dynatemp_range": 0.5, "dynatemp_exponent": 1.5, "samplers": ["top_k", "min_p", "temperature"],
        "ignore_eos": True, "n_predict": 12, "verbosity": "low", "prompt_cache_retention": "24h"})
    assert r.status_code == 200, r.text
    s = w.calls[0].sampling
    assert (s.min_p, s.typical_p, s.top_n_sigma, s.xtc_probability, s.xtc_threshold) == (0.2, 0.9, 1.5, 0.5, 0.2)
    assert (s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n) == (0.8, 2, 3, 64)
    assert s.dry_sequence_breakers == ("\n",) and (s.mirostat, s.mirostat_tau, s.mirostat_eta) == (2, 4, 0.2)
    assert (s.dynatemp_range, s.dynatemp_exponent) == (0.5, 1.5) and s.samplers == ("top_k", "min_p", "temperature")
    assert s.ignore_eos and s.max_tokens == 12


def test_sampling_defaults_come_from_the_settings_and_completions_take_them_too():
    from runtime.launch.settings import Settings

    c, w = client(settings=Settings(min_p=0.1, samplers="kt"))
    c.post("/v1/chat/completions", json={"messages": HI})
    assert w.calls[0].sampling.min_p == 0.1 and w.calls[0].sampling.samplers == ("top_k", "temperature")
    r = c.post("/v1/completions", json={"prompt": "Hi", "min_p": 0.3, "samplers": "top_k;temperature", "n_probs": 2})
    assert r.status_code == 200, r.text
    s = w.calls[1].sampling
    assert s.min_p == 0.3 and s.samplers == ("top_k", "temperature") and s.logprobs == 2
    assert r.json()["choices"][0]["logprobs"]["top_logprobs"]
    r = c.post("/v1/responses", json={"input": "Hi", "min_p": 0.4, "top_k": 3})
    assert r.status_code == 200 and (w.calls[2].sampling.min_p, w.calls[2].sampling.top_k) == (0.4, 3)


@pytest.mark.parametrize("field, value, words", [
    ("min_p", 2, "min_p=2 must be from 0 to 1"),
    ("mirostat", 3, "mirostat=3"),
    ("samplers", ["top_k", "nucleus_v2"], "'nucleus_v2' is not a sampler"),
    ("dry_sequence_breakers", "\n", "dry_sequence_breakers"),
    ("ignore_eos", "yes", "ignore_eos"),
    ("n_predict", "ten", "n_predict"),
    ("dry_allowed_length", 1.5, "dry_allowed_length"),
])
def test_llama_cpp_sampling_fields_checked(field, value, words):
    c, _ = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, field: value})
    assert r.status_code == 400 and words in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == field


def test_tool_choice_without_tools_is_ignored():
    # llama-index sends it; llama-server ignores it too
    c, w = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, "tool_choice": "required"})
    assert r.status_code == 200 and w.calls[0].sampling.grammar is None


def test_schema_with_a_root_ref_is_enforced():
    # what Pydantic writes for a model that refers to itself; llama-server takes it
    node = {"$defs": {"Node": {"type": "object", "properties": {
        "name": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
        "required": ["name"]}}, "$ref": "#/$defs/Node"}
    c, w = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "Node", "schema": node}}})
    assert r.status_code == 200, r.text
    grammar = w.calls[0].sampling.grammar
    assert "root ::=" in grammar and '"\\"name\\""' in grammar and "children" in grammar
    bad = dict(node, **{"$ref": "#/$defs/Missing"})
    r = c.post("/v1/chat/completions", json={"messages": HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "Node", "schema": bad}}})
    assert r.status_code == 400 and "names nothing" in r.json()["error"]["message"]


def test_model_by_id():
    c, _ = client()
    r = c.get("/v1/models/fake")
    assert r.status_code == 200 and r.json()["id"] == "fake" and r.json()["object"] == "model"
    r = c.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and "'fake'" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "model_not_found"


def test_cors_preflight_echoes_the_headers_a_page_asks_for():
    c, _ = client(allowed_origins={"http://localhost:3000"})
    ask = "content-type, x-stainless-os, x-stainless-retry-count, anthropic-version, x-api-key"
    r = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                   "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": ask})
    assert r.status_code == 204 and r.content == b""
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert allowed == {"authorization", "content-type", "x-stainless-os", "x-stainless-retry-count",
                       "anthropic-version", "x-api-key"}
    r = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                   "Access-Control-Request-Headers": "x-ok, bad header, x\r\ny"})
    allowed = {h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    assert allowed == {"authorization", "content-type", "x-ok"}
    r = c.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                   "Access-Control-Request-Headers": "x-stainless-os"})
    assert r.status_code == 403 and "access-control-allow-headers" not in r.headers


def test_responses_text_answer_with_tools_streamed_whole():
    c, _ = client(FakeScheduler(answer='{"response": "It is sunny."}'))
    r = c.post("/v1/responses", json={"input": "Weather?", "tools": [RESP_TOOL], "stream": True})
    evs = typed_events(r.text)
    assert [n for n, _ in evs] == ["response.created", "response.in_progress", "response.output_item.added",
                                   "response.content_part.added", "response.output_text.delta",
                                   "response.output_text.done", "response.content_part.done",
                                   "response.output_item.done", "response.completed"]
    assert evs[4][1]["delta"] == "It is sunny." and evs[-1][1]["response"]["output"][0]["content"][0]["text"] == \
        "It is sunny."
    assert '{\\"response' not in r.text  # the wrapper never shows
