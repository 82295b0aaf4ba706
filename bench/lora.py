"""LoRA adapters: decode speed with an adapter against without, and against llama-server with the
same --lora, in one run (ratios; nothing here asserts a timing).

    python -m bench.lora [--rounds N] [--threads N] [--json]

The adapter is made for the demo model as the tests make theirs (rank 8 on every attn_q and
attn_v, tests/test_lora.py). One bundle carries it; each round streams the same greedy chat
completion from: the bundle with the adapter applied, the bundle with the request's "lora" at 0
(the base alone), and llama.cpp's own llama-server started with `--lora` (bench/native.py builds
it from the same source). Then the batching cost: two clients at once with the same scales,
against two with different scales (which the bundle decodes in separate batches).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench.native import ensure_tools  # noqa: E402
from bench.serving import MAX_TOKENS, PROMPT, free_port, sse_events, stop_all, wait_healthy  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
BUNDLE = [str(Path(sys.executable).parent / "bundle")]


def stream(port: int, lora=None, count: list | None = None) -> float:
    """Decode tokens/s of one streamed greedy chat completion (its token count appended to count)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True, "temperature": 0,
            "max_tokens": MAX_TOKENS}
    if lora is not None:
        body["lora"] = lora
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    first = last = None
    n = 0
    for data in sse_events(conn.getresponse()):
        choices = data.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.perf_counter()
            first = first or now
            last = now
            n += 1
    conn.close()
    if count is not None:
        count.append(n)
    return (n - 1) / (last - first) if last and last > first else 0.0


def pair(port: int, loras) -> float:
    """Aggregate tokens/s of two streams at once (each with its lora list): tokens over wall time."""
    counts: list = []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda lo: stream(port, lo, counts), loras))
    return sum(counts) / (time.perf_counter() - t0)


def main() -> int:
    from test_lora import make_lora

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    server = ensure_tools()["llama-server"]
    raw: dict[str, list] = {}
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        tmp = Path(tmp)
        adapter = make_lora(MODEL, tmp / "poet.gguf")
        bundle = tmp / "poet"
        r = subprocess.run([*BUNDLE, "build", str(MODEL), "--lora", str(adapter), "-o", str(bundle)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        try:
            port, ref_port = free_port(), free_port()
            procs.append(subprocess.Popen([str(bundle), "--server", "--port", str(port), "--no-browser", "-t",
                                           str(args.threads), "-np", "2"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            procs.append(subprocess.Popen([str(server), "-m", str(MODEL), "--lora", str(adapter), "-t",
                                           str(args.threads), "-c", "4096", "-np", "1", "--host", "127.0.0.1",
                                           "--port", str(ref_port)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait_healthy(port, procs[0])
            wait_healthy(ref_port, procs[1])
            contenders = {"with_adapter": lambda: stream(port),
                          "without": lambda: stream(port, [{"id": 0, "scale": 0}]),
                          "llama_server_with_adapter": lambda: stream(ref_port),
                          "two_same_scales": lambda: pair(port, [None, None]),
                          "two_different_scales": lambda: pair(port, [None, [{"id": 0, "scale": 0}]])}
            for fn in contenders.values():  # warm-up
                fn()
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    time.sleep(0.3)
                    raw.setdefault(name, []).append(fn())
        finally:
            stop_all(procs)
    med = {k: statistics.median(v) for k, v in raw.items()}
    result = {**{f"{k}_tps": round(v, 1) for k, v in med.items()},
              "adapter_vs_without": round(med["with_adapter"] / med["without"], 3),
              "adapter_vs_llama_server": round(med["with_adapter"] / med["llama_server_with_adapter"], 3),
              "different_vs_same_scales_two_clients": round(med["two_different_scales"] / med["two_same_scales"], 3),
              "rounds": args.rounds}
    print(json.dumps(result, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
