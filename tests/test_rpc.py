"""Beyond one machine (--rpc-worker, --rpc): real workers and a real coordinator, each a real
bundle process, on loopback; the handshake's refusals seen from both ends; a worker killed
mid-answer; a fake worker speaking another protocol version."""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import QUESTION, run_exe, wait_for_line

from runtime.host import rpc

KEY = "correct horse battery staple"


class Worker:
    def __init__(self, exe, tmp_path, *args, key: str | None = KEY):
        self.cache = tmp_path / f"worker-cache-{secrets.token_hex(4)}"
        env = dict(os.environ, BUNDLE_CACHE_DIR=str(self.cache))
        cmd = [str(exe), "--rpc-worker", "--port", "0", *args] + (["--rpc-key", key] if key else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self.lines: list[str] = []
        m = wait_for_line(self.proc.stderr, r"listening on 127\.0\.0\.1:(\d+)", self.lines)
        self.port = int(m.group(1)) if m else None
        assert self.port, "".join(self.lines)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


@pytest.fixture
def workers(built_bundle, tmp_path):
    made = []

    def make(*args, key=KEY):
        w = Worker(built_bundle, tmp_path, *args, key=key)
        made.append(w)
        return w

    yield make
    for w in made:
        w.kill()


def ask(exe, *args, timeout=180):
    return run_exe(exe, "-p", QUESTION, "--temp", "0", "-n", "24", *args, timeout=timeout)


def test_two_workers_give_the_bundles_own_answer_and_info_shows_the_layers(built_bundle, workers):
    alone = ask(built_bundle)
    assert alone.returncode == 0 and "Paris" in alone.stdout, alone.stderr
    a, b = workers(), workers()
    across = ask(built_bundle, "--rpc", f"{a.address},{b.address}", "--rpc-key", KEY, "-v")
    assert across.returncode == 0, across.stderr[-3000:]
    assert across.stdout == alone.stdout
    assert "across 3 machines" in across.stderr
    # llama.cpp's own log: a model buffer on each worker (ggml names them by their endpoint)
    buffers = re.findall(r"(RPC\d*\[bundlehook[0-9a-f]+:\d+\]) model buffer size", across.stderr)
    assert len(set(buffers)) == 2, across.stderr[-3000:]
    for w in (a, b):
        assert "coordinator 127.0.0.1 connected" in w.log(), w.log()
    info = run_exe(built_bundle, "--info", "--json", "--rpc", f"{a.address},{b.address}", "--rpc-key", KEY)
    assert info.returncode == 0, info.stderr
    r = json.loads(info.stdout)["rpc"]
    assert r["machines"] == 3 and [w["address"] for w in r["workers"]] == [a.address, b.address]
    layers = [r["local"]["layers"]] + [w["layers"] for w in r["workers"]]
    assert all(n > 0 for n in layers) and sum(layers) == 30, layers  # the demo model's 30 layers
    # --tensor-split overrides: nothing on this machine, a quarter and three quarters on the workers
    info = run_exe(built_bundle, "--info", "--json", "--rpc", f"{a.address},{b.address}", "--rpc-key", KEY,
                   "--tensor-split", "0,1,3")
    r = json.loads(info.stdout)["rpc"]
    assert r["local"]["layers"] == 0 and 6 <= r["workers"][0]["layers"] <= 9 and r["workers"][1]["layers"] >= 21


def test_without_the_key_with_a_wrong_key_and_without_the_handshake_nothing_reaches_ggml(built_bundle, workers):
    w = workers()
    none = ask(built_bundle, "--rpc", w.address, timeout=60)
    assert none.returncode == 1 and "needs a key" in none.stderr, none.stderr
    wrong = ask(built_bundle, "--rpc", w.address, "--rpc-key", "not the key", timeout=60)
    assert wrong.returncode == 1 and "refused: wrong key" in wrong.stderr, wrong.stderr
    assert [x for x in wrong.stderr.splitlines() if "error" in x] == [f"error: the worker at {w.address} refused: wrong key"]
    # a plain client speaking ggml's RPC (HELLO: command 14, its size, 24 bytes of capabilities)
    with socket.create_connection(("127.0.0.1", w.port), timeout=15) as s:
        s.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24) + bytes([11]) + bytes(8))
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
    assert got.startswith(rpc.MAGIC) and len(got) == rpc.HELLO_SIZE  # our handshake's first words, nothing of ggml's
    deadline = time.time() + 10
    while time.time() < deadline and w.log().count("refused") < 3:
        time.sleep(0.1)
    log = w.log()
    assert "wrong key" in log and "no handshake" in log, log
    assert "connected" not in log  # ggml's server never had a connection
    # and the worker still serves the one who holds the key
    ok = ask(built_bundle, "--rpc", w.address, "--rpc-key", KEY)
    assert ok.returncode == 0 and "Paris" in ok.stdout, ok.stderr[-2000:]


