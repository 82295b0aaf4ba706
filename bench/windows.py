"""The Windows bundle under wine against the Linux bundle, same model, same run (informational:
wine is not Windows, and these 2 cores are noisy).

    python -m bench.windows [--rounds N] [--threads N] [--json]

Both bundles are built from the demo model with the real `bundle build`; each round runs the
Linux bundle's `--bench --json` and then the .exe's under wine (a fresh prefix of its own),
alternating, and the table shows the medians of decode (128 tokens) and prompt (512 tokens)
tokens/s and their ratio (Windows under wine / Linux), plus the launch-to-answer time of a
one-shot `-p`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from wine import Wine  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
BUNDLE = [str(Path(sys.executable).parent / "bundle")]
QUESTION = "What is the capital of France? Answer in one word."


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(out: Path, target: str) -> Path:
    r = subprocess.run([*BUNDLE, "build", str(MODEL), "--target", target, "-o", str(out)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)
    return out.with_name(out.name + ".exe") if target.startswith("windows") and out.suffix != ".exe" else out


def parse(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-windows-") as tmp:
        tmp = Path(tmp)
        linux = build(tmp / "linux" / "demo", "linux-x86_64")
        exe = build(tmp / "win" / "demo", "windows-x86_64")
        wine = Wine(tmp / "prefix").start()
        env = {"BUNDLE_CACHE_DIR": str(tmp / "cache")}
        import os

        linux_env = {**os.environ, **env}
        rows = {"linux": [], "windows": [], "linux_oneshot": [], "windows_oneshot": []}
        try:
            # warm both caches (libraries unpacked, first-launch check done) before measuring
            subprocess.run([str(linux), "--info"], env=linux_env, capture_output=True, check=True)
            wine.run(exe, "--info")
            for i in range(args.rounds):
                r = subprocess.run([str(linux), "--bench", "--json", "-t", str(args.threads)], env=linux_env,
                                   capture_output=True, text=True, check=True)
                rows["linux"].append(parse(r.stdout))
                w = wine.run(exe, "--bench", "--json", "-t", args.threads, timeout=900)
                if w.returncode != 0:
                    sys.exit(w.stderr)
                rows["windows"].append(parse(w.stdout))
                t0 = time.perf_counter()
                subprocess.run([str(linux), "-p", QUESTION, "--temp", "0", "-n", "16"], env=linux_env,
                               capture_output=True, check=True)
                rows["linux_oneshot"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                wine.run(exe, "-p", QUESTION, "--temp", "0", "-n", "16")
                rows["windows_oneshot"].append(time.perf_counter() - t0)
                err(f"round {i + 1}: decode {rows['linux'][-1]['decode_tps']:.1f} (linux) vs "
                    f"{rows['windows'][-1]['decode_tps']:.1f} (wine) tok/s; one-shot "
                    f"{rows['linux_oneshot'][-1]:.2f} s vs {rows['windows_oneshot'][-1]:.2f} s")
        finally:
            wine.stop()
    med = statistics.median
    out = {
        "linux_decode_tps": med(r["decode_tps"] for r in rows["linux"]),
        "wine_decode_tps": med(r["decode_tps"] for r in rows["windows"]),
        "linux_prompt_tps": med(r["prompt_tps"] for r in rows["linux"]),
        "wine_prompt_tps": med(r["prompt_tps"] for r in rows["windows"]),
        "linux_oneshot_s": med(rows["linux_oneshot"]),
        "wine_oneshot_s": med(rows["windows_oneshot"]),
        "wine_cpu_variant": rows["windows"][-1].get("cpu_variant"),
        "linux_cpu_variant": rows["linux"][-1].get("cpu_variant"),
        "threads": args.threads,
        "rounds": args.rounds,
    }
    out["decode_wine_vs_linux"] = out["wine_decode_tps"] / out["linux_decode_tps"]
    out["prompt_wine_vs_linux"] = out["wine_prompt_tps"] / out["linux_prompt_tps"]
    out["oneshot_wine_vs_linux"] = out["wine_oneshot_s"] / out["linux_oneshot_s"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{'measure':<28}{'linux':>10}{'wine':>10}{'ratio':>8}")
        for key, unit in (("decode", "tps"), ("prompt", "tps"), ("oneshot", "s")):
            print(f"{key + ' (' + unit + ')':<28}{out[f'linux_{key}_{unit}']:>10.2f}{out[f'wine_{key}_{unit}']:>10.2f}"
                  f"{out[f'{key}_wine_vs_linux']:>8.2f}")
        print(f"CPU variant: linux {out['linux_cpu_variant']}, wine {out['wine_cpu_variant']}; "
              f"{args.threads} threads, {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
