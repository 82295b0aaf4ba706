"""Reasoning templates (issue 10.4): the thinking in `reasoning_content`, the answer in `content`,
streamed apart; `enable_thinking` passed to templates that take it. The demo model does not think
by itself: a grammar (llama.cpp's `grammar` field) makes it write a <think> block, and the real
server must take it apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_bundle_cmd
from test_server import serving

from runtime.prompts import reasoning

DATA = Path(__file__).parent / "data"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
THINK_GRAMMAR = 'root ::= "<think>" [a-z ]{3,30} "</think>" "\\n\\nParis."'
OPEN_GRAMMAR = 'root ::= [a-z ]{3,30} "</think>" "\\n\\nParis."'


def _serve(model, tmp_path_factory, template):
    out = tmp_path_factory.mktemp("think") / "think"
    r = run_bundle_cmd("build", model, "--template", DATA / template, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def qwen3(model, stub, tmp_path_factory):
    yield from serving(_serve(model, tmp_path_factory, "thinking.jinja"), tmp_path_factory)


@pytest.fixture(scope="module")
def r1(model, stub, tmp_path_factory):
    yield from serving(_serve(model, tmp_path_factory, "thinking_open.jinja"), tmp_path_factory)


def test_thinking_goes_to_reasoning_content(qwen3):
    r = qwen3.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=60,
                                               extra_body={"grammar": THINK_GRAMMAR})
    m = r.choices[0].message
    assert m.content == "Paris."
    assert m.reasoning_content and "<think>" not in m.reasoning_content and "</think>" not in m.reasoning_content


def test_streamed_thinking_then_answer(qwen3):
    chunks = list(qwen3.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=60,
                                                         stream=True, extra_body={"grammar": THINK_GRAMMAR}))
    thought = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer == "Paris." and thought.strip() and "think>" not in thought + answer
    whole = qwen3.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=60,
                                                   extra_body={"grammar": THINK_GRAMMAR}).choices[0].message
    assert thought.strip() == whole.reasoning_content


@pytest.mark.parametrize("body", [{"chat_template_kwargs": {"enable_thinking": False}}, {"reasoning_effort": "none"}])
def test_enable_thinking_reaches_the_template(qwen3, body):
    """Turned off, the template writes an empty <think></think> block into the prompt: more tokens."""
    client = qwen3.client()
    on = client.chat.completions.create(model="m", messages=ASK, max_tokens=1).usage.prompt_tokens
    off = client.chat.completions.create(model="m", messages=ASK, max_tokens=1, extra_body=body).usage.prompt_tokens
    assert off > on


def test_answer_starting_inside_an_open_think_block(r1):
    r = r1.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=60,
                                            extra_body={"grammar": OPEN_GRAMMAR})
    m = r.choices[0].message
    assert m.content == "Paris." and m.reasoning_content


def test_bad_reasoning_fields_are_400(qwen3):
    for body, param in (({"reasoning_effort": "max"}, "reasoning_effort"),
                        ({"chat_template_kwargs": {"enable_thinking": "no"}}, "chat_template_kwargs")):
        status, answer = qwen3.request("POST", "/v1/chat/completions", {"messages": ASK, **body})
        assert status == 400 and answer["error"]["param"] == param, answer


@pytest.mark.parametrize("pieces, inside, expect", [
    (["<think>a b", "</think>\n\nok"], False, ("a b", "ok")),
    (["<th", "ink>x</th", "ink>y"], False, ("x", "y")),
    (["x</think>y"], True, ("x", "y")),
    (["no thinking at all"], False, (None, "no thinking at all")),
    (["text with <think> later"], False, (None, "text with <think> later")),
])
def test_splitter(pieces, inside, expect):
    s = reasoning.Splitter(inside)
    parts = [p for piece in pieces for p in s.feed(piece)] + s.finish()
    thought = "".join(t for k, t in parts if k == "reasoning") or None
    answer = "".join(t for k, t in parts if k == "content")
    assert (thought, answer) == expect
    assert reasoning.split("".join(pieces), inside) == expect
