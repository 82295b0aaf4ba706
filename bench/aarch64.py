"""The aarch64 bundle against llama.cpp's own llama-bench built for aarch64 from the same source,
both under qemu-user with the same emulated CPU, in the same run (a ratio: qemu's absolute speed
means nothing; what it shows is that the bundle adds nothing to the loop llama.cpp runs).

    python -m bench.aarch64 [--rounds N] [--threads N] [--cpu cortex-a76] [--json]

The reference is compiled once with zig for aarch64 and glibc 2.17 (as the stub's libraries
are), with the flags ggml's CPU variant for that CPU is compiled with (cortex-a76:
armv8.2-a+dotprod+fp16, the bundle's armv8.2_2), cached under ~/.cache/bundle/bench/. Each round
runs the bundle's `--bench --json` and then llama-bench (decode 128 tokens, prompt 512),
alternating, in the arm64 userland the tests use.
"""

from __future__ import annotations

import argparse
import hashlib
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
sys.path.insert(0, str(ROOT))

from buildsys import qemu, zig  # noqa: E402
from buildsys.console import log  # noqa: E402
from buildsys.stub import LLAMA_CPP_PYTHON, cache_dir, run_with_progress  # noqa: E402
from bench.native import _source  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
BUNDLE = [str(Path(sys.executable).parent / "bundle")]
TRIPLE = "aarch64-linux-gnu.2.17"
# each emulated CPU and the -march of the ggml variant the bundle picks on it
MARCH = {"cortex-a53": "armv8-a", "cortex-a76": "armv8.2-a+dotprod+fp16", "neoverse-n1": "armv8.2-a+dotprod+fp16",
         "max": "armv9.2-a+dotprod+fp16+sve+i8mm+sve2+sme"}
FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
         "-DGGML_OPENMP=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON",
         "-DLLAMA_BUILD_SERVER=OFF"]
USERLAND = Path(os.environ.get("BUNDLE_TEST_ROOTFS_ARM64") or Path.home() / ".cache" / "bundle" / "test-rootfs" /
                "bullseye-arm64-minbase")


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_llama_bench(cpu: str) -> Path:
    flags = [*FLAGS, f"-DGGML_CPU_ARM_ARCH={MARCH[cpu]}"]
    key = hashlib.sha256("|".join([*flags, *zig.identity(TRIPLE)]).encode()).hexdigest()[:8]
    folder = cache_dir().parent / "bench" / f"llama.cpp-{LLAMA_CPP_PYTHON}-aarch64-{key}"
    tool = folder / "llama-bench"
    if tool.exists():
        return tool
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    try:
        src = _source(work)
        build = work / "build"
        log(f"reference: configuring llama.cpp for aarch64 ({MARCH[cpu]})")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else
                        "Unix Makefiles", *flags, *zig.cmake_args(zig.tools_folder(cache_dir(), TRIPLE), TRIPLE)],
                       check=True, stdout=subprocess.DEVNULL)
        log("reference: compiling llama-bench for aarch64 (a few minutes)")
        run_with_progress(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-bench"],
                          dict(os.environ), folder / "build.log")
        os.replace(build / "bin" / "llama-bench", tool)
        return tool
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu", choices=list(MARCH), default="cortex-a76", help="the CPU qemu emulates")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (ROOT / "stubs" / "linux-aarch64" / "bundle-runtime").exists():
        sys.exit("no aarch64 stub: run `make stub-aarch64`")
    tool = ensure_llama_bench(args.cpu)
    root = qemu.ensure_userland(USERLAND)
    env = {"QEMU_CPU": args.cpu, "BUNDLE_BENCH_REPS": "1"}  # one repetition each, as llama-bench -r 1
    with tempfile.TemporaryDirectory(prefix="bench-aarch64-") as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)
        bundle = tmp / "demo"
        r = subprocess.run([*BUNDLE, "build", str(MODEL), "--target", "linux-aarch64", "-o", str(bundle)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr)
        shutil.copy2(tool, tmp / "llama-bench")
        shutil.copy2(MODEL, tmp / "model.gguf")

        def run(argv: list[str]) -> dict | list:
            out = qemu.run(root, argv, binds=[tmp], env=env, capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                sys.exit(f"{argv[0]} failed under qemu ({out.returncode}):\n{out.stderr[-2000:]}")
            return json.loads(out.stdout[out.stdout.index("{" if argv[0] == str(bundle) else "["):])

        run([str(bundle), "--info", "--json"])  # the first launch unpacks and checks: not measured
        rows = {"bundle": [], "llama_bench": []}
        t0 = time.time()
        for i in range(args.rounds):
            b = run([str(bundle), "--bench", "--json", "-t", str(args.threads)])
            rows["bundle"].append(b)
            ref = {}
            for row in run([str(tmp / "llama-bench"), "-m", str(tmp / "model.gguf"), "-p", "512", "-n", "128",
                            "-r", "1", "-t", str(args.threads), "-o", "json"]):
                if row.get("n_prompt") == 512 and row.get("n_gen") == 0:
                    ref["prompt_tps"] = row["avg_ts"]
                if row.get("n_gen") == 128 and row.get("n_prompt") == 0:
                    ref["decode_tps"] = row["avg_ts"]
            rows["llama_bench"].append(ref)
            err(f"round {i + 1}: decode {b['decode_tps']:.1f} (bundle) vs {ref['decode_tps']:.1f} (llama-bench) "
                f"tok/s, prompt {b['prompt_tps']:.1f} vs {ref['prompt_tps']:.1f}")
    med = statistics.median
    out = {
        "cpu": args.cpu,
        "bundle_cpu_variant": rows["bundle"][-1].get("cpu_variant"),
        "llama_bench_march": MARCH[args.cpu],
        "bundle_decode_tps": med(r["decode_tps"] for r in rows["bundle"]),
        "llama_bench_decode_tps": med(r["decode_tps"] for r in rows["llama_bench"]),
        "bundle_prompt_tps": med(r["prompt_tps"] for r in rows["bundle"]),
        "llama_bench_prompt_tps": med(r["prompt_tps"] for r in rows["llama_bench"]),
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": round(time.time() - t0),
    }
    out["decode_vs_llama_bench"] = out["bundle_decode_tps"] / out["llama_bench_decode_tps"]
    out["prompt_vs_llama_bench"] = out["bundle_prompt_tps"] / out["llama_bench_prompt_tps"]
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"aarch64 under qemu ({args.cpu}; bundle variant {out['bundle_cpu_variant']}, llama-bench "
              f"-march={MARCH[args.cpu]}), {args.threads} threads, {args.rounds} rounds")
        print(f"{'measure':<16}{'bundle':>10}{'llama-bench':>13}{'ratio':>8}")
        for key in ("decode", "prompt"):
            print(f"{key + ' (tok/s)':<16}{out[f'bundle_{key}_tps']:>10.2f}{out[f'llama_bench_{key}_tps']:>13.2f}"
                  f"{out[f'{key}_vs_llama_bench']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
