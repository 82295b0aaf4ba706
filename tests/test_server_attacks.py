"""Issue 8.7-8.9 against a real bundle's server on 127.0.0.1: no request, body or template can
freeze it, no other web page can drive it, and floods of connections cannot starve it."""

import http.client
import json
import resource
import signal
import socket
import threading
import time

import pytest
from attack import read_toc, write_toc
from conftest import QUESTION
from test_server import Server, serving

CHAT = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(built_bundle, tmp_path_factory):
    yield from serving(built_bundle, tmp_path_factory)


def health_time(server) -> float:
    t0 = time.monotonic()
    status, _ = server.request("GET", "/health")
    assert status == 200
    return time.monotonic() - t0


def test_forty_thousand_turns_do_not_block_other_routes(server):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi there"} for i in range(40_000)]
    body = json.dumps({"messages": turns, "max_tokens": 5}).encode()
    result = {}

    def send():
        t0 = time.monotonic()
        result["status"], result["body"] = server.request("POST", "/v1/chat/completions", raw=body)
        result["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=send)
    t.start()
    worst = 0.0
    while t.is_alive():
        worst = max(worst, health_time(server))
        time.sleep(0.05)
    t.join(60)
    assert result["status"] == 400 and result["body"]["error"]["code"] == "context_length_exceeded"
    assert result["seconds"] < 10
    assert worst < 1.0, worst


@pytest.mark.parametrize("raw, status, code", [
    (json.dumps({"messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, "invalid_value"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "invalid_json"),
])
def test_odd_bodies_are_4xx_in_the_api_shape(server, raw, status, code):
    got, body = server.request("POST", "/v1/chat/completions", raw=raw)
    assert got == status and body["error"]["code"] == code, body


@pytest.mark.parametrize("path", ["/static/a%00b", "/static/" + "a" * 5000, "/static/%2e%2e/%2e%2e/etc/passwd"])
def test_odd_static_names_are_404(server, path):
    status, body = server.request("GET", path)
    assert status == 404 and body["error"]["code"] == "not_found"


def test_other_web_pages_cannot_use_the_model(server):
    plain = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
    body = json.dumps({"messages": CHAT, "max_tokens": 3}).encode()
    status, resp = server.request("POST", "/v1/chat/completions", raw=body, headers=plain)
    assert status == 403 and resp["error"]["code"] == "invalid_origin"
    status, resp = server.request("POST", "/v1/chat/completions", raw=body,
                                  headers={"Origin": "http://evil.example"})
    assert status == 403
    status, resp = server.request("POST", "/v1/chat/completions", raw=body, headers={"Content-Type": "text/plain"})
    assert status == 415 and resp["error"]["code"] == "unsupported_media_type"
    status, resp = server.request("POST", "/v1/chat/completions", raw=body, headers={"Origin": "null"})
    assert status == 403
    status, resp = server.request("POST", "/v1/chat/completions", raw=body, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403
    # the page itself (same origin) works
    own = {"Origin": f"http://127.0.0.1:{server.port}", "Host": f"127.0.0.1:{server.port}"}
    status, resp = server.request("POST", "/v1/chat/completions", raw=body, headers=own)
    assert status == 200, resp


@pytest.mark.parametrize("host", ["127.0.0.1:{port}@evil.example", "evil.example", "127.0.0.1:{port}:1",
                                  "127.0.0.1 :{port}", "localhost.evil.example:{port}", ""])
def test_host_header_is_parsed_strictly(server, host):
    status, resp = server.request("GET", "/health", headers={"Host": host.format(port=server.port)})
    assert status in (400, 403), (host, status)


def test_allowed_origin_gets_cors(built_bundle):
    s = Server(built_bundle, "--allow-origin", "http://localhost:3000")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("OPTIONS", "/v1/chat/completions", headers={"Origin": "http://localhost:3000"})
        r = conn.getresponse()
        r.read()
        assert r.status == 204 and r.getheader("Access-Control-Allow-Origin") == "http://localhost:3000"
        status, _ = s.request("GET", "/v1/models", headers={"Origin": "http://localhost:3000"})
        assert status == 200
        status, _ = s.request("GET", "/v1/models", headers={"Origin": "http://localhost:4000"})
        assert status == 403
    finally:
        s.stop()


def test_slow_connections_do_not_starve_real_clients(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    socks = []
    try:
        for _ in range(1100):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", server.port))
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never more
            except OSError:
                s.close()
                continue
            socks.append(s)
        t0 = time.monotonic()
        r = server.client(timeout=60).chat.completions.create(model="any", messages=CHAT, temperature=0)
        assert "Paris" in r.choices[0].message.content
        assert time.monotonic() - t0 < 30
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sum(len(x) for x in server.lines) < 10_000  # no flood of tracebacks


def test_a_connection_that_never_sends_a_request_is_closed(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.settimeout(30)
    t0 = time.monotonic()
    try:
        assert s.recv(100) == b""  # closed by the server
    finally:
        s.close()
    assert 5 < time.monotonic() - t0 < 20


def _read_until_closed(sock, seconds: float) -> tuple[bytes, bool]:
    """Everything the server sends within seconds, and whether it closed the connection."""
    sock.settimeout(0.5)
    data, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            return data, True
        data += chunk
    return data, False


def test_a_request_with_both_framings_is_refused_and_its_smuggled_request_never_served(server):
    """Issue 22.7: Content-Length and Transfer-Encoding together (RFC 9112 §6.1): a 400, and the
    connection closed, so the request hidden in the body is not served on it."""
    hidden = b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body))
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head + body)
        data, closed = _read_until_closed(s, 10)
    assert data.startswith(b"HTTP/1.1 400"), data[:200]
    assert data.count(b"HTTP/1.1 ") == 1, data  # one answer: the hidden /info was not served
    assert b"invalid_framing" in data and closed
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a bad length: the same
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5x\r\n\r\n" + hidden)
        data, closed = _read_until_closed(s, 10)
    assert data.count(b"HTTP/1.1 ") == 1 and data.startswith(b"HTTP/1.1 400") and closed, data[:300]


def test_a_body_trickled_a_byte_a_second_is_cut_off(server):
    """Issue 22.6: a request body must keep coming like its head (10 s, then 1 KiB/s on average)."""
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        closed = False
        s.settimeout(1.0)
        while time.monotonic() - t0 < 40:
            try:
                s.send(b" ")
                if s.recv(4096) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except OSError:  # reset: closed too
                closed = True
                break
        took = time.monotonic() - t0
    assert closed and 8 < took < 20, took
    assert health_time(server) < 5  # and the server is fine


def test_health_counts_only_real_cancellations(server):
    _, before = server.request("GET", "/health")
    for _ in range(3):
        stream = server.client().chat.completions.create(model="any", messages=CHAT, temperature=0, stream=True)
        for _ in stream:
            pass
    _, after = server.request("GET", "/health")
    assert after["stats"]["cancelled"] == before["stats"]["cancelled"]


# -- a hostile chat template inside a bundle ----------------------------------------------------

EVIL = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"


@pytest.fixture
def evil_bundle(bundle_copy):
    toc = read_toc(bundle_copy)
    toc["manifest"]["template"] = EVIL
    toc["manifest"]["template_name"] = "evil"
    write_toc(bundle_copy, toc)
    return bundle_copy


def test_hostile_template_fails_one_shot_in_bounded_time(evil_bundle):
    import subprocess

    t0 = time.monotonic()
    r = subprocess.run([str(evil_bundle), "-p", "hi"], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and "took longer than" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 15


def test_hostile_template_cannot_freeze_the_server_or_sigterm(evil_bundle):
    s = Server(evil_bundle)
    try:
        result = {}

        def send():
            result["status"], result["body"] = s.request("POST", "/v1/chat/completions", {"messages": CHAT})

        t = threading.Thread(target=send)
        t.start()
        time.sleep(0.3)
        assert health_time(s) < 1.0  # while the template spins
        t.join(30)
        assert result["status"] == 400 and "took longer than" in result["body"]["error"]["message"]
        # SIGTERM while another render spins: the process ends within 2 s
        def doomed():
            try:
                s.request("POST", "/v1/chat/completions", {"messages": CHAT})
            except OSError:
                pass  # the server goes away mid-request: that is the point

        threading.Thread(target=doomed, daemon=True).start()
        time.sleep(0.3)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(10)
        assert time.monotonic() - t0 < 2.5
    finally:
        s.stop()


def test_build_rejects_a_template_over_the_limits(model, tmp_path):
    from conftest import run_bundle_cmd
    from test_cli import assert_one_line_error

    t = tmp_path / "evil.jinja"
    t.write_text(EVIL)
    out = tmp_path / "out"
    out.mkdir()
    r = run_bundle_cmd("build", model, "-o", out / "x", "--template", t)
    assert_one_line_error(r, "took longer than")
    assert list(out.iterdir()) == []
