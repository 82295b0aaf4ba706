"""The universal file against the per-OS file on Linux: launch to first answer byte, same model,
same run (a ratio; nothing here asserts a timing).

    python -m bench.universal [--rounds N] [--json]

Both are built from the demo model with the real `bundle build` (--target universal and
linux-x86_64). Each round runs a one-shot `-p` of each, alternating, with a warm cache (the
universal file's launcher hashes its runtime in the cache before each exec: that is its cost).
The first launch of the universal file on an empty cache (it unpacks its runtime, the libraries,
and checks the file) is reported apart, against the per-OS file's first launch on an empty cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
BUNDLE = [str(Path(sys.executable).parent / "bundle")]
ASK = ["-p", "What is the capital of France? Answer in one word.", "--temp", "0", "-n", "1"]


def build(out: Path, target: str) -> Path:
    r = subprocess.run([*BUNDLE, "build", str(MODEL), "--target", target, "-o", str(out)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        sys.exit(r.stderr)
    return out


def first_byte(argv: list[str], cache: Path) -> float:
    """Seconds from the start to the first byte of the answer on stdout."""
    env = {**os.environ, "BUNDLE_CACHE_DIR": str(cache)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    proc.stdout.read(1)
    t = time.perf_counter() - t0
    proc.stdout.read()
    if proc.wait() != 0:
        sys.exit(f"{argv[0]} failed")
    return t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-universal-") as tmp:
        tmp = Path(tmp)
        uni = build(tmp / "u" / "demo.exe", "universal")
        per_os = build(tmp / "l" / "demo", "linux-x86_64")
        runs = {"universal": ["sh", str(uni), *ASK], "per_os": [str(per_os), *ASK]}
        first = {}
        for name, argv in runs.items():  # an empty cache each: unpacking and the first-launch check
            cache = tmp / f"cold-{name}"
            first[name] = first_byte(argv, cache)
            shutil.rmtree(cache)
        warm = {name: [] for name in runs}
        for name, argv in runs.items():
            first_byte(argv, tmp / "warm")  # fill the cache
        for _ in range(args.rounds):
            for name, argv in runs.items():
                warm[name].append(first_byte(argv, tmp / "warm"))
    med = {name: statistics.median(v) for name, v in warm.items()}
    result = {
        "launch_universal_s": round(med["universal"], 3),
        "launch_per_os_s": round(med["per_os"], 3),
        "launch_universal_vs_per_os": round(med["universal"] / med["per_os"], 3),
        "first_launch_universal_s": round(first["universal"], 3),
        "first_launch_per_os_s": round(first["per_os"], 3),
        "first_launch_universal_vs_per_os": round(first["universal"] / first["per_os"], 3),
        "rounds": args.rounds,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"launch to first answer byte, warm cache (median of {args.rounds}): universal "
              f"{result['launch_universal_s']} s, per-OS {result['launch_per_os_s']} s, ratio "
              f"{result['launch_universal_vs_per_os']}")
        print(f"first launch on an empty cache: universal {result['first_launch_universal_s']} s, per-OS "
              f"{result['first_launch_per_os_s']} s, ratio {result['first_launch_universal_vs_per_os']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
