"""Many clients at once (issue 11): aggregate completion tokens/s and time to first token with
1, 4 and 8 concurrent streamed chat completions, the bundle's server against llama.cpp's
llama-server built from the same source, with the same parallel setting, alternating, in one run.

    python -m bench.concurrency [--rounds N] [--parallel 8] [--quant q4_1,q4_0] [--json]

The demo model as it comes (Q4_1) and a Q4_0 copy made at bench time (bench.requant): llama.cpp's
Q4_1 CPU kernels batch as vector products, its repacked Q4_0 ones as matrix products, so what
batching gains depends on the quantization; both are reported.

Both servers get a KV cache per slot of the full context (the bundle's design; llama-server
with -c 4096*N splits that evenly across its N slots, without -kvu).
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, sse_events, standalone, stop_all, wait_healthy  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper.", "Explain how a bicycle works.",
    "Describe the water cycle in detail.", "Write a letter to a friend about a trip to the mountains.",
    "List ten animals and one fact about each.", "Explain why the sky is blue.",
    "Write a poem about autumn leaves.", "Describe how bread is made, step by step.",
]
MAX_TOKENS = 64
CTX = 4096


def one_client(port: int, prompt: str, out: list) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True, "temperature": 0,
                       "max_tokens": MAX_TOKENS, "stream_options": {"include_usage": True}}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    first, tokens = None, 0
    for data in sse_events(r):
        if data.get("usage"):
            tokens = data["usage"]["completion_tokens"]
        choices = data.get("choices") or []
        if first is None and choices and (choices[0].get("delta") or {}).get("content"):
            first = time.perf_counter() - t0
    conn.close()
    out.append((first or 0.0, tokens, time.perf_counter()))


def wave(port: int, n: int) -> tuple[float, list[float]]:
    """n clients at once: (aggregate completion tokens/s, their times to first token)."""
    out: list = []
    threads = [threading.Thread(target=one_client, args=(port, PROMPTS[i % len(PROMPTS)], out)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = max(e for _, _, e in out)
    return sum(tok for _, tok, _ in out) / (end - t0), [f for f, _, _ in out]


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def wait_quiet(procs, quiet_s: float = 0.3, most_s: float = 10.0) -> None:
    """Until no server has used CPU for quiet_s (at most most_s): work a server does after its
    answers (llama-server saves each finished slot into its prompt cache) must not land in the
    other one's measurement. (On a machine without /proc: a fixed pause.)"""
    if not Path("/proc/self/stat").exists():
        time.sleep(0.5)
        return
    start = time.perf_counter()
    last = [cpu_ticks(p.pid) for p in procs]
    while time.perf_counter() - start < most_s:
        time.sleep(quiet_s)
        now = [cpu_ticks(p.pid) for p in procs]
        if now == last:
            return
        last = now


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def measure(bundle: Path, model: Path, threads: int, rounds: int, llama_server: Path | None, env: dict,
            parallel: int = 8, clients=(1, 4, 8)) -> dict:
    procs = []
    raw: dict[str, list] = {}
    try:
        ours_port = free_port()
        ours = subprocess.Popen([str(bundle), "--server", "--port", str(ours_port), "--no-browser", "-t", str(threads),
                                 "--parallel", str(parallel), "-c", str(CTX)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(ours)
        wait_healthy(ours_port, ours)
        contenders = {"bundle": ours_port}
        if llama_server:
            ref_port = free_port()
            ref = subprocess.Popen([str(llama_server), "-m", str(model), "-t", str(threads), "-c", str(CTX * parallel),
                                    "-np", str(parallel), "--host", "127.0.0.1", "--port", str(ref_port)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ref)
            wait_healthy(ref_port, ref)
            contenders["llama_server"] = ref_port
        for port in contenders.values():
            wave(port, 2)  # warm-up
        for r in range(rounds):
            for n in clients:
                order = list(contenders.items())
                for name, port in order if r % 2 == 0 else order[::-1]:  # who goes first alternates too
                    wait_quiet(procs)
                    tps, ttfts = wave(port, n)
                    raw.setdefault(f"{name}_{n}_tps", []).append(tps)
                    raw.setdefault(f"{name}_{n}_ttft", []).extend(ttfts)
    finally:
        stop_all(procs)
    out: dict = {"parallel": parallel, "max_tokens": MAX_TOKENS, "rounds": rounds}

    def per_round(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(raw[a], raw[b])]

    for n in clients:
        for name in ("bundle", "llama_server"):
            if f"{name}_{n}_tps" in raw:
                out[f"{name}_{n}_tps"] = statistics.median(raw[f"{name}_{n}_tps"])
                out[f"{name}_{n}_ttft_p50"] = pct(raw[f"{name}_{n}_ttft"], 0.5)
                out[f"{name}_{n}_ttft_p95"] = pct(raw[f"{name}_{n}_ttft"], 0.95)
        # Ratios are taken within a round (the two waves ran seconds apart; this machine's speed
        # drifts by tens of percent over minutes), then the median of the rounds'.
        if f"llama_server_{n}_tps" in out:
            vs_ref = per_round(f"bundle_{n}_tps", f"llama_server_{n}_tps")
            out[f"concurrency_{n}_vs_llama_server"] = statistics.median(vs_ref)
            out[f"concurrency_{n}_vs_llama_server_range"] = [min(vs_ref), max(vs_ref)]
            out[f"llama_server_{n}_vs_single"] = statistics.median(per_round(f"llama_server_{n}_tps", "llama_server_1_tps"))
        out[f"concurrency_{n}_vs_single"] = statistics.median(per_round(f"bundle_{n}_tps", "bundle_1_tps"))
    return out


def format_table(r: dict, clients=(1, 4, 8)) -> str:
    nan = float("nan")
    lines = [f"concurrent streamed chats, {r['max_tokens']} tokens each, greedy, --parallel {r['parallel']}, "
             f"{r['rounds']} alternating rounds: tok/s medians, ratios the median (and range) of each round's",
             f"{'clients':>7} {'bundle tok/s':>13} {'llama-server':>13} {'ratio (range)':>18} {'vs 1 client':>11} "
             f"{'(llama-server)':>14} {'TTFT p50/p95 bundle':>20} {'llama-server':>14}"]
    for n in clients:
        ref = r.get(f"llama_server_{n}_tps")
        lo, hi = r.get(f"concurrency_{n}_vs_llama_server_range", (nan, nan))
        lines.append(
            f"{n:>7} {r[f'bundle_{n}_tps']:13.1f} {ref if ref else nan:13.1f} "
            f"{r.get(f'concurrency_{n}_vs_llama_server', nan):6.2f} ({lo:.2f}-{hi:.2f}) "
            f"{r[f'concurrency_{n}_vs_single']:11.2f} {r.get(f'llama_server_{n}_vs_single', nan):14.2f} "
            f"{r[f'bundle_{n}_ttft_p50']:9.3f}/{r[f'bundle_{n}_ttft_p95']:.3f} s "
            f"{r.get(f'llama_server_{n}_ttft_p50', nan):6.3f}/{r.get(f'llama_server_{n}_ttft_p95', nan):.3f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.concurrency", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.gguf")
    ap.add_argument("--quant", default="q4_1,q4_0",
                    help="the model as it is (its own quantization, q4_1 for the demo model) and/or a q4_0 copy")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from bench.requant import q4_0_copy

    results = {}
    for quant in [q.strip().lower() for q in args.quant.split(",") if q.strip()]:
        model = q4_0_copy(args.model) if quant == "q4_0" else args.model
        with standalone(model, "bundle-conc-") as (bundle, env, llama_server, threads):
            results[quant] = measure(bundle, model, threads, args.rounds, llama_server, env, args.parallel)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n\n".join(f"{quant.upper()} ({model_name(quant, args.model)}):\n{format_table(r)}"
                          for quant, r in results.items()))
    return 0


def model_name(quant: str, model: Path) -> str:
    return model.name if quant != "q4_0" else f"{model.name} requantized to Q4_0 at bench time"


if __name__ == "__main__":
    sys.exit(main())
