"""Two runtimes side by side in one run: a stub kept from before a change (A) and the current one
(B), each measured against the same references as `python -m bench`, round after round.

    python -m bench.ab OLD_STUB_FOLDER [--rounds N] [--json]

    decode_vs_native   --bench decode tok/s (128 tokens) / llama-bench's, for A and for B
    oneshot_vs_native  a plain -p answer's decode tok/s (-v) / llama-bench's
    launch_vs_direct   launch -> first answer byte / llama-cpp-python's Llama on the .gguf
    B/A                each of them, the current runtime over the old one (1.00: unchanged)

OLD_STUB_FOLDER is a copy of stubs/linux-x86_64/ from before the change (bundle-runtime,
native-cpu.tar.zst, stub.json). Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.__main__ import BUNDLE, DEFAULT_MODEL, QUESTION, ROOT, first_byte, llama_bench, med, oneshot_rate, run_json


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    ap.add_argument("old_stub", type=Path, help="a copy of stubs/linux-x86_64/ from before the change")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from bench.native import ensure_tools
    from runtime.host.cpu import physical_cores

    threads = physical_cores()
    native = ensure_tools()["llama-bench"]
    work = Path(tempfile.mkdtemp(prefix="bundle-ab-"))
    env = dict(os.environ, BUNDLE_CACHE_DIR=str(work / "cache"), BUNDLE_BENCH_REPS="1")
    raw: dict[str, list] = {}
    try:
        bundles = {}
        for key, stub in (("A", args.old_stub / "bundle-runtime"), ("B", None)):
            out = work / f"model-{key}"
            cmd = BUNDLE + ["build", str(args.model), "-o", str(out)] + (["--stub", str(stub)] if stub else [])
            subprocess.run(cmd, check=True, capture_output=True)
            bundles[key] = out
            first_byte([str(out), "-p", QUESTION, "--temp", "0", "-n", "8"], env)  # unpack its libraries
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds}", file=sys.stderr, flush=True)
            raw.setdefault("native_decode_tps", []).append(llama_bench(native, args.model, threads)["decode_tps"])
            t, _ = first_byte([sys.executable, str(ROOT / "bench" / "direct.py"), "first-token", str(args.model),
                               QUESTION])
            raw.setdefault("direct_launch_s", []).append(t)
            for key, exe in bundles.items():
                b, _ = run_json([str(exe), "--bench", "--json", "-t", str(threads)], env)
                raw.setdefault(f"{key}_decode_tps", []).append(b["decode_tps"])
                raw.setdefault(f"{key}_prompt_tps", []).append(b["prompt_tps"])
                raw.setdefault(f"{key}_oneshot_tps", []).append(oneshot_rate(exe, threads, env))
                t, _ = first_byte([str(exe), "-p", QUESTION, "--temp", "0", "-n", "8"], env)
                raw.setdefault(f"{key}_launch_s", []).append(t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = {k: med(v) for k, v in raw.items()}
    rows = {}
    for key in ("A", "B"):
        rows[key] = {"decode_vs_native": m[f"{key}_decode_tps"] / m["native_decode_tps"],
                     "oneshot_vs_native": m[f"{key}_oneshot_tps"] / m["native_decode_tps"],
                     "launch_vs_direct": m[f"{key}_launch_s"] / m["direct_launch_s"]}
    rows["B/A"] = {k: rows["B"][k] / rows["A"][k] for k in rows["A"]}
    if args.json:
        print(json.dumps({"rounds": args.rounds, "threads": threads, "ratios": rows, "medians": m}, indent=2))
        return 0
    print(f"{args.model.name}, {threads} threads, medians of {args.rounds} alternating rounds")
    print(f"{'':<22}{'A (old)':>10}{'B (new)':>10}{'B/A':>8}")
    for k in rows["A"]:
        print(f"{k:<22}{rows['A'][k]:10.3f}{rows['B'][k]:10.3f}{rows['B/A'][k]:8.3f}")
    print(f"medians: native decode {m['native_decode_tps']:.1f} tok/s; A {m['A_decode_tps']:.1f}, B "
          f"{m['B_decode_tps']:.1f}; one-shot A {m['A_oneshot_tps']:.1f}, B {m['B_oneshot_tps']:.1f}; launch A "
          f"{m['A_launch_s']:.3f} s, B {m['B_launch_s']:.3f} s, direct {m['direct_launch_s']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
