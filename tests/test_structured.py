"""Structured output (issue 10.1) and logit_bias, through the real server and the official openai
client, on the demo model: the grammar sampler makes even a 135M model's reply parse."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel

from test_server import serving

ASK = [{"role": "user", "content": "Give the capital of France as JSON."}]


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


class City(BaseModel):
    city: str
    country: str
    population_millions: int


def test_json_schema_through_openai_parse(server):
    r = server.client().beta.chat.completions.parse(model="m", messages=ASK, response_format=City, temperature=0,
                                                    max_tokens=200)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City), r.choices[0].message.content
    assert parsed.city == "Paris"


def test_json_schema_not_strict_enum(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                               "sure": {"type": "boolean"}},
              "required": ["answer", "sure"]}
    r = server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=0.7, seed=3,
        max_tokens=60, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert data["answer"] in ("yes", "no") and isinstance(data["sure"], bool)


def test_json_object_streamed(server):
    stream = server.client().chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=120,
                                                     stream=True, response_format={"type": "json_object"})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.lstrip().startswith("{")
    # the demo model may run out of tokens inside an object; what it wrote is a JSON prefix
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        assert exc.pos >= len(text.rstrip()) - 1, text


def test_grammar_extension_field(server):
    r = server.client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=0, max_tokens=10,
        extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].message.content in ("yes", "no")
    r = server.client().completions.create(model="m", prompt="Two plus two is", max_tokens=5, temperature=0,
                                           extra_body={"grammar": 'root ::= " " [0-9]'})
    assert r.choices[0].text.strip().isdigit()


@pytest.mark.parametrize("body, what", [
    ({"grammar": "root ::= ("}, "does not parse"),
    ({"grammar": 5}, "grammar"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "json_schema"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "not both"),
    ({"logit_bias": {"abc": 1}}, "not a token id"),
    ({"logit_bias": {"5": 101}}, "-100 to 100"),
    ({"logit_bias": {"99999999": 1}}, "vocabulary"),
])
def test_bad_structured_requests_are_400(server, body, what):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="m", messages=ASK, max_tokens=5, extra_body=body)
    assert what in str(e.value)


def test_logit_bias_bans_a_token(server):
    c = server.client()
    q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    base = c.chat.completions.create(model="m", messages=q, temperature=0, max_tokens=12)
    text = base.choices[0].message.content
    assert "Paris" in text
    # ban every token of the vocabulary that spells Paris (GPT-2 style: Ġ is a leading space)
    import gguf

    from conftest import MODEL

    vocab = gguf.GGUFReader(str(MODEL)).fields["tokenizer.ggml.tokens"].contents()
    tokens = [i for i, t in enumerate(vocab) if t.lstrip("Ġ") in ("Paris", "Par", "P")]
    assert tokens
    r = c.chat.completions.create(model="m", messages=q, temperature=0, max_tokens=12,
                                  logit_bias={str(t): -100 for t in set(tokens)})
    assert r.choices[0].message.content != text
    assert "Paris" not in r.choices[0].message.content


def test_token_id_inputs_for_completions_and_embeddings(server):
    c = server.client()
    import gguf

    from conftest import MODEL

    vocab = gguf.GGUFReader(str(MODEL)).fields["tokenizer.ggml.tokens"].contents()
    ids = [vocab.index(t) for t in ("The", "Ġcapital", "Ġof", "ĠFrance", "Ġis")]
    by_ids = c.completions.create(model="m", prompt=ids, max_tokens=4, temperature=0)
    by_text = c.completions.create(model="m", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    e_ids = c.embeddings.create(model="m", input=[ids, ids[:2]])
    e_text = c.embeddings.create(model="m", input="The capital of France is")
    assert len(e_ids.data) == 2 and len(e_ids.data[0].embedding) == len(e_text.data[0].embedding)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="m", prompt=[10**9], max_tokens=2)
    assert "vocabulary" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="m", input=[[1, 2], "text"])


def test_n_choices(server):
    c = server.client()
    q = [{"role": "user", "content": "Name a colour."}]
    r = c.chat.completions.create(model="m", messages=q, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert all(ch.message.content for ch in r.choices)
    assert r.usage.completion_tokens >= 3
    # greedy: every choice is the same answer; seeds differ per choice, so a seeded run repeats
    g = c.chat.completions.create(model="m", messages=q, n=2, temperature=0, max_tokens=12)
    assert g.choices[0].message.content == g.choices[1].message.content
    again = c.chat.completions.create(model="m", messages=q, n=3, temperature=1.0, seed=7, max_tokens=12)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in r.choices]
    cm = c.completions.create(model="m", prompt="Colours: red,", n=2, max_tokens=4, temperature=0)
    assert len(cm.choices) == 2 and cm.choices[1].index == 1


def test_n_choices_streamed_match_the_unstreamed_ones(server):
    """Streamed, the choices interleave chunk by chunk, each with its index; seeded, each choice
    is the text the unstreamed request gives at that index; one usage chunk counts them all."""
    c = server.client()
    q = [{"role": "user", "content": "Name a colour."}]
    whole = c.chat.completions.create(model="m", messages=q, n=3, temperature=1.0, seed=11, max_tokens=12)
    texts, finishes, usage = {0: "", 1: "", 2: ""}, {}, []
    for chunk in c.chat.completions.create(model="m", messages=q, n=3, temperature=1.0, seed=11, max_tokens=12,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage.append(chunk.usage)
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert [texts[i] for i in range(3)] == [ch.message.content for ch in whole.choices]
    assert sorted(finishes) == [0, 1, 2]
    assert len(usage) == 1 and usage[0].completion_tokens == whole.usage.completion_tokens
    cm = c.completions.create(model="m", prompt="Colours: red,", n=2, max_tokens=4, temperature=0, stream=True)
    got = {0: "", 1: ""}
    for chunk in cm:
        for ch in chunk.choices:
            got[ch.index] += ch.text
    assert got[0] == got[1] and got[0]


# -- logprobs (issue 10.3) ------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_chat_logprobs_are_the_models_own(server):
    r = server.client().chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=12,
                                                logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 3
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(2.718281828 ** v for v in values) <= 1.0001
        # greedy: the token chosen is the most likely one, with the same log-probability
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5


def test_streamed_chat_logprobs_match_the_unstreamed_ones(server):
    client = server.client()
    kw = dict(model="m", messages=QUESTION, temperature=0, max_tokens=12, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kw).choices[0].logprobs.content
    text, streamed = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices and chunk.choices[0].delta.content:
            text.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert "".join(t.token for t in streamed) == "".join(text)
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, whole))


def test_completion_logprobs_and_a_stop_string_cuts_them_too(server):
    client = server.client()
    r = client.completions.create(model="m", prompt="The capital of France is", temperature=0, max_tokens=8,
                                  logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # the same request stopped at its second word: no token of the stop string is listed
    words = r.choices[0].text.split()
    assert len(words) >= 2, r.choices[0].text
    stopped = client.completions.create(model="m", prompt="The capital of France is", temperature=0, max_tokens=8,
                                        logprobs=0, stop=[words[1]])
    slp = stopped.choices[0].logprobs
    assert words[1] not in stopped.choices[0].text
    assert "".join(slp.tokens).startswith(stopped.choices[0].text) and len(slp.tokens) < len(lp.tokens)
    assert slp.top_logprobs is None


def test_no_logprobs_unless_asked(server):
    r = server.client().chat.completions.create(model="m", messages=QUESTION, temperature=0, max_tokens=4)
    assert r.choices[0].logprobs is None


# -- the Responses API (issue 10.3) ---------------------------------------------------------------


def test_responses_api_through_the_openai_client(server):
    client = server.client()
    r = client.responses.create(model="m", input="What is the capital of France? Answer in one word.",
                                temperature=0)
    assert r.status == "completed" and "Paris" in r.output_text
    assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    # instructions are the system message; max_output_tokens cuts the answer (status incomplete)
    r = client.responses.create(model="m", instructions="Always answer in French.", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me a long story about a cat."}]}],
        max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_responses_api_streams_typed_events(server):
    client = server.client()
    kinds, deltas, final = [], [], None
    with client.responses.stream(model="m", input="What is the capital of France? Answer in one word.",
                                 temperature=0) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(deltas) == final.output_text and "Paris" in final.output_text


def test_responses_api_json_schema_and_refusals(server):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    r = server.client().responses.create(model="m", input="Give the capital of France as JSON.", temperature=0,
                                         text={"format": {"type": "json_schema", "name": "c", "schema": schema,
                                                          "strict": True}})
    assert json.loads(r.output_text)["city"]
    for body, param in ([{"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"],
                        [{"input": "hi", "previous_response_id": "resp_x"}, "previous_response_id"],
                        [{"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"],
                        [{"input": "hi", "frobnicate": 1}, "frobnicate"],
                        [{"input": ""}, "input"]):
        status, answer = server.request("POST", "/v1/responses", body)
        assert status == 400 and answer["error"]["param"] == param, answer
