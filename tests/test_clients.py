"""The libraries people point at an OpenAI-compatible server for real work (issue 10), each driving
the real bundle's server on 127.0.0.1 with the demo model: LangChain's ChatOpenAI (structured output
both ways, forced tool calls), instructor (JSON, JSON_SCHEMA and TOOLS modes) and litellm (tools).
Every result must parse and validate; the grammar sampler is what makes a 135M model manage it."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import BaseModel

from conftest import QUESTION
from test_server import serving

# litellm fetches a price list from GitHub when imported unless told to use its own copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

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
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
