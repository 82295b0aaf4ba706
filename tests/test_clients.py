"""The libraries people point at an OpenAI-compatible server for real work (issues 10 and 28), each
driving the real bundle's server on 127.0.0.1 with the demo model: LangChain's ChatOpenAI (structured
output both ways, forced tool calls), instructor (JSON, JSON_SCHEMA and TOOLS modes), litellm (tools),
Anthropic's SDK on the Messages API, the OpenAI Agents SDK on its default Responses path, and the
official JavaScript SDK from a page in Chromium. Every result must parse and validate; the grammar
sampler is what makes a 135M model manage it."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from pydantic import BaseModel

from conftest import QUESTION
from test_server import serving

# litellm fetches a price list from GitHub when imported unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

anthropic = pytest.importorskip("anthropic")
agents = pytest.importorskip("agents")
langchain_openai = pytest.importorskip("langchain_openai")
instructor = pytest.importorskip("instructor")
litellm = pytest.importorskip("litellm")
from instructor.core import InstructorRetryException  # noqa: E402


class City(BaseModel):
    city: str
    country: str


ASK_CITY = "What is the capital of France? Answer as JSON with the fields city and country."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


def _chat(server, **kw):
    return langchain_openai.ChatOpenAI(base_url=server.url + "v1", api_key="unused", model="demo", temperature=0,
                                       max_retries=0, max_tokens=120, **kw)


# --- LangChain ------------------------------------------------------------------------------------

def test_langchain_structured_output_json_schema(server):
    out = _chat(server).with_structured_output(City, method="json_schema").invoke(ASK_CITY)
    assert isinstance(out, City) and out.city == "Paris"


def test_langchain_structured_output_json_mode(server):
    out = _chat(server).with_structured_output(None, method="json_mode").invoke(ASK_CITY)
    assert isinstance(out, dict) and out          # json_mode promises an object, not its fields


def test_langchain_bind_tools_forced_choice(server):
    msg = _chat(server).bind_tools([WEATHER], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert len(msg.tool_calls) == 1, msg
    call = msg.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str) and call["id"]


def test_langchain_plain_and_streamed(server):
    chat = _chat(server)
    assert "Paris" in chat.invoke(QUESTION).content
    assert "Paris" in "".join(c.content for c in chat.stream(QUESTION))


# --- instructor -----------------------------------------------------------------------------------

def _instructor(server, mode):
    client = instructor.from_openai(server.client(), mode=getattr(instructor.Mode, mode))
    return client.chat.completions.create(model="demo", response_model=City, temperature=0, max_tokens=120,
                                          max_retries=0, messages=[{"role": "user", "content": ASK_CITY}])


@pytest.mark.parametrize("mode", ["JSON_SCHEMA", "TOOLS"])
def test_instructor_schema_and_tools_modes_validate(server, mode):
    out = _instructor(server, mode)
    assert isinstance(out, City) and out.city and out.country


def test_instructor_json_mode_answers_a_json_object(server):
    """Mode.JSON sends only {"type": "json_object"} (the schema goes in the system prompt), which
    promises an object, not its fields: the grammar guarantees the first, the model the second.
    The demo model copies the schema back, as it does from llama-server; a larger model fills it in."""
    try:
        out = _instructor(server, "JSON")
    except InstructorRetryException as e:
        content = e.last_completion.choices[0].message.content
        assert isinstance(json.loads(content), dict), content
    else:
        assert isinstance(out, City)


# --- litellm --------------------------------------------------------------------------------------

def _litellm(server, **kw):
    return litellm.completion(model="openai/demo", api_base=server.url + "v1", api_key="unused", temperature=0,
                              max_tokens=120, num_retries=0, **kw)


def test_litellm_tools(server):
    r = _litellm(server, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert isinstance(json.loads(calls[0].function.arguments).get("city"), str)


def test_litellm_tool_result_round_trip(server):
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    r = _litellm(server, tools=[WEATHER], messages=[
        ask, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}])
    # The demo model may answer or call the tool again (greedy, it is borderline between the two, and
    # a prompt whose start was computed by an earlier request can tip it); either way the turn was
    # taken with the call and its result in the prompt (their rendering is checked exactly in
    # test_agent_apis.py).
    m = r.choices[0].message
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls") and (m.content or m.tool_calls)


# --- Anthropic's SDK (the Messages API) -----------------------------------------------------------

# The 2026 SDK has no sampling arguments (Anthropic's newest models took them away); the API still
# takes temperature, as other Anthropic clients send it.
GREEDY = {"extra_body": {"temperature": 0}}
ANT_WEATHER = {"name": "get_weather", "description": "The current weather in a city.",
               "input_schema": WEATHER["function"]["parameters"]}


def _anthropic(server, **kw):
    return anthropic.Anthropic(base_url=server.url.rstrip("/"), api_key="unused", max_retries=0, **kw)


def test_anthropic_messages_plain_and_streamed(server):
    ask = [{"role": "user", "content": QUESTION}]
    m = _anthropic(server).messages.create(model="demo", max_tokens=40, messages=ask, **GREEDY)
    assert m.type == "message" and m.stop_reason == "end_turn"
    assert "Paris" in m.content[0].text and m.usage.input_tokens > 0 and m.usage.output_tokens > 0
    with _anthropic(server).messages.stream(model="demo", max_tokens=40, messages=ask, **GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == m.content[0].text and final.stop_reason == "end_turn"
    cut = _anthropic(server).messages.create(model="demo", max_tokens=3, messages=ask, stop_sequences=["Paris"],
                                             system="Answer in full sentences.", **GREEDY)
    assert cut.stop_reason in ("max_tokens", "stop_sequence") and "Paris" not in cut.content[0].text


def test_anthropic_tool_round_trip(server):
    client = _anthropic(server)
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    m = client.messages.create(model="demo", max_tokens=100, tools=[ANT_WEATHER], tool_choice={"type": "any"},
                               messages=[ask], **GREEDY)
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and isinstance(use.input.get("city"), str)
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "Sunny, 24 degrees."}
    after = client.messages.create(model="demo", max_tokens=60, tools=[ANT_WEATHER],
                                   messages=[ask, {"role": "assistant", "content": m.content},
                                             {"role": "user", "content": [result]}], **GREEDY)
    # The demo model may answer or call the tool again; either way the turn was taken, with the
    # call and its result in the prompt (their rendering is checked exactly in test_agent_apis.py).
    assert after.stop_reason in ("end_turn", "max_tokens", "tool_use") and after.content
    # (Anthropic's count: input_tokens were decoded, cache_read_input_tokens found computed)
    total = lambda u: u.input_tokens + u.cache_read_input_tokens  # noqa: E731
    assert total(after.usage) > total(m.usage) + 10


def test_anthropic_count_tokens_and_errors(server):
    client = _anthropic(server)
    n = client.messages.count_tokens(model="demo", messages=[{"role": "user", "content": QUESTION}]).input_tokens
    m = client.messages.create(model="demo", max_tokens=5, messages=[{"role": "user", "content": QUESTION}])
    assert n == m.usage.input_tokens + m.usage.cache_read_input_tokens
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model="demo", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert e.value.body["error"]["type"] == "invalid_request_error" and "image" in e.value.body["error"]["message"]


# --- the OpenAI Agents SDK, on its default path (the Responses API) -------------------------------

def test_agents_sdk_runs_an_agent_with_a_tool(server):
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    called = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        called.append(city)
        return f"Sunny, 24 degrees in {city}."

    def weather_agent():  # a client per event loop (httpx's connections belong to the loop that made them)
        model = agents.OpenAIResponsesModel(model="demo", openai_client=AsyncOpenAI(
            base_url=server.url + "v1", api_key="unused", max_retries=0))
        return agents.Agent(name="weather", instructions="Answer questions about the weather; use the tool.",
                            tools=[get_weather], model=model,
                            model_settings=agents.ModelSettings(
                                temperature=0, tool_choice="get_weather", max_tokens=200,
                                # llama.cpp's fields: DRY (no loop at temperature 0) and a stop string,
                                # so that the demo model's final answer is its first line, complete
                                extra_body={"dry_multiplier": 0.8, "stop": ["\n"]}),
                            reset_tool_choice=True)

    agent = weather_agent()
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert called and isinstance(called[0], str)
    assert isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"

    async def streamed():  # Runner.run_streamed: the same agent over the streamed Responses events
        run = agents.Runner.run_streamed(weather_agent(), "What is the weather in Rome?", max_turns=4)
        events = [e async for e in run.stream_events()]
        return run, events

    run, events = asyncio.run(streamed())
    assert called[-1] and isinstance(run.final_output, str) and run.final_output
    assert any(getattr(e, "name", None) == "tool_called" for e in events)


# --- the JavaScript SDK in a page, with --allow-origin ----------------------------------------------

OPENAI_JS = ("openai", "7.55.0")


@pytest.fixture(scope="module")
def openai_js(tmp_path_factory) -> Path:
    """The official JavaScript SDK from the npm registry (cached like the build's npm packages)."""
    from buildsys.stub import cache_dir

    name, version = OPENAI_JS
    folder = cache_dir() / f"npm-{name}-{version}"
    if not (folder / "package" / "index.mjs").exists():
        work = tmp_path_factory.mktemp("npm")
        tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=work, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(work / tgz) as tar:
            tar.extractall(work / "unpacked", filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.move(str(work / "unpacked"), folder)
    return folder


PAGE = """<!doctype html><script type="module">
import OpenAI from '/package/index.mjs';
window.ask = async (base, question) => {
  const client = new OpenAI({baseURL: base, apiKey: 'unused', dangerouslyAllowBrowser: true, maxRetries: 0});
  const r = await client.chat.completions.create(
    {model: 'demo', messages: [{role: 'user', content: question}], temperature: 0, max_tokens: 30});
  const s = await client.chat.completions.create(
    {model: 'demo', messages: [{role: 'user', content: question}], temperature: 0, max_tokens: 30, stream: true});
  let streamed = '';
  for await (const chunk of s) streamed += chunk.choices[0]?.delta?.content || '';
  return [r.choices[0].message.content, streamed];
};
window.ready = true;
</script>"""


def test_javascript_sdk_from_an_allowed_page(built_bundle, tmp_path_factory, openai_js):
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_page import CHROMIUM, FLAGS
    from test_server import served

    (openai_js / "page.html").write_text(PAGE)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(openai_js))
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{site.server_address[1]}"
    try:
        with served(built_bundle, tmp_path_factory, "--allow-origin", origin) as api, \
                sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page()
            page.goto(origin + "/page.html")
            page.wait_for_function("window.ready === true")
            plain, streamed = page.evaluate("([b, q]) => ask(b, q)", [api.url + "v1", QUESTION])
            browser.close()
    finally:
        site.shutdown()
    assert "Paris" in plain and streamed == plain
