"""Beyond one machine (issue 29): decode and prompt tokens/s with the model split between this
process and one worker on loopback, side by side in one run, alternating:

    python -m bench.rpc [--rounds N] [--json]

    bundle_rpc        the bundle, --rpc to its own --rpc-worker (with a key: the handshake's link
                      carries every byte), half the layers each (--tensor-split 1,1)
    native_rpc        llama.cpp's own rpc-server and llama-bench --rpc, the same layers on the
                      worker (-ngl: the bundle's split puts 16 of the 31 there, the output included)
    bundle_alone      the bundle without a worker
handshake_ms      one connection's handshake with the worker's front (median of 20)
Ratios: bundle_rpc / native_rpc (what the handshake's link and the runtime cost against
llama.cpp's own), bundle_rpc / bundle_alone (what the network hop costs on one machine; across
two real machines add the network's round trips). Each ggml RPC link here is loopback TCP on
the same 2 cores: the worker's compute competes with the coordinator's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.__main__ import BUNDLE, DEFAULT_MODEL, err, llama_bench, run_json  # noqa: E402
from bench.native import ensure_tools  # noqa: E402

KEY = "bench key, loopback only"
PROTOCOL = tuple(json.loads((ROOT / "stubs" / "linux-x86_64" / "stub.json").read_text())["backends"]["rpc"]["protocol"])


def _start(cmd, pattern: str, env=None) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    deadline = time.time() + 120
    seen = []
    while time.time() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            import threading

            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p, int(m.group(1))
    p.kill()
    raise RuntimeError(f"{cmd[0]} did not start: {''.join(seen)[-2000:]}")


def _stop(p: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


def wait_listening(port: int) -> None:
    """rpc-server prints its endpoint into a pipe's buffer: wait for the port instead (a
    connection that sends nothing is dropped by it and costs nothing)."""
    import socket

    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"rpc-server did not listen on {port}")


def handshake_ms(port: int, n: int = 20) -> float:
    """A connection's cost: connect, the handshake with the worker's front (HMAC both ways, two
    round trips), close; the median of n, in milliseconds."""
    import socket

    from runtime.host import rpc

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            rpc.coordinator_handshake(s, KEY.encode(), PROTOCOL, "the worker")
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)  # the worker's front lets the last link go
    return statistics.median(times)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: Path, rounds: int, threads: int) -> dict:
    tools = ensure_tools()
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-rpc-"))
    raw: dict[str, list] = {}

    def add(key, value):
        raw.setdefault(key, []).append(value)

    try:
        bundle = work / "model-bundle"
        subprocess.run(BUNDLE + ["build", str(model), "-o", str(bundle)], check=True, capture_output=True)
        env = dict(os.environ, BUNDLE_CACHE_DIR=str(work / "cache"))
        bench = [str(bundle), "--bench", "--json", "-t", str(threads)]
        run_json(bench, env)  # the first launch's check and unpacking, outside the measure
        for i in range(rounds):
            err(f"round {i + 1}/{rounds}: the bundle alone, the bundle with its worker, llama.cpp's rpc-server")
            b, _ = run_json(bench, env)
            add("alone_decode_tps", b["decode_tps"])
            add("alone_prompt_tps", b["prompt_tps"])

            worker, port = _start([str(bundle), "--rpc-worker", "--port", "0", "--rpc-key", KEY, "-t", str(threads)],
                                  r"listening on 127\.0\.0\.1:(\d+)", env)
            try:
                r, _ = run_json(bench + ["--rpc", f"127.0.0.1:{port}", "--rpc-key", KEY, "--tensor-split", "1,1"], env)
                add("handshake_ms", handshake_ms(port))
            finally:
                _stop(worker)
            add("rpc_decode_tps", r["decode_tps"])
            add("rpc_prompt_tps", r["prompt_tps"])
            gpu_layers = r["gpu_layers"]

            port = free_port()
            server = subprocess.Popen([str(tools["ggml-rpc-server"]), "-p", str(port), "-t", str(threads)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
            wait_listening(port)
            try:
                n = llama_bench(tools["llama-bench"], model, threads,
                                extra=["--rpc", f"127.0.0.1:{port}", "-ngl", str(gpu_layers)])
            finally:
                _stop(server)
            add("native_rpc_decode_tps", n["decode_tps"])
            add("native_rpc_prompt_tps", n["prompt_tps"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {k: statistics.median(v) for k, v in raw.items()}
    for kind in ("decode", "prompt"):
        out[f"rpc_vs_native_rpc_{kind}"] = out[f"rpc_{kind}_tps"] / out[f"native_rpc_{kind}_tps"]
        out[f"rpc_vs_alone_{kind}"] = out[f"rpc_{kind}_tps"] / out[f"alone_{kind}_tps"]
    out.update({"rounds": rounds, "threads": threads, "gpu_layers_on_worker": gpu_layers, "all": raw})
    return out


def format_table(r: dict) -> str:
    rows = [f"a model across two processes on loopback ({r['rounds']} rounds, medians; {r['gpu_layers_on_worker']} "
            "of 31 layers on the worker)"]
    for kind in ("decode", "prompt"):
        rows.append(f"  {kind:6}  bundle --rpc {r[f'rpc_{kind}_tps']:8.1f}   llama.cpp rpc {r[f'native_rpc_{kind}_tps']:8.1f}"
                    f"   ratio {r[f'rpc_vs_native_rpc_{kind}']:.2f}   bundle alone {r[f'alone_{kind}_tps']:8.1f}"
                    f"   ratio {r[f'rpc_vs_alone_{kind}']:.2f}  tok/s")
    rows.append(f"  a connection's handshake (connect, prove the key both ways, close): {r['handshake_ms']:.2f} ms")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="per process (default 1: two processes on 2 cores)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.model, args.rounds, args.threads)
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
