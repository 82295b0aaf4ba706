"""The chat page in headless Chromium (Debian's, driven by Playwright), on a real bundle's server."""

import os
from pathlib import Path

import pytest
from conftest import QUESTION
from test_server import serving

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    # bypass_csp lets Playwright evaluate its predicates; it also means the XSS test below proves
    # the renderer safe on its own, without the page's Content-Security-Policy as a second wall.
    context = browser.new_context(viewport={"width": 1000, "height": 720}, bypass_csp=True)
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    requests = []
    pg.on("request", lambda r: requests.append(r.url))
    pg.goto(server.url)
    pg.wait_for_function("document.getElementById('model-name').textContent !== '…'")
    yield pg
    assert errors == []
    assert all(u.startswith(server.url) for u in requests), requests  # nothing from the network
    context.close()


def set_temperature(pg, value):
    pg.click("#toggle-settings")
    pg.fill("#temperature", str(value))
    pg.dispatch_event("#temperature", "change")
    pg.click("#toggle-settings")


def test_ask_see_streamed_answer_and_keep_it(page, server):
    assert page.inner_text("#model-name") == "SmolLM2-135M-Instruct"
    assert "CPU (" in page.inner_text("#backend")
    set_temperature(page, 0)
    page.fill("#input", QUESTION)
    page.press("#input", "Enter")
    page.wait_for_selector("#stop", state="visible")
    page.wait_for_selector("#send", state="visible", timeout=60_000)  # the reply is complete
    answer = page.locator(".msg.assistant").last.inner_text()
    assert "Paris" in answer
    assert "tokens/s" in page.inner_text("#speed")
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert "Paris" in page.locator(".msg.assistant").last.inner_text()
    assert page.locator("#conversations li").count() >= 1


def test_stop_mid_reply_and_screenshot(page, tmp_path):
    set_temperature(page, 0)
    page.fill("#input", "Write a very long essay about the history of Europe, with many details.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "document.querySelector('.msg.assistant:last-of-type') && "
        "document.querySelector('.msg.assistant:last-of-type').innerText.length > 80", timeout=60_000)
    # Under the test's temp folder; BUNDLE_SCREENSHOT_DIR=dist refreshes the review screenshot.
    out = Path(os.environ.get("BUNDLE_SCREENSHOT_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "chat-page-mid-answer.png"))
    assert (out / "chat-page-mid-answer.png").stat().st_size > 10_000
    page.click("#stop")
    page.wait_for_selector("#send", state="visible", timeout=10_000)
    assert "(stopped)" in page.locator(".msg.assistant").last.inner_text()
    partial = page.locator(".msg.assistant").last.inner_text()
    page.wait_for_timeout(500)
    assert page.locator(".msg.assistant").last.inner_text() == partial  # nothing more arrives
    page.reload()
    page.wait_for_selector(".msg.assistant")
    kept = page.locator(".msg.assistant").last.inner_text()
    assert len(kept) > 40 and kept in partial


def test_new_chat_and_code_block_copy_button(page):
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.evaluate("""() => {
        const d = JSON.parse(localStorage.getItem('bundle-chat-v1'));
        d.conversations[0].messages = [{role: 'user', content: 'code?'},
            {role: 'assistant', content: 'Here:\\n\\n```python\\nprint(1)\\n```\\n'}];
        localStorage.setItem('bundle-chat-v1', JSON.stringify(d));
    }""")
    page.reload()
    page.wait_for_selector("pre code")
    assert page.locator("pre .copy").count() == 1
    assert page.inner_text("pre code").strip() == "print(1)"


def test_model_output_never_runs_as_html(page):
    """A reply holding HTML shows as text; its handlers and scripts never run."""
    evil = 'Look: <img src=x onerror="window.__pwned=1"> and <script>window.__pwned=2</script> done'
    page.evaluate("""(evil) => {
        const d = JSON.parse(localStorage.getItem('bundle-chat-v1'));
        d.conversations.unshift({id: 'x', title: 'evil', system: '', temperature: 0,
            messages: [{role: 'user', content: 'hi'}, {role: 'assistant', content: evil}]});
        d.current = 'x';
        localStorage.setItem('bundle-chat-v1', JSON.stringify(d));
    }""", evil)
    page.reload()
    page.wait_for_selector(".msg.assistant")
    page.wait_for_timeout(300)
    text = page.locator(".msg.assistant").last.inner_text()
    assert '<img src=x onerror="window.__pwned=1">' in text and "<script>" in text
    assert page.locator(".msg.assistant img, .msg.assistant script").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_phone_screen_and_dark_mode(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 800}, color_scheme="dark")
    pg = context.new_page()
    pg.goto(server.url)
    pg.wait_for_selector("#input")
    assert pg.locator("#sidebar").bounding_box()["x"] < 0  # tucked away
    assert pg.is_visible("#toggle-sidebar")
    bg = pg.evaluate("getComputedStyle(document.body).backgroundColor")
    assert bg != "rgb(255, 255, 255)"
    width = pg.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    context.close()


def test_two_tabs_answer_at_once(browser, server):
    """Two tabs (two browser contexts, so two separate conversations) ask at the same moment;
    with the server's slots both stream their answers together."""
    tabs = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1000, "height": 720}, bypass_csp=True)
        pg = context.new_page()
        pg.goto(server.url)
        pg.wait_for_function("document.getElementById('model-name').textContent !== '…'")
        set_temperature(pg, 0)
        tabs.append((context, pg))
    for _, pg in tabs:
        pg.fill("#input", QUESTION)
    for _, pg in tabs:
        pg.press("#input", "Enter")
    for _, pg in tabs:
        pg.wait_for_selector("#send", state="visible", timeout=60_000)
        assert "Paris" in pg.locator(".msg.assistant").last.inner_text()
    _, health = server.request("GET", "/health")
    assert health["slots"]["total"] >= 2
    for context, _ in tabs:
        context.close()