def listening(pgid: int) -> list[str]:
    """Every socket the processes of group pgid listen on: "tcp PORT", "unix PATH"."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes |= {int(x[8:-1]) for x in links if x.startswith("socket:[")}
    found = []
    for table in ("tcp", "tcp6"):
        for line in open(f"/proc/net/{table}").read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[9]) in inodes:
                found.append(f"tcp {int(f[1].rsplit(':', 1)[1], 16)}")
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        f = line.split()
        if int(f[3], 16) & 0x10000 and int(f[6]) in inodes:  # __SO_ACCEPTCON: listening
            found.append(f"unix {f[7] if len(f) > 7 else '(unnamed)'}")
    return found


def test_a_worker_listens_on_its_front_and_nothing_else(built_bundle, workers):
    """ggml's server has no socket of its own (not even a Unix one another local user could
    try): its connections are handed to it. Before and after a coordinator came."""
    w = workers()
    assert listening(w.proc.pid) == [f"tcp {w.port}"]
    ok = ask(built_bundle, "--rpc", w.address, "--rpc-key", KEY)
    assert ok.returncode == 0 and "Paris" in ok.stdout, ok.stderr[-2000:]
    assert listening(w.proc.pid) == [f"tcp {w.port}"]


def test_a_worker_off_loopback_needs_a_key(built_bundle):
    r = run_exe(built_bundle, "--rpc-worker", "--host", "0.0.0.0", "--port", "0", timeout=60)
    assert r.returncode == 2 and r.stderr.startswith("error: --rpc-worker on 0.0.0.0 needs a key"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_worker_killed_mid_answer_ends_the_answer_within_seconds(built_bundle, workers):
    w = workers()
    proc = subprocess.Popen([str(built_bundle), "-p", "Write a very long story about the sea.", "--temp", "0",
                             "-n", "2000", "--ignore-eos", "--rpc", w.address, "--rpc-key", KEY],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.read(20)  # the answer is under way
    assert first, proc.stderr.read().decode()
    w.kill()
    t0 = time.time()
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the coordinator hung after its worker died")
    assert time.time() - t0 < 10
    assert proc.returncode == 1
    err = err.decode()
    assert f"lost the worker at {w.address}" in err and err.strip().splitlines()[-1].startswith("error:"), err


def test_a_server_that_loses_a_worker_stays_up_and_says_so(built_bundle, workers, tmp_path):
    w = workers()
    env = dict(os.environ, BUNDLE_CACHE_DIR=str(tmp_path / "server-cache"))
    proc = subprocess.Popen([str(built_bundle), "--server", "--port", "0", "--no-browser", "--rpc", w.address,
                             "--rpc-key", KEY], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        m = wait_for_line(proc.stderr, r"http://127\.0\.0\.1:(\d+)/", lines, seconds=90)
        port = int(m.group(1)) if m else None
        assert port, "".join(lines)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
            "stream": True, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}),
            {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline()  # the first event: the answer is under way
        w.kill()
        t0 = time.time()
        rest = resp.read().decode()
        assert time.time() - t0 < 10
        assert "lost the worker" in rest, rest[-2000:]
        health = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        health.request("GET", "/health")
        h = health.getresponse()
        body = json.loads(h.read())
        assert h.status == 503 and "lost the worker" in body["error"]["message"]
        again = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        again.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
                      {"Content-Type": "application/json"})
        r = again.getresponse()
        text = r.read().decode()
        assert r.status == 503 and "lost the worker" in text, text
        assert proc.poll() is None  # still up
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_worker_of_another_protocol_version_is_named(built_bundle):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def fake():
        conn, _ = listener.accept()
        conn.sendall(rpc.MAGIC + bytes([6, 1, 0]) + bytes([1]) + secrets.token_bytes(rpc.NONCE))
        time.sleep(5)
        conn.close()

    threading.Thread(target=fake, daemon=True).start()
    r = ask(built_bundle, "--rpc", f"127.0.0.1:{port}", "--rpc-key", KEY, timeout=60)
    assert r.returncode == 1, r.stderr
    assert f"the worker at 127.0.0.1:{port} speaks ggml RPC 6.1.0, this bundle 7.0.0" in r.stderr, r.stderr
    listener.close()


# -- the handshake alone, both halves in this process ------------------------------------------------

def _pair(worker_key: bytes, coordinator_key: bytes, worker_version=(7, 0, 0), coordinator_version=(7, 0, 0)):
    a, b = socket.socketpair()
    result = {}

    def worker():
        try:
            rpc.worker_handshake(a, worker_key, worker_version)
            result["worker"] = "ok"
        except rpc.HandshakeError as exc:
            result["worker"] = str(exc)

    t = threading.Thread(target=worker)
    t.start()
    try:
        rpc.coordinator_handshake(b, coordinator_key, coordinator_version, "w")
        result["coordinator"] = "ok"
    except rpc.HandshakeError as exc:
        result["coordinator"] = str(exc)
    b.close()
    t.join()
    a.close()
    return result


def test_the_handshake_alone():
    assert _pair(b"k", b"k") == {"worker": "ok", "coordinator": "ok"}
    assert _pair(b"", b"") == {"worker": "ok", "coordinator": "ok"}  # loopback without a key
    r = _pair(b"k", b"other")
    assert r["worker"] == "wrong key" and "refused: wrong key" in r["coordinator"]
    r = _pair(b"k", b"")
    assert "needs a key" in r["coordinator"]
    r = _pair(b"", b"k")
    assert "takes no key" in r["coordinator"]
    r = _pair(b"k", b"k", worker_version=(7, 1, 0))  # a newer minor on the worker: ggml's client refuses it
    assert "speaks ggml RPC 7.1.0, this bundle 7.0.0" in r["coordinator"]
    r = _pair(b"k", b"k", worker_version=(7, 0, 0), coordinator_version=(8, 0, 0))
    assert "speaks ggml RPC 7.0.0" in r["coordinator"]


def test_layer_plan_mirrors_llama_cpp():
    w1 = rpc.Worker("a:1", "a", 1, memory=[(8 << 30, 16 << 30)])
    w2 = rpc.Worker("b:1", "b", 1, memory=[(8 << 30, 16 << 30)])
    # by free memory: this CPU 8 GiB, two workers 8 GiB each: a third of the 31 (30 + the output) each
    gpu_layers, shares, per_device, cpu = rpc.plan_layers(30, 8 << 30, [], [], [w1, w2], None)
    # (llama.cpp: the last 21 of the 31 go to the devices by cumulative share; the output is the 21st)
    assert gpu_layers == 21 and cpu == 10 and per_device == [11, 9]
    gpu_layers, shares, per_device, cpu = rpc.plan_layers(30, 8 << 30, [], [], [w1, w2], [0, 1, 1])
    assert gpu_layers == 31 and cpu == 0 and per_device == [16, 14]
    with pytest.raises(rpc.UsageError):
        rpc.plan_layers(30, 8 << 30, [], [], [w1, w2], [1, 1])


# -- across network namespaces: every worker behind its own veth pair --------------------------------

NETNS_HELPER = r'''
import json, os, subprocess, sys, time
exe, key, question = sys.argv[1], sys.argv[2], sys.argv[3]
out = {}
def ip(*a):
    subprocess.run(["ip", *a], check=True)
ip("link", "set", "lo", "up")
own = os.readlink("/proc/self/ns/net")
workers = []
for i in (1, 2):
    p = subprocess.Popen(["unshare", "--net", "--", "sh", "-c",
                          f"read _; ip link set lo up; ip addr add 10.9.{i}.2/24 dev w{i}; ip link set w{i} up; "
                          f"exec '{exe}' --rpc-worker --host 10.9.{i}.2 --port 50052 --rpc-key '{key}'"],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while os.readlink(f"/proc/{p.pid}/ns/net") == own:  # until the worker's namespace exists
        time.sleep(0.01)
    ip("link", "add", f"c{i}", "type", "veth", "peer", "name", f"w{i}", "netns", str(p.pid))
    ip("addr", "add", f"10.9.{i}.1/24", "dev", f"c{i}")
    ip("link", "set", f"c{i}", "up")
    p.stdin.write("\n")
    p.stdin.flush()
    workers.append(p)
for p in workers:
    while "listening on" not in (line := p.stderr.readline()):
        assert line, "a worker did not start"
at = "10.9.1.2:50052,10.9.2.2:50052"
r = subprocess.run([exe, "-p", question, "--temp", "0", "-n", "24", "--rpc", at, "--rpc-key", key],
                   capture_output=True, text=True, stdin=subprocess.DEVNULL)
out["answer"] = [r.returncode, r.stdout, r.stderr]
r = subprocess.run([exe, "--info", "--json", "--rpc", at, "--rpc-key", key], capture_output=True, text=True,
                   stdin=subprocess.DEVNULL)
out["info"] = [r.returncode, r.stdout, r.stderr]
# a worker cut off (its link down, the process alive) mid-answer
p = subprocess.Popen([exe, "-p", "Write a very long story about the sea.", "--temp", "0", "-n", "4000",
                      "--ignore-eos", "--rpc", at, "--rpc-key", key], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     stdin=subprocess.DEVNULL)
p.stdout.read(20)
ip("link", "set", "c2", "down")
t0 = time.time()
_, err = p.communicate(timeout=60)
out["cut"] = [p.returncode, time.time() - t0, err.decode()]
for w in workers:
    w.kill()
print(json.dumps(out))
'''


def test_workers_in_network_namespaces_of_their_own(built_bundle, tmp_path):
    if subprocess.run(["unshare", "--user", "--map-root-user", "--net", "true"], capture_output=True).returncode:
        pytest.skip("this kernel does not let an unprivileged user make namespaces (the loopback tests above still run)")
    alone = ask(built_bundle)
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--net", sys.executable, "-c", NETNS_HELPER,
                        str(built_bundle), KEY, QUESTION], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, BUNDLE_CACHE_DIR=str(tmp_path / "ns-cache")))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    rc, stdout, stderr = out["answer"]
    assert rc == 0 and stdout == alone.stdout, stderr[-2000:]
    assert "across 3 machines" in stderr
    rc, stdout, stderr = out["info"]
    info = json.loads(stdout)["rpc"]
    assert [w["address"] for w in info["workers"]] == ["10.9.1.2:50052", "10.9.2.2:50052"]
    assert all(w["layers"] > 0 for w in info["workers"])
    rc, seconds, stderr = out["cut"]
    assert rc == 1 and "lost the worker at 10.9.2.2:50052" in stderr, stderr[-2000:]
    assert seconds < 20, seconds  # TCP_USER_TIMEOUT (10 s) and keepalive bound a silent peer
    print(f"a worker cut off mid-answer: the answer ended {seconds:.1f} s after its link went down")


# -- Windows: the same back end, built by MinGW, behind the same handshake ----------------------------

@pytest.mark.windows
def test_a_windows_worker_serves_a_linux_coordinator_and_the_other_way_round(built_bundle, win_bundle, wine,
                                                                             workers):
    alone = ask(built_bundle)
    proc = wine.popen(win_bundle, "--rpc-worker", "--port", "0", "--rpc-key", KEY)
    try:
        lines: list[str] = []
        m = wait_for_line(proc.stderr, r"listening on 127\.0\.0\.1:(\d+)", lines, seconds=180)
        assert m, "".join(lines)
        at = f"127.0.0.1:{m.group(1)}"
        across = ask(built_bundle, "--rpc", at, "--rpc-key", KEY)
        assert across.returncode == 0 and "across 2 machines" in across.stderr, across.stderr[-3000:]
        assert across.stdout == alone.stdout
        wrong = ask(built_bundle, "--rpc", at, "--rpc-key", "not the key", timeout=60)
        assert wrong.returncode == 1 and "refused: wrong key" in wrong.stderr, wrong.stderr
    finally:
        proc.kill()
        proc.wait(timeout=30)
    w = workers()  # a Linux worker, the Windows bundle its coordinator
    r = wine.run(win_bundle, "-p", QUESTION, "--temp", "0", "-n", "24", "--rpc", w.address, "--rpc-key", KEY)
    assert r.returncode == 0 and "across 2 machines" in r.stderr, r.stderr[-3000:]
    assert r.stdout.replace("\r\n", "\n") == alone.stdout
    assert "coordinator 127.0.0.1 connected" in w.log(), w.log()
