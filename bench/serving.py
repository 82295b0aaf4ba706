"""Time to first token and tokens/s through HTTP: the bundle's server, llama.cpp's own
llama-server (same llama.cpp source) and the direct Python call (llama-cpp-python's Llama in a
process of its own, model loaded once), alternating round by round."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper."
MAX_TOKENS = 128
ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def standalone(model: Path, prefix: str):
    """For a benchmark run on its own (`python -m bench.X`): a bundle of model built into a
    temporary folder, an environment with a cache of its own there, llama-server (built on first
    use) and the threads to use; the folder is removed after."""
    from bench.native import ensure_tools
    from runtime.host.cpu import physical_cores

    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        bundle = work / "model-bundle"
        subprocess.run([str(Path(sys.executable).parent / "bundle"), "build", str(model), "-o", str(bundle)],
                       check=True, capture_output=True)
        env = dict(os.environ, BUNDLE_CACHE_DIR=str(work / "cache"))
        yield bundle, env, ensure_tools()["llama-server"], physical_cores()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sse_events(response):
    """The JSON bodies of a server-sent-events response, as they arrive."""
    buf = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if event.startswith(b"data: ") and event != b"data: [DONE]":
                yield json.loads(event[6:])


def stream_chat(port: int) -> tuple[float, float]:
    """(seconds to the first content token, decode tokens/s) of one streamed chat completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    # bytes, so http.client sends headers and body in one segment (a separate body segment meets
    # Nagle + delayed ACK: 40 ms of nothing)
    body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "stream": True, "temperature": 0,
                       "max_tokens": MAX_TOKENS}).encode()
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    first = last = None
    n = 0
    predicted = None
    for data in sse_events(r):
        if data.get("timings"):
            predicted = data["timings"].get("predicted_n")
        choices = data.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    conn.close()
    tokens = predicted or n
    rate = (tokens - 1) / (last - first) if last and last > first else 0.0
    return first - t0, rate


def stop_all(procs) -> None:
    """Terminate the servers a benchmark started; kill any that do not stop within 10 s."""
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_healthy(port: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode})")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


class DirectPython:
    """llama-cpp-python's create_chat_completion(stream=True), timed inside its own process."""

    CODE = r'''
import json, sys, time
sys.path.insert(0, sys.argv[2])
from bench.direct import load_llama, physical_cores
llama_cpp = load_llama()
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=4096, n_threads=physical_cores(), verbose=False)
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter(); first = last = None; n = 0
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": sys.argv[3]}],
                                            temperature=0, max_tokens=int(sys.argv[4]), stream=True):
        if chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter(); first = first or now; last = now; n += 1
    print(json.dumps([first - t0, (n - 1) / (last - first) if last > first else 0.0]), flush=True)
'''

    def __init__(self, model: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(model), str(ROOT), PROMPT, str(MAX_TOKENS)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def measure(self) -> tuple[float, float]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return tuple(json.loads(self.proc.stdout.readline()))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def measure(bundle: Path, model: Path, threads: int, rounds: int, llama_server: Path | None, env) -> dict:
    raw: dict[str, list] = {}
    procs = []
    try:
        port = free_port()
        ours = subprocess.Popen([str(bundle), "--server", "--port", str(port), "--no-browser", "-t", str(threads)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(ours)
        wait_healthy(port, ours)
        ref_port = None
        if llama_server:
            ref_port = free_port()
            ref = subprocess.Popen([str(llama_server), "-m", str(model), "-t", str(threads), "-c", "4096", "-np", "1",
                                    "--host", "127.0.0.1", "--port", str(ref_port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ref)
            wait_healthy(ref_port, ref)
        direct = DirectPython(model)
        stream_chat(port)  # warm-up of each contender
        if ref_port:
            stream_chat(ref_port)
        direct.measure()
        for _ in range(rounds):
            for key, fn in (("http", lambda: stream_chat(port)), ("direct", direct.measure),
                            ("llama_server", (lambda: stream_chat(ref_port)) if ref_port else None)):
                if fn is None:
                    continue
                time.sleep(0.5)  # let the previous contender's OpenMP threads stop spinning
                ttft, rate = fn()
                raw.setdefault(f"{key}_ttft_s", []).append(ttft)
                raw.setdefault(f"{key}_tps", []).append(rate)
        direct.close()
    finally:
        stop_all(procs)
    return raw
