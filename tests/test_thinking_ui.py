"""Reasoning models as people see them (issue 10.4): the thinking shown apart from the answer, or
hidden, and thinking turned off, in the web chat (headless Chromium), in the terminal chat and
with -p. Two real bundles of the demo model: one with an R1-style template (the generation prompt
opens <think>, so all the 135M model writes within the limit is thinking) and one with a
Qwen3-style template that takes enable_thinking (off: the template closes the thinking at once
and the model answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import QUESTION, run_bundle_cmd, run_exe
from test_page import CHROMIUM, FLAGS
from test_server import served

sync_api = pytest.importorskip("playwright.sync_api")
DATA = Path(__file__).parent / "data"


def _build(model, tmp_path_factory, template, *extra):
    out = tmp_path_factory.mktemp("thinkui") / template.split(".")[0]
    r = run_bundle_cmd("build", model, "--template", DATA / template, "--temp", "0", *extra, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def r1(model, stub, tmp_path_factory):
    return _build(model, tmp_path_factory, "thinking_open.jinja", "--max-tokens", "24")


@pytest.fixture(scope="module")
def qwen3(model, stub, tmp_path_factory):
    return _build(model, tmp_path_factory, "thinking.jinja", "--max-tokens", "24")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _open(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 720}, bypass_csp=True)
    pg = context.new_page()
    errors, bodies = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("request", lambda r: bodies.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
    pg.goto(server.url)
    pg.wait_for_function("document.getElementById('model-name').textContent !== '…'")
    return context, pg, errors, bodies


def _ask(pg, text=QUESTION):
    pg.fill("#input", text)
    pg.press("#input", "Enter")
    pg.wait_for_selector("#stop", state="visible")
    pg.wait_for_selector("#send", state="visible", timeout=60_000)


def test_page_shows_the_thinking_apart_and_hides_it(browser, r1, tmp_path_factory):
    with served(r1, tmp_path_factory) as server:
        context, pg, errors, bodies = _open(browser, server)
        _ask(pg)
        msg = pg.locator(".msg.assistant").last
        thought = msg.locator("details.thinking .thought").inner_text()
        assert thought.strip() and "<think>" not in thought
        assert msg.locator(".body").inner_text().strip() == ""  # still thinking at the limit: no answer
        assert msg.locator("details.thinking summary").inner_text() == "Thought"
        pg.click("#toggle-settings")
        assert pg.is_visible("#show-thinking-row") and not pg.is_visible("#think-row")  # R1 has no switch
        pg.uncheck("#show-thinking")
        assert not msg.locator("details.thinking").is_visible()
        pg.reload()
        pg.wait_for_selector(".msg.assistant")
        assert not pg.locator("details.thinking").first.is_visible()  # the choice is kept
        pg.click("#toggle-settings")
        pg.check("#show-thinking")
        pg.locator("details.thinking summary").first.click()
        assert pg.locator("details.thinking .thought").first.inner_text() == thought  # kept with the chat
        _ask(pg, "And of Spain?")
        sent = json.loads(bodies[-1])
        assert all(set(m) == {"role", "content"} for m in sent["messages"])  # the thinking is not sent back
        assert errors == []
        context.close()


def test_page_turns_thinking_off(browser, qwen3, tmp_path_factory):
    with served(qwen3, tmp_path_factory) as server:
        context, pg, errors, bodies = _open(browser, server)
        pg.click("#toggle-settings")
        assert pg.is_visible("#think-row") and pg.is_checked("#think")  # on by default, as llama-server
        pg.uncheck("#think")
        pg.click("#toggle-settings")
        _ask(pg)
        assert json.loads(bodies[-1])["chat_template_kwargs"] == {"enable_thinking": False}
        msg = pg.locator(".msg.assistant").last
        assert msg.locator(".body").inner_text().strip()  # an answer, at once
        assert msg.locator("details.thinking").count() == 0
        assert errors == []
        context.close()


def test_terminal_shows_or_hides_the_thinking(r1):
    shown = run_exe(r1, "--cli", input=QUESTION + "\n")
    assert shown.returncode == 0, shown.stderr
    after = shown.stdout.split("Ctrl-D to leave.", 1)[1]
    assert "Thinking…\n" in after and "<think>" not in after
    thought = after.split("Thinking…\n", 1)[1].strip()
    assert len(thought) > 10
    hidden = run_exe(r1, "--cli", input="/think hide\n" + QUESTION + "\n")
    assert "(thinking…)" in hidden.stdout and thought not in hidden.stdout
    assert "Thinking…" not in hidden.stdout


def test_terminal_turns_thinking_off(qwen3):
    r = run_exe(qwen3, "--cli", input="/think off\n" + QUESTION + "\n")
    assert r.returncode == 0, r.stderr
    after = r.stdout.split("(thinking off: answers at once)\n", 1)[1]
    assert after.strip() and "Thinking…" not in after and "think>" not in after


def test_one_shot_keeps_the_thinking_off_stdout(r1, qwen3):
    r = run_exe(r1, "-p", QUESTION)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "\n"  # the answer had not begun: nothing of the thinking is printed as one
    assert "no answer" in r.stderr and "--think off" in r.stderr
    r = run_exe(qwen3, "-p", QUESTION, "--think", "off")
    assert r.returncode == 0 and r.stdout.strip() and "think>" not in r.stdout
