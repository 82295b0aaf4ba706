"""Tool calling (issue 10.2) through the real server and the official openai client, on the demo
model: its own template knows no tools (the generic way: a grammar makes the answer a JSON call
or a JSON answer), and a Hermes-style template given with --template (the native way: calls in
<tool_call> tags, forced by a grammar when required)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_bundle_cmd
from test_server import serving

from runtime.prompts import tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def hermes(model, stub, tmp_path_factory):
    out = tmp_path_factory.mktemp("hermes") / "hermes"
    r = run_bundle_cmd("build", model, "--template", Path(__file__).parent / "data" / "hermes_tools.jinja", "-o", out)
    assert r.returncode == 0, r.stderr
    yield from serving(out, tmp_path_factory)


def _check_call(call, name="get_weather"):
    assert call.type == "function" and call.function.name == name and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    assert isinstance(args.get("city"), str)
    return args


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_generic_required_and_named_give_a_valid_call(server, choice):
    r = server.client().chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                                temperature=0, max_tokens=100)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
    _check_call(choice0.message.tool_calls[0])


def test_generic_auto_answers_or_calls_and_none_answers(server):
    client = server.client()
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=100)
    m = r.choices[0].message
    assert (m.tool_calls and r.choices[0].finish_reason == "tool_calls") or (m.content and not m.tool_calls)
    if m.tool_calls:
        _check_call(m.tool_calls[0])
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=20)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls
    assert not r.choices[0].message.content.lstrip().startswith("{")


def test_streamed_tool_calls_and_the_result_rendered_back(server):
    client = server.client()
    chunks = list(client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=0, max_tokens=100, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and chunks[-1].choices[0].finish_reason == "tool_calls"
    call = deltas[0].tool_calls[0]
    assert call.index == 0 and call.function.name == "get_weather"
    # the call and its result go back; the model answers in words (tool_choice none)
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."}]
    r = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")


def test_parallel_tool_calls_false_gives_one_call(server):
    r = server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather and time in Paris and in Rome?"}],
        tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=120)
    assert len(r.choices[0].message.tool_calls) == 1


def test_native_hermes_template_gets_the_tools_and_its_calls_are_parsed(hermes):
    r = hermes.client().chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="required",
                                                temperature=0, max_tokens=100)
    assert r.choices[0].finish_reason == "tool_calls"
    _check_call(r.choices[0].message.tool_calls[0])
    # and without tools the template renders as plain ChatML: a normal answer
    r = hermes.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400(server, body, param):
    status, answer = server.request("POST", "/v1/chat/completions", {"messages": ASK, **body})
    assert status == 400 and answer["error"]["param"] == param, answer


# -- the parsers, on what real models of each family write ----------------------------------------

SPEC = dict(tools=[WEATHER], names=["get_weather"])


@pytest.mark.parametrize("style, text, content", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check."),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None),
])
def test_parsers(style, text, content):
    spec = tools.ToolSpec(style=style, **SPEC)
    got, calls = tools.parse_answer(text, spec)
    assert got == content
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_a_call_to_an_unknown_tool_stays_text():
    spec = tools.ToolSpec(style="hermes", **SPEC)
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    assert tools.parse_answer(text, spec) == (text, [])


@pytest.mark.parametrize("source, style", [
    ("{% for t in tools %}<tool_call>{% endfor %}", "hermes"),
    ("{{ tools }} [TOOL_CALLS]", "mistral"),
    ("{{ tools }}<|start_header_id|>ipython", "llama3"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "generic"),
])
def test_style_of_template(source, style):
    assert tools.style_of(source) == style
