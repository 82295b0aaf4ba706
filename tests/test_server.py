"""The web server of a real bundle on 127.0.0.1, driven by real clients: the official openai
package, raw HTTP for the error cases, many threads at once."""

import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import QUESTION, wait_for_line

openai = pytest.importorskip("openai")


class Server:
    def __init__(self, exe: Path, *args, env=None):
        self.proc = subprocess.Popen([str(exe), "--server", "--port", "0", "--no-browser", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.url = None
        self.lines = []
        m = wait_for_line(self.proc.stderr, r"(http://127\.0\.0\.1:(\d+)/)", self.lines)
        if m:
            self.url, self.port = m.group(1), int(m.group(2))
        assert self.url, "".join(self.lines)

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=h)
        r = conn.getresponse()
        payload = r.read()
        conn.close()
        try:
            return r.status, json.loads(payload)
        except ValueError:
            return r.status, payload

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def serving(built_bundle, tmp_path_factory, *args):
    """For module fixtures (`yield from`): a real server with a cache of its own, stopped after."""
    env = dict(os.environ, BUNDLE_CACHE_DIR=str(tmp_path_factory.mktemp("servercache")))
    s = Server(built_bundle, *args, env=env)
    try:
        yield s
    finally:
        s.stop()


# The same for one test: `with served(bundle, tmp_path_factory) as server:` (stopped even when
# the test fails inside).
served = contextlib.contextmanager(serving)


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


CHAT = [{"role": "user", "content": QUESTION}]


def test_chat_completion(server):
    r = server.client().chat.completions.create(model="any", messages=CHAT, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0


def test_chat_completion_streamed(server):
    stream = server.client().chat.completions.create(model="any", messages=CHAT, temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "Paris" in "".join(pieces) and len([p for p in pieces if p]) > 1
    assert finish == "stop" and usage.completion_tokens > 0


def test_stream_ends_with_done(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps({"messages": CHAT, "stream": True, "temperature": 0}),
                 {"Content-Type": "application/json"})
    text = conn.getresponse().read().decode()
    assert text.rstrip().endswith("data: [DONE]")


def test_completions_models_embeddings(server):
    c = server.client()
    r = c.completions.create(model="any", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text
    assert [m.id for m in c.models.list().data] == ["SmolLM2-135M-Instruct"]
    e = c.embeddings.create(model="any", input=["Paris is in France.", "Bananas are yellow."])  # base64 by default
    a, b = e.data[0].embedding, e.data[1].embedding
    assert len(a) == len(b) == 576
    assert abs(sum(x * x for x in a) - 1) < 1e-3
    e2 = c.embeddings.create(model="any", input="Paris is in France.", encoding_format="float")
    assert max(abs(x - y) for x, y in zip(e2.data[0].embedding, a)) < 1e-4
    close = c.embeddings.create(model="any", input="Paris lies in France.").data[0].embedding
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    assert dot(a, close) > dot(b, close)


def test_health_page_and_static(server):
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    conn = http.client.HTTPConnection("127.0.0.1", server.port)
    conn.request("GET", "/")
    r = conn.getresponse()
    page = r.read().decode()
    assert r.status == 200 and "<textarea" in page and "script-src 'self'" in r.getheader("Content-Security-Policy")
    assert "https://" not in page  # nothing from the network
    assert r.getheader("Access-Control-Allow-Origin") is None
    status, _ = server.request("GET", "/static/vendor/purify.min.js")
    assert status == 200
    status, body = server.request("GET", "/static/../../etc/passwd")
    assert status == 404


@pytest.mark.parametrize("raw, needle, param", [
    (b"{not json", "not valid JSON", None),
    (json.dumps({"messages": "hi"}).encode(), "'messages' must be a non-empty list", "messages"),
    (json.dumps({"messages": CHAT, "temperature": "hot"}).encode(), "'temperature' must be a number", "temperature"),
    (json.dumps({"messages": CHAT, "max_tokens": 0}).encode(), "'max_tokens' must be between", "max_tokens"),
    (json.dumps({"messages": CHAT, "functions": [{"name": "f"}]}).encode(), "not supported", "functions"),
    (json.dumps({"messages": CHAT, "top_logprobs": 2}).encode(), "needs 'logprobs' set to true", "top_logprobs"),
    (json.dumps({"messages": CHAT, "logprobs": True, "top_logprobs": 21}).encode(), "between 0 and 20",
     "top_logprobs"),
    (json.dumps({"messages": CHAT, "logprobs": 1}).encode(), "'logprobs' must be a boolean", "logprobs"),
    (json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), "is not one of", "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}).encode(),
     "only text parts", "messages[0].content"),
    (json.dumps([1, 2]).encode(), "must be a JSON object", None),
])
def test_bad_requests_get_openai_shaped_400s(server, raw, needle, param):
    status, body = server.request("POST", "/v1/chat/completions", raw=raw)
    assert status == 400
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert needle in err["message"] and err["param"] == param


def test_prompt_longer_than_context(server):
    long = "word " * 6000
    status, body = server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": long}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().completions.create(model="any", prompt=long, max_tokens=5)


def test_host_header_and_body_cap_and_routes(server):
    status, body = server.request("GET", "/health", headers={"Host": "attacker.example:8080"})
    assert status == 403 and body["error"]["code"] == "invalid_host"
    status, _ = server.request("GET", "/health", headers={"Host": f"localhost:{server.port}"})
    assert status == 200
    status, body = server.request("POST", "/v1/chat/completions", raw=b"x" * (9 * 1024 * 1024))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = server.request("GET", "/v1/nothing")
    assert status == 404 and "error" in body
    status, body = server.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in body


def test_sixteen_concurrent_clients(server):
    results, errors = [None] * 16, []

    def ask(i):
        try:
            r = server.client(timeout=300).chat.completions.create(model="any", messages=CHAT, temperature=0)
            results[i] = r.choices[0].message.content
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert all(r and "Paris" in r for r in results), results


@pytest.fixture(scope="module")
def one_slot(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory, "--parallel", "1")


def test_requests_are_served_in_arrival_order(one_slot):
    """Requests that wait for a slot are admitted first come, first served (one slot here, so
    the order shows in when their answers begin)."""
    server = one_slot
    order, lock = [], threading.Lock()

    def ask(i):
        stream = server.client(timeout=120).chat.completions.create(
            model="any", messages=[{"role": "user", "content": f"Count to {i + 5}."}], temperature=0,
            max_tokens=12, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                with lock:
                    order.append(i)
                break
        for _ in stream:
            pass

    threads = []
    _, start = server.request("GET", "/health")
    for i in range(4):
        t = threading.Thread(target=ask, args=(i,))
        t.start()
        threads.append(t)
        # the next request is sent once this one is known to the server (running or queued)
        deadline = time.time() + 30
        while time.time() < deadline:
            _, h = server.request("GET", "/health")
            if h["stats"]["jobs"] + h["queued"] - start["stats"]["jobs"] >= i + 1:
                break
    for t in threads:
        t.join(120)
    assert order == [0, 1, 2, 3]


def test_client_that_disconnects_stops_its_generation(server):
    _, before = server.request("GET", "/health")
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"messages": [{"role": "user", "content": "Write a very long story about dragons."}],
                       "stream": True, "max_tokens": 2000, "temperature": 0}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    sock.settimeout(60)
    deadline = time.time() + 60
    while received.count(b"data: ") < 6 and time.time() < deadline:  # a few tokens streamed
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream: " + received.decode(errors="replace")
        received += chunk
    sock.close()
    assert received.count(b"data: ") >= 6
    # The next request is served at once: the abandoned generation stopped at its next token.
    r = server.client().chat.completions.create(model="any", messages=CHAT, temperature=0)
    assert "Paris" in r.choices[0].message.content
    _, after = server.request("GET", "/health")
    assert after["stats"]["cancelled"] == before["stats"]["cancelled"] + 1
    assert after["stats"]["max_tokens_after_cancel"] <= 1


def test_api_key(built_bundle):
    s = Server(built_bundle, "--api-key", "sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        status, body = s.request("GET", "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key" and "missing" in body["error"]["message"]
        assert s.client(api_key="sekret").models.list().data
        status, _ = s.request("GET", "/health")  # the health check and the page stay open
        assert status == 200
        assert s.request("GET", "/")[0] == 200
        # everything else needs the key; /apply-template would show the bundle's system prompt
        for method, path, body in [("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]}),
                                   ("GET", "/info", None), ("GET", "/metrics", None)]:
            status, body = s.request(method, path, body)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, status, body)
        status, body = s.request("POST", "/apply-template", {"messages": [{"role": "user", "content": "hi"}]},
                                 headers={"Authorization": "Bearer sekret"})
        assert status == 200 and "hi" in body["prompt"]
    finally:
        s.stop()


def test_port_in_use_names_the_port(built_bundle):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        r = subprocess.run([str(built_bundle), "--server", "--port", str(port), "--no-browser"],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert r.returncode == 1
        assert f"port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    finally:
        busy.close()


def opener(tmp_path):
    log = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f"#!/bin/sh\necho \"$1\" >> {log}\n")
    script.chmod(0o755)
    return script, log


def test_opens_the_browser_when_there_is_a_display(built_bundle, tmp_path):
    script, log = opener(tmp_path)
    env = dict(os.environ, DISPLAY=":77", BROWSER=str(script))
    proc = subprocess.Popen([str(built_bundle), "--server", "--port", "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.time() + 60
        while not url and time.time() < deadline:
            line = proc.stderr.readline()
            assert line, "the bundle exited before serving"
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = m and m.group(1)
        deadline = time.time() + 10
        while not log.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert log.read_text().strip() == url
    finally:
        proc.terminate()
        proc.wait(10)


def test_no_browser_without_display_or_with_flag(built_bundle, tmp_path):
    script, log = opener(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["BROWSER"] = str(script)
    s = Server(built_bundle, env=env)  # --no-browser
    s.stop()
    env["DISPLAY"] = ":77"
    s = Server(built_bundle, env=env)  # --no-browser, with a display
    s.stop()
    env.pop("DISPLAY")
    proc = subprocess.Popen([str(built_bundle), "--server", "--port", "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    said = ""
    deadline = time.time() + 60
    while "no display" not in said and time.time() < deadline:  # the server says why no browser opens
        line = proc.stderr.readline()
        if not line:
            break
        said += line
    proc.terminate()
    proc.wait(10)
    assert "no display" in said, said
    assert not log.exists()


def test_launch_without_terminal_serves(built_bundle):
    """Double-clicked from a file manager (no terminal, no arguments): the web chat starts."""
    env = dict(os.environ, BUNDLE_PORT="0")
    env.pop("DISPLAY", None)
    proc = subprocess.Popen([str(built_bundle)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for _ in range(5):
            m = re.search(r"(http://127\.0\.0\.1:(\d+)/)", proc.stderr.readline())
            if m:
                url, port = m.group(1), int(m.group(2))
                break
        assert url
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_double_click_takes_the_next_port_when_the_default_is_busy(built_bundle):
    """Double-clicked with 8080 held by another program (here: this test, or whatever holds it on
    this machine), the web chat moves to the next free port and says so; an explicit --port (or
    BUNDLE_PORT) still fails with the message."""
    import socket

    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind(("127.0.0.1", 8080))
        holder.listen(1)
    except OSError:
        pass  # something else holds 8080 already: the same situation
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "BUNDLE_PORT")}
    proc = subprocess.Popen([str(built_bundle)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        said, port = "", None
        for _ in range(8):
            line = proc.stderr.readline()
            said += line
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                port = int(m.group(1))
                break
        assert port and port != 8080, said
        assert f"port 8080 is in use by another program; serving on port {port} instead" in said
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
    finally:
        proc.terminate()
        proc.wait(10)
    r = subprocess.run([str(built_bundle), "--port", "8080"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and "port 8080 on 127.0.0.1 is already in use" in r.stderr.strip().splitlines()[-1]
    holder.close()
