"""Conversations longer than the context (issue 27): the terminal chat, the web chat and the API
keep going by leaving out the oldest turns (`--context-overflow truncate`, the chat's default;
`truncation: "auto"` on the API, whose default stays OpenAI's 400), the system prompt and the
latest turn always kept, with a line saying how many turns were left out; an answer cut by the end
of the context says so. The fitting itself in process, then the real bundle at -c 512."""

from __future__ import annotations

import json
import subprocess

import pytest

from fakes import FakeEngine, FakeScheduler
from runtime.prompts import fitting
from test_api_shapes import client
from test_server import served

LONG = ("Tell me about the history of the city of {n}, its rivers, its bridges, its markets, its old streets, "
        "the people who lived there and the trades they had, in a few sentences.")


def _chat(turns: int, system: bool = True) -> list[dict]:
    out = [{"role": "system", "content": "You are brief."}] if system else []
    for i in range(turns):
        out.append({"role": "user", "content": LONG.format(n=i)})
        if i < turns - 1:
            out.append({"role": "assistant", "content": f"Answer {i}. " * 20})
    return out


# --- the fitting ----------------------------------------------------------------------------------

def _size(ms):  # a stand-in token count: characters
    return sum(len(m["content"]) for m in ms)


def test_fit_leaves_out_the_fewest_oldest_turns():
    ms = _chat(10)
    kept, dropped = fitting.fit(ms, _size, 2000)
    assert _size(kept) <= 2000 and dropped > 0
    assert kept[0] == ms[0] and kept[-1] == ms[-1]  # the system prompt and the latest turn
    assert kept[1]["role"] == "user" and kept[1:] == ms[len(ms) - len(kept) + 1:]  # whole turns, the newest
    start = len(ms) - len(kept) + 1  # where the kept turns begin
    assert _size(ms[:1] + ms[start - 2:]) > 2000  # one turn more (a question and its answer) would not fit
    assert _size(fitting.fit(ms, _size, _size(kept) - 1)[0]) < _size(kept)
    assert fitting.fit(ms, _size, 10**6) == (ms, 0)


def test_fit_keeps_tool_results_with_their_turn_and_the_last_turn_always():
    ms = [{"role": "user", "content": "a" * 100},
          {"role": "assistant", "content": "", "tool_calls": []},
          {"role": "tool", "content": "b" * 100},
          {"role": "assistant", "content": "c" * 100},
          {"role": "user", "content": "d" * 50}]
    kept, dropped = fitting.fit(ms, _size, 60)
    assert (kept, dropped) == ([ms[-1]], 1)
    kept, dropped = fitting.fit(ms, _size, 10)  # not even the last turn fits: kept anyway, the caller says so
    assert kept == [ms[-1]] and dropped == 1


def test_fit_by_bytes_first_never_tokenizes_a_huge_chat():
    ms = _chat(2000, system=False)
    seen = []

    def count(m):
        seen.append(_size(m))
        return _size(m)

    kept, dropped = fitting.fit(ms, count, 3000, max_bytes=6000)
    assert max(seen) <= 6000 and _size(kept) <= 3000 and dropped == 2000 - (len(kept) + 1) // 2


# --- the API, in process --------------------------------------------------------------------------

def _roomy(n_ctx=4096):
    engine = FakeEngine()
    engine.n_ctx = n_ctx
    return FakeScheduler(engine=engine)


