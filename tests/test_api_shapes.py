"""The server's request and response shapes, in process: the real app and its handlers over a
stand-in engine (tests/fakes.py), so each shape is checked exactly and in milliseconds. What the
model does with them is tested end to end against the real bundle (test_server.py and others)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from fakes import FakeScheduler
from runtime.serving.routes import create_app
from runtime.launch.settings import Settings
from runtime.prompts.template import load_template

HI = [{"role": "user", "content": "Hi"}]
DATA = Path(__file__).parent / "data"


def client(worker=None, template="chatml", source=None, settings=None, **kw):
    worker = worker or FakeScheduler()
    app = create_app(settings or Settings(), worker, template=load_template(template, source, "<s>", "</s>"),
                     info={"name": "fake"}, **kw)
    return TestClient(app), worker


def events(text: str) -> list:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_chat_completion_shape_and_usage():
    c, w = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 7, "temperature": 0.2, "stop": ["x"]})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == "fake"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                "logprobs": None, "finish_reason": "stop"}]
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert w.calls[0].tokens == list(prompt.encode())
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 3, "total_tokens": len(prompt) + 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    s = w.calls[0].sampling
    assert (s.max_tokens, s.temp) == (7, 0.2) and s.stop[-1] == "x" and "<|im_end|>" in s.stop


def test_chat_stream_chunks_usage_and_done():
    c, _ = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, "stream": True,
                                              "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == "Paris."
    finishes = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert r.text.rstrip().endswith("data: [DONE]")


def test_completion_shape_with_logprobs():
    c, _ = client()
    body = c.post("/v1/completions", json={"prompt": "2+2=", "logprobs": 1}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Paris."
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Pa", "ri", "s."] and lp["text_offset"] == [0, 2, 4]
    assert lp["token_logprobs"] == [-0.5] * 3 and lp["top_logprobs"][0] == {"Pa": -0.5}


def test_completion_token_ids_and_bounds():
    c, w = client()
    assert c.post("/v1/completions", json={"prompt": [1, 2, 3]}).status_code == 200
    assert w.calls[0].tokens == [1, 2, 3]
    r = c.post("/v1/completions", json={"prompt": [1, 999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_chat_logprobs_shape():
    c, _ = client()
    body = c.post("/v1/chat/completions", json={"messages": HI, "logprobs": True, "top_logprobs": 1}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert content[0] == {"token": "Pa", "logprob": -0.5, "bytes": [80, 97],
                          "top_logprobs": [{"token": "Pa", "logprob": -0.5, "bytes": [80, 97]}]}


def test_n_choices_seeds_and_usage():
    c, w = client()
    body = c.post("/v1/chat/completions", json={"messages": HI, "n": 3, "seed": 10}).json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2]
    assert sorted(call.sampling.seed for call in w.calls) == [10, 11, 12]
    assert body["usage"]["completion_tokens"] == 9


def test_n_choices_streamed_interleave_with_index():
    c, _ = client()
    chunks = events(c.post("/v1/chat/completions", json={"messages": HI, "n": 2, "stream": True,
                                                         "stream_options": {"include_usage": True}}).text)
    for i in (0, 1):
        mine = [ch for ch in chunks if ch["choices"] and ch["choices"][0]["index"] == i]
        assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in mine) == "Paris."
    assert [ch for ch in chunks if not ch["choices"]][0]["usage"]["completion_tokens"] == 6


def test_responses_shape_and_incomplete():
    c, _ = client(FakeScheduler(finish="length"))
    body = c.post("/v1/responses", json={"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 3}).json()
    assert body["object"] == "response" and body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"} and body["instructions"] == "Be brief."
    assert body["output"][0]["content"][0]["text"] == "Paris."


def test_responses_stream_events_numbered():
    c, _ = client()
    r = c.post("/v1/responses", json={"input": "Hi", "stream": True})
    kinds = [line[7:] for line in r.text.splitlines() if line.startswith("event: ")]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "[DONE]" not in r.text
    assert [e["sequence_number"] for e in events(r.text)] == list(range(len(kinds)))


def test_generic_tool_call_parsed():
    answer = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    c, w = client(FakeScheduler(answer=answer))
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    body = c.post("/v1/chat/completions", json={"messages": HI, "tools": [tool], "tool_choice": "required"}).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert w.calls[0].sampling.grammar  # required: constrained by a grammar


def test_reasoning_content_split():
    source = (DATA / "thinking.jinja").read_text()
    c, _ = client(FakeScheduler(answer="<think>Capital of France.</think>Paris."), template="file:thinking",
                  source=source)
    message = c.post("/v1/chat/completions", json={"messages": HI}).json()["choices"][0]["message"]
    assert message.get("reasoning_content", "").strip() == "Capital of France." and message["content"].strip() == "Paris."


def test_apply_template_prompt_and_bos():
    c, w = client(template="file:bos", source="{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    prompt = c.post("/apply-template", json={"messages": HI}).json()["prompt"]
    assert prompt == "<s>[Hi]" and not w.calls
    w.engine.add_bos = True  # the tokenizer adds BOS itself: the prompt leaves it out, as llama-server's
    assert c.post("/apply-template", json={"messages": HI}).json()["prompt"] == "[Hi]"


@pytest.mark.parametrize("body, param, code", [
    ({"messages": HI, "frobnicate": 1}, "frobnicate", "unknown_parameter"),
    ({"messages": HI, "functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"messages": HI, "modalities": ["text", "audio"]}, "modalities", "unsupported_parameter"),
    ({"messages": HI, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs", "invalid_value"),
    ({"messages": []}, "messages", "invalid_type"),
    ({"messages": HI, "temperature": "hot"}, "temperature", "invalid_type"),
    ({"messages": HI, "logit_bias": {"999": 5}}, "logit_bias", "invalid_value"),
    ({"messages": HI, "grammar": "no rules here"}, "grammar", "invalid_value"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, "messages", "context_length_exceeded"),
])
def test_errors_name_the_field(body, param, code):
    c, w = client()
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error") and err["message"]
    assert not w.calls


def test_error_mapping_for_body_route_and_failure():
    c, _ = client(FakeScheduler(fail="the model failed"))
    r = c.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert c.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert c.get("/v1/chat/completions").status_code == 405
    r = c.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 500 and r.json()["error"] == {"message": "the model failed", "type": "server_error",
                                                        "param": None, "code": "generation_failed"}


def test_embeddings_shape():
    c, _ = client()
    body = c.post("/v1/embeddings", json={"input": ["ab", "cde"]}).json()
    assert [d["index"] for d in body["data"]] == [0, 1] and body["data"][0]["embedding"] == [0.6, 0.8]
    assert body["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    assert c.post("/v1/embeddings", json={"input": [[1, 2], [3]]}).json()["usage"]["prompt_tokens"] == 3


def test_ignored_fields_accepted_and_llama_sampling_fields_honoured():
    c, w = client()
    r = c.post("/v1/chat/completions", json={"messages": HI, "model": "x", "user": "u", "store": False,
                                              "metadata": {}, "top_k": 5, "repeat_penalty": 1.3,
                                              "modalities": ["text"], "chat_template_kwargs": {"custom": 1}})
    assert r.status_code == 200, r.text
    assert (w.calls[0].sampling.top_k, w.calls[0].sampling.repeat_penalty) == (5, 1.3)
    r = c.post("/v1/completions", json={"prompt": "a", "messages": HI})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_models_health_metrics():
    c, _ = client()
    assert c.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert c.get("/health").json()["slots"] == {"total": 2, "busy": 0}
    assert "bundle_requests_total 0" in c.get("/metrics").text
