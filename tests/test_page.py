"""The chat page in headless Chromium (Debian's, driven by Playwright), on a real bundle's server."""

import json
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


# --- attachments (issue 28): text files and PDFs, read in the page, sent as text parts ----------------

def make_pdf(text: str) -> bytes:
    """A one-page PDF whose text is `text` (Helvetica), built by hand: objects, then the
    cross-reference table of their byte offsets."""
    stream = f"BT /F1 14 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def csp_page(browser, server):
    """The page with its Content-Security-Policy in force (pdf.js and its worker must load under it)."""
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    pg = context.new_page()
    errors, bodies = [], []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Content Security" in m.text else None)
    pg.on("request", lambda r: bodies.append(r.post_data) if r.url.endswith("/v1/chat/completions") else None)
    pg.goto(server.url)
    pg.locator("#model-name").filter(has_text="SmolLM2").wait_for()
    pg.bodies = bodies
    yield pg
    assert errors == []
    context.close()


def _ask_with(pg, files, question):
    pg.set_input_files("#file", files)
    pg.locator("#attachments .chip").nth(len(files) - 1).wait_for()
    pg.fill("#input", question)
    pg.press("#input", "Enter")
    pg.wait_for_selector("#stop", state="visible")
    pg.wait_for_selector("#send", state="visible", timeout=60_000)
    return pg.locator(".msg.assistant").last.inner_text()


def test_attach_a_text_file_and_a_pdf(csp_page, tmp_path):
    pg = csp_page
    set_temperature(pg, 0)
    txt = tmp_path / "secret.txt"
    txt.write_text("The secret word is Zanzibar.\n")
    answer = _ask_with(pg, [str(txt)], "What is the secret word in the file? Answer in one word.")
    assert "Zanzibar" in answer
    sent = json.loads(pg.bodies[-1])["messages"][-1]["content"]
    assert sent[0] == {"type": "text", "text": "File: secret.txt\n```\nThe secret word is Zanzibar.\n\n```\n\n"}
    assert sent[1]["text"].startswith("What is the secret word")
    chip = pg.locator(".msg.user .chip").last.inner_text()
    assert "secret.txt" in chip and "29 B" in chip and pg.locator("#attachments .chip").count() == 0

    pg.click("#new-chat")
    set_temperature(pg, 0)
    pdf = tmp_path / "letter.pdf"
    # (the demo model answers this one alike on every CPU variant; "The password is Marmalade."
    # flipped to "a word" on some)
    pdf.write_bytes(make_pdf("The cat is called Biscuit."))
    answer = _ask_with(pg, [str(pdf)], "What is the cat called? Answer in one word.")
    assert "biscuit" in answer.lower()
    sent = json.loads(pg.bodies[-1])["messages"][-1]["content"]
    assert "The cat is called Biscuit." in sent[0]["text"] and "letter.pdf" in sent[0]["text"]
    pg.reload()  # the conversation keeps its attachment
    pg.locator(".msg.user .chip").filter(has_text="letter.pdf").wait_for()


def test_attachments_refused_before_sending(csp_page, tmp_path):
    pg = csp_page
    png = tmp_path / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)))
    pg.set_input_files("#file", [str(png), str(binary)])
    pg.locator(".msg.error").filter(has_text="photo.png: images cannot be attached").wait_for()
    pg.locator(".msg.error").filter(has_text="data.bin: not a text file or a PDF").wait_for()
    assert pg.locator("#attachments .chip").count() == 0
    # a file whose text cannot fit the context (4096 tokens) is refused before anything is sent
    big = tmp_path / "big.txt"
    big.write_text(" ".join(f"word{i}" for i in range(12000)))
    pg.set_input_files("#file", [str(big)])
    pg.locator("#attachments .chip").filter(has_text="big.txt").wait_for()
    pg.fill("#input", "Summarise this.")
    pg.press("#input", "Enter")
    pg.locator(".msg.error").filter(has_text="big.txt is too large for the context").wait_for()
    assert "4096" in pg.locator(".msg.error").last.inner_text()
    assert pg.bodies == [] and pg.input_value("#input") == "Summarise this."
    assert pg.locator("#attachments .chip").count() == 1  # kept, to remove or send elsewhere
    pg.click("#attachments .chip button")
    assert pg.locator("#attachments .chip").count() == 0