def test_api_keeps_openais_400_and_truncates_when_asked():
    c, w = client(_roomy(2048))
    ask = {"messages": _chat(12), "max_tokens": 100}
    r = c.post("/v1/chat/completions", json=ask)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "X-Turns-Left-Out" not in r.headers
    r = c.post("/v1/chat/completions", json={**ask, "truncation": "auto"})
    assert r.status_code == 200, r.text
    left = int(r.headers["X-Turns-Left-Out"])
    prompt = bytes(w.calls[-1].tokens).decode()
    assert 0 < left < 12 and len(w.calls[-1].tokens) <= 2048 - 100
    assert prompt.startswith("<|im_start|>system\nYou are brief.") and LONG.format(n=11) in prompt
    assert LONG.format(n=left - 1) not in prompt and LONG.format(n=left) in prompt
    r = c.post("/v1/chat/completions", json={**ask, "truncation": "auto", "stream": True})
    assert r.status_code == 200 and r.headers["X-Turns-Left-Out"] == str(left)
    r = c.post("/v1/responses", json={"input": _chat(12)[1:], "instructions": "You are brief.",
                                      "max_output_tokens": 100, "truncation": "auto"})
    assert r.status_code == 200 and int(r.headers["X-Turns-Left-Out"]) == left
    r = c.post("/v1/chat/completions", json={**ask, "truncation": "sometimes"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncation"


def test_api_truncation_of_a_chat_too_long_to_tokenize():
    c, w = client(_roomy(2048))
    r = c.post("/v1/chat/completions", json={"messages": _chat(400), "truncation": "auto", "max_tokens": 50})
    assert r.status_code == 200 and int(r.headers["X-Turns-Left-Out"]) > 390
    r = c.post("/v1/chat/completions", json={"messages": _chat(400), "max_tokens": 50})
    assert r.status_code == 400


def test_the_page_is_told_the_setting():
    from runtime.launch.settings import Settings

    c, _ = client()
    assert c.get("/info").json()["context_overflow"] == "truncate"
    c, _ = client(settings=Settings(context_overflow="error"))
    assert c.get("/info").json()["context_overflow"] == "error"


# --- the real bundle at -c 512 ---------------------------------------------------------------------

TURNS = 30


def test_terminal_chat_goes_on_for_30_long_turns(built_bundle):
    script = "".join(LONG.format(n=f"Town{i}") + "\n" for i in range(TURNS)) + "/exit\n"
    r = subprocess.run([str(built_bundle), "--cli", "-c", "512", "--temp", "0", "-n", "48",
                        "--system", "You are brief."], input=script, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "longer than the context" not in out and "[" not in out.replace("[DONE]", "")
    notes = [line for line in out.splitlines() if "earlier turn" in line]
    assert len(notes) >= TURNS - 5 and "the context of 512 tokens" in notes[-1]
    # every turn was answered: 30 replies between the prompts
    replies = [part for part in out.split(">>> ")[1:TURNS + 1]]
    assert len(replies) == TURNS and all(len(p.strip()) > 20 for p in replies), replies[:3]


def test_terminal_chat_error_mode_still_refuses(built_bundle):
    script = "".join(LONG.format(n=i) + "\n" for i in range(6)) + "/exit\n"
    r = subprocess.run([str(built_bundle), "--cli", "-c", "256", "--temp", "0", "-n", "40",
                        "--context-overflow", "error"], input=script, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0
    assert "longer than the context (256 tokens)" in r.stdout and "earlier turn" not in r.stdout


def test_an_answer_that_reaches_the_end_of_the_context_says_so(built_bundle, tmp_path_factory):
    r = subprocess.run([str(built_bundle), "--cli", "-c", "256", "--temp", "0", "-n", "-1"],
                       input="Write a very long story about a dragon.\n/exit\n", capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "(the answer reached the end of the context of 256 tokens)" in r.stdout
    r = subprocess.run([str(built_bundle), "--cli", "--temp", "0", "-n", "8"],
                       input="Write a very long story about a dragon.\n/exit\n", capture_output=True, text=True,
                       timeout=300)
    assert "(the answer reached --max-tokens 8)" in r.stdout
    with served(built_bundle, tmp_path_factory, "-c", "256") as s:
        status, body = s.request("POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}], "temperature": 0})
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        # the context is full: the last token is sampled from it, never decoded into it
        assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] in (256, 257)


def test_api_on_the_real_bundle_with_and_without_truncation(built_bundle, tmp_path_factory):
    with served(built_bundle, tmp_path_factory, "-c", "512") as s:
        ask = {"messages": _chat(8), "temperature": 0, "max_tokens": 32}
        status, body = s.request("POST", "/v1/chat/completions", ask)
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        conn_status, answer = s.request("POST", "/v1/chat/completions", {**ask, "truncation": "auto"})
        assert conn_status == 200 and answer["choices"][0]["message"]["content"]
        assert answer["usage"]["prompt_tokens"] <= 512 - 32
        # the next turn: its kept turns are further on in the slot's cache, moved down, not decoded
        more = ask["messages"] + [answer["choices"][0]["message"], {"role": "user", "content": LONG.format(n="Rome")}]
        status, _ = s.request("POST", "/v1/chat/completions", {**ask, "messages": more, "truncation": "auto"})
        _, metrics = s.request("GET", "/metrics")
        shifted = next(float(line.split()[-1]) for line in metrics.decode().splitlines()
                       if line.startswith("bundle_shifted_tokens_total"))
        assert status == 200 and shifted > 100


def test_web_chat_goes_on_for_30_long_turns(built_bundle, tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    from test_page import CHROMIUM, FLAGS, set_temperature

    with served(built_bundle, tmp_path_factory, "-c", "512", "-n", "40") as s, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(s.url)
        page.locator("#model-name").filter(has_text="SmolLM2").wait_for()
        set_temperature(page, 0)
        for i in range(TURNS):
            page.fill("#input", LONG.format(n=f"Town{i}"))
            page.press("#input", "Enter")
            page.locator(".msg.assistant").nth(i).wait_for()
            page.wait_for_selector("#send", state="visible", timeout=120_000)
        answers = page.locator(".msg.assistant .body").all_inner_texts()
        notes = page.locator("#messages > .note").all_inner_texts()
        errors = page.locator(".msg.error").count()
        browser.close()
    assert errors == 0 and len(answers) == TURNS and all(a.strip() for a in answers)
    assert len(notes) >= TURNS - 5 and all("earlier turn" in n and "512 tokens" in n for n in notes)
