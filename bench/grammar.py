"""Structured output's cost (issue 10): time to first token and decode tokens/s of a streamed chat
completion with a JSON schema (response_format json_schema, enforced by llama.cpp's grammar
sampler) against the same request without one, on the bundle's server and on llama-server
built from the same llama.cpp source, alternating round by round.

    python -m bench.grammar [--rounds N] [--json]     (also part of `python -m bench`)
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, sse_events, standalone, stop_all, wait_healthy  # noqa: E402

PROMPT = ("Write a short story about a lighthouse keeper, as JSON: a title, the story itself, "
          "and the names of its characters.")
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "story": {"type": "string"},
    "characters": {"type": "array", "items": {"type": "string"}}},
    "required": ["title", "story", "characters"]}
MAX_TOKENS = 128


def stream(port: int, schema: bool) -> tuple[float, float, int]:
    """(seconds to the first content token, decode tokens/s, tokens) of one streamed chat."""
    body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True, "temperature": 0,
            "max_tokens": MAX_TOKENS}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first = last = None
    n, predicted, text = 0, None, []
    for data in sse_events(r):
        if data.get("timings"):
            predicted = data["timings"].get("predicted_n")
        choices = data.get("choices") or []
        piece = (choices[0].get("delta") or {}).get("content") if choices else None
        if piece:
            now = time.perf_counter()
            first, last, n = first or now, now, n + 1
            text.append(piece)
    conn.close()
    if schema:
        json.loads("".join(text))  # a reply that does not parse would make the figures meaningless
    tokens = predicted or n
    return first - t0, (tokens - 1) / (last - first) if last and last > first else 0.0, tokens


def measure(bundle: Path, model: Path, threads: int, rounds: int, llama_server: Path | None, env) -> dict:
    raw: dict[str, list] = {}
    procs = []
    try:
        ports = {"bundle": free_port()}
        p = subprocess.Popen([str(bundle), "--server", "--port", str(ports["bundle"]), "--no-browser",
                              "-t", str(threads), "--parallel", "1"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        procs.append(p)
        wait_healthy(ports["bundle"], p)
        if llama_server:
            ports["llama_server"] = free_port()
            ref = subprocess.Popen([str(llama_server), "-m", str(model), "-t", str(threads), "-c", "4096", "-np", "1",
                                    "--host", "127.0.0.1", "--port", str(ports["llama_server"])],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(ref)
            wait_healthy(ports["llama_server"], ref)
        for port in ports.values():  # warm-up
            stream(port, False)
            stream(port, True)
        for _ in range(rounds):
            for who, port in ports.items():
                for kind in ("plain", "schema"):
                    time.sleep(0.5)
                    ttft, rate, n = stream(port, kind == "schema")
                    raw.setdefault(f"{who}_{kind}_ttft_s", []).append(ttft)
                    raw.setdefault(f"{who}_{kind}_tps", []).append(rate)
                    raw.setdefault(f"{who}_{kind}_tokens", []).append(n)
    finally:
        stop_all(procs)
    return raw


def summary(raw: dict) -> dict:
    m = {k: statistics.median(v) for k, v in raw.items()}
    out = dict(m)
    out["grammar_tps_vs_plain"] = m["bundle_schema_tps"] / m["bundle_plain_tps"]
    out["grammar_ttft_vs_plain"] = m["bundle_schema_ttft_s"] / m["bundle_plain_ttft_s"]
    if "llama_server_schema_tps" in m:
        out["grammar_tps_vs_llama_server"] = m["bundle_schema_tps"] / m["llama_server_schema_tps"]
        out["grammar_ttft_vs_llama_server"] = m["bundle_schema_ttft_s"] / m["llama_server_schema_ttft_s"]
        out["llama_server_grammar_tps_vs_plain"] = m["llama_server_schema_tps"] / m["llama_server_plain_tps"]
    return out


def format_table(s: dict) -> str:
    rows = [f"{'':22} {'TTFT s':>8} {'tok/s':>8} {'tokens':>7}"]
    for who in ("bundle", "llama_server"):
        for kind in ("plain", "schema"):
            if f"{who}_{kind}_tps" in s:
                rows.append(f"{who + ' ' + kind:22} {s[f'{who}_{kind}_ttft_s']:8.3f} {s[f'{who}_{kind}_tps']:8.1f} "
                            f"{s[f'{who}_{kind}_tokens']:7.0f}")
    rows.append(f"bundle, schema / plain: tok/s {s['grammar_tps_vs_plain']:.2f}x, TTFT {s['grammar_ttft_vs_plain']:.2f}x"
                " (target: tok/s >= 0.8x)")
    if "grammar_tps_vs_llama_server" in s:
        rows.append(f"schema, bundle / llama-server: tok/s {s['grammar_tps_vs_llama_server']:.2f}x, "
                    f"TTFT {s['grammar_ttft_vs_llama_server']:.2f}x; llama-server's own schema / plain: "
                    f"{s['llama_server_grammar_tps_vs_plain']:.2f}x")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct.gguf")
    args = ap.parse_args()
    with standalone(args.model, "bundle-bench-grammar-") as (bundle, env, llama_server, threads):
        s = summary(measure(bundle, args.model, threads, args.rounds, llama_server, env))
    print(json.dumps(s, indent=1) if args.json else format_table(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
