"""Benchmarks, side by side in one run (not tests: nothing here asserts a timing).

    python -m bench [--quick] [--json] [--model PATH] [--rounds N]

Each measure alternates the bundle and its reference, round after round, so that drift on a
noisy machine hits both; the table shows medians and their ratio:

    decode_vs_native    decode tok/s (128 tokens), the bundle's --bench / llama-bench (-march=native)
    oneshot_decode_vs_native  the same for a plain `-p` answer (tok/s as -v reports it)
    prefill_vs_native   prompt tok/s (512 tokens), same contenders
    launch_vs_direct    launch -> first answer byte: the bundle / llama-cpp-python's Llama on the .gguf
    cold_vs_warm        the bundle's launch on an empty cache (unpacks its libraries) / a warm one
    build_vs_cp         `bundle build` / `cp` of the same .gguf (the demo model: start-up costs dominate)
    build_vs_cp_large   the same on a synthetic 1 GiB .gguf (and _sync_large: vs `cp && sync`, since
                        a build fsyncs before it renames)
    direct_decode_vs_bundle  llama-cpp-python's create_completion decode tok/s / the bundle's
    variant_gain        decode tok/s with the CPU variant ggml chose / with the baseline x64 forced
    http_ttft_vs_direct, http_tps_vs_direct   a streamed chat completion through the bundle's
                        server / llama-cpp-python's create_chat_completion in-process (model loaded)
    http_ttft_vs_llama_server, http_tps_vs_llama_server   the same against llama.cpp's llama-server
    concurrency_N_vs_llama_server  aggregate completion tokens/s of N concurrent streamed chats (1, 4,
                        8; --parallel 8), the bundle / llama-server -np 8 (bench/concurrency.py);
                        concurrency_N_vs_single: the bundle's N-client figure / its 1-client one
    grammar_tps_vs_plain, grammar_ttft_vs_plain   a streamed chat with a JSON schema (response_format) /
                        the same without, on the bundle's server; grammar_*_vs_llama_server: with the
                        schema, the bundle / llama-server (bench/grammar.py)
    first_launch_vs_later  `--info` on a machine that never ran this bundle (it hashes the model,
                        libraries and runtime once, issue 8.2) / the next `--info` (verdict remembered);
                        _large: the same for the synthetic 1 GiB model; first_check_s: the hashing alone
    rss_over_model_mib  peak RSS of the bundle minus the model's size, MiB
    stub_mib            what a bundle adds to its model (runtime + libraries), MiB
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
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
QUESTION = "What is the capital of France? Answer in one word."
BUNDLE = [str(Path(sys.executable).parent / "bundle")]


def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wall(cmd, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def first_byte(cmd, env=None) -> tuple[float, str]:
    """Seconds from spawn to the first byte on stdout; and all of stdout."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    first = p.stdout.read(1)
    t = time.perf_counter() - t0
    rest = p.stdout.read()
    p.wait()
    if p.returncode != 0 or not first:
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode})")
    return t, (first + rest).decode("utf-8", "replace")


def run_json(cmd, env=None) -> tuple[dict, int]:
    """Run, parse stdout as JSON; also the peak RSS (KiB) of the process tree (wait4)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({p.returncode})")
    return json.loads(out), usage.ru_maxrss


def oneshot_rate(bundle: Path, threads: int, env) -> float:
    """Decode tok/s of a plain one-shot answer (-p), as the runtime reports it with -v."""
    r = subprocess.run([str(bundle), "-p", "Write a long story about a lighthouse keeper.", "--temp", "0",
                        "-n", "128", "-t", str(threads), "-v"], capture_output=True, text=True, env=env, check=True)
    import re

    return float(re.search(r"generated, ([0-9.]+) tok/s", r.stderr).group(1))


def llama_bench(tool: Path, model: Path, threads: int, extra=()) -> dict:
    out = subprocess.run([str(tool), "-m", str(model), "-p", "512", "-n", "128", "-r", "1", "-t", str(threads),
                          "-o", "json", *extra], check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    res = {}
    for row in rows:
        if row.get("n_prompt") == 512 and row.get("n_gen") == 0:
            res["prompt_tps"] = row["avg_ts"]
        if row.get("n_gen") == 128 and row.get("n_prompt") == 0:
            res["decode_tps"] = row["avg_ts"]
    return res


def write_synthetic_gguf(path: Path, mib: int) -> None:
    """A valid GGUF of about `mib` MiB (one F32 tensor of non-repeating-page data): big enough
    to show how `bundle build` compares with `cp` once start-up costs stop mattering. It names
    an architecture the stub's llama.cpp knows (`bundle build` refuses others); it is never
    loaded, only built and checked."""
    import struct

    n = mib * 2**20 // 4

    def gstr(s):
        b = s.encode()
        return struct.pack("<Q", len(b)) + b

    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + gstr("general.architecture") + struct.pack("<I", 8) + gstr("llama")
    head += gstr("t") + struct.pack("<IQIQ", 1, n, 0, 0)
    head += b"\0" * (-len(head) % 32)
    block = bytes(range(256)) * 4096  # 1 MiB
    with open(path, "wb") as f:
        f.write(head)
        for i in range(mib):
            f.write(block[i % 256:] + block[: i % 256])


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (finishes in a few minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--rounds", type=int, help="rounds per measure (default 5, 3 with --quick)")
    ap.add_argument("--no-native", action="store_true", help="skip llama-bench (it is compiled on first use)")
    ap.add_argument("--large-mib", type=int, help="size of the synthetic model for the large build (default 1024, 512 with --quick)")
    args = ap.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    args.large_mib = args.large_mib or (512 if args.quick else 1024)
    model = args.model
    if not model.exists():
        sys.exit(f"no model at {model}; run `make model` or pass --model")
    sys.path.insert(0, str(ROOT))
    from runtime.host.cpu import physical_cores

    threads = physical_cores()
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-"))
    env = dict(os.environ, BUNDLE_CACHE_DIR=str(work / "cache"))
    results: dict = {"model": model.name, "model_mib": model.stat().st_size / 2**20, "threads": threads,
                     "rounds": rounds, "large_mib": args.large_mib}
    raw: dict[str, list] = {}

    def add(key, value):
        raw.setdefault(key, []).append(value)

    def first_check(exe: Path, check_env: dict, suffix: str) -> None:
        """--info on a fresh copy of the bundle (a new file: its hashes are checked), then again
        (the verdict is remembered). The libraries are unpacked into the cache beforehand, so
        the difference is the check alone."""
        wall([str(exe), "--info"], check_env)  # unpack the libraries
        fresh = exe.with_name(exe.name + ".copy")
        shutil.copyfile(exe, fresh)
        fresh.chmod(0o755)
        t0 = time.perf_counter()
        info, _ = run_json([str(fresh), "--info", "--json"], check_env)
        add(f"first_info{suffix}_s", time.perf_counter() - t0)
        add(f"first_check{suffix}_s", info["first_launch_check"]["seconds"])
        add(f"later_info{suffix}_s", wall([str(fresh), "--info"], check_env))
        fresh.unlink()

    try:
        bundle = work / "model-bundle"
        subprocess.run(BUNDLE + ["build", str(model), "-o", str(bundle)], check=True, capture_output=True)
        native = server_ref = None
        if not args.no_native:
            from bench.native import ensure_tools

            tools = ensure_tools()
            native, server_ref = tools["llama-bench"], tools["llama-server"]

        err(f"build vs cp ({rounds} rounds)")
        for _ in range(rounds):
            add("build_s", wall(BUNDLE + ["build", str(model), "-o", str(work / "b2")]))
            add("cp_s", wall(["cp", str(model), str(work / "c2")]))
            (work / "c2").unlink()

        big = work / "large.gguf"
        write_synthetic_gguf(big, args.large_mib)
        err(f"build vs cp, {args.large_mib} MiB model ({rounds} rounds)")
        for i in range(rounds):
            add("build_large_s", wall(BUNDLE + ["build", str(big), "-o", str(work / "b3")]))
            add("cp_large_s", wall(["cp", str(big), str(work / "c3")]))
            add("cp_sync_large_s", wall(["sh", "-c", f"cp '{big}' '{work / 'c4'}' && sync '{work / 'c4'}'"]))
            first_check(work / "b3", dict(env, BUNDLE_CACHE_DIR=str(work / f"chk-large{i}")), "_large")
            for p in ("b3", "c3", "c4"):
                (work / p).unlink()
        big.unlink()

        err(f"first launch (hashes checked) vs later launches ({rounds} rounds)")
        for i in range(rounds):
            first_check(bundle, dict(env, BUNDLE_CACHE_DIR=str(work / f"chk{i}")), "")

        err(f"launch to first token ({rounds} rounds)")
        first_byte([str(bundle), "-p", QUESTION, "--temp", "0", "-n", "8"], env)  # warm the cache
        for i in range(rounds):
            t, out = first_byte([str(bundle), "-p", QUESTION, "--temp", "0", "-n", "8"], env)
            add("launch_bundle_s", t)
            t, _ = first_byte([sys.executable, str(ROOT / "bench" / "direct.py"), "first-token", str(model), QUESTION])
            add("launch_direct_s", t)
            cold_env = dict(env, BUNDLE_CACHE_DIR=str(work / f"cold{i}"))
            t, _ = first_byte([str(bundle), "-p", QUESTION, "--temp", "0", "-n", "8"], cold_env)
            add("launch_cold_s", t)

        err(f"decode and prompt speed ({rounds} rounds)")
        bench_env = dict(env, BUNDLE_BENCH_REPS="1")
        for _ in range(rounds):
            b, rss = run_json([str(bundle), "--bench", "--json", "-t", str(threads)], bench_env)
            add("bundle_decode_tps", b["decode_tps"])
            add("bundle_prompt_tps", b["prompt_tps"])
            add("rss_kib", rss)
            results["cpu_variant"] = b["cpu_variant"]
            if native:
                n = llama_bench(native, model, threads)
                add("native_decode_tps", n["decode_tps"])
                add("native_prompt_tps", n["prompt_tps"])
            add("oneshot_decode_tps", oneshot_rate(bundle, threads, env))
            x, _ = run_json([str(bundle), "--bench", "--json", "-t", str(threads)], dict(bench_env, BUNDLE_CPU_VARIANT="x64"))
            add("x64_decode_tps", x["decode_tps"])
            d, _ = run_json([sys.executable, str(ROOT / "bench" / "direct.py"), "decode", str(model), "128"])
            add("direct_decode_tps", d["decode_tps"])

        err(f"through HTTP: the bundle's server, llama-server, direct Python ({rounds} rounds)")
        from bench.serving import measure as measure_http

        for key, values in measure_http(bundle, model, threads, rounds, server_ref, env).items():
            raw[key] = values

        err(f"1, 4 and 8 concurrent clients: the bundle's server vs llama-server, --parallel 8 ({rounds} rounds)")
        from bench.concurrency import measure as measure_concurrency

        results["concurrency"] = measure_concurrency(bundle, model, threads, rounds, server_ref, env)
        if server_ref is not None:  # the same on a Q4_0 copy (bench.requant): repacked matrix kernels
            from bench.requant import q4_0_copy

            q40 = q4_0_copy(model)
            err(f"the same on a Q4_0 copy of the model, made here ({rounds} rounds)")
            subprocess.run(BUNDLE + ["build", str(q40), "-o", str(work / "q4_0-bundle")], check=True,
                           capture_output=True)
            results["concurrency_q4_0"] = measure_concurrency(work / "q4_0-bundle", q40, threads, rounds,
                                                              server_ref, env)

        err(f"structured output: a JSON schema vs none, the bundle's server and llama-server ({rounds} rounds)")
        from bench.grammar import measure as measure_grammar, summary as grammar_summary

        results["grammar"] = grammar_summary(measure_grammar(bundle, model, threads, rounds, server_ref, env))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    m = {k: med(v) for k, v in raw.items()}
    stub_dir = ROOT / "stubs" / "linux-x86_64"
    overhead = (stub_dir / "bundle-runtime").stat().st_size + (stub_dir / "native-cpu.tar.zst").stat().st_size
    results.update({
        "decode_vs_native": m["bundle_decode_tps"] / m["native_decode_tps"] if "native_decode_tps" in m else None,
        "prefill_vs_native": m["bundle_prompt_tps"] / m["native_prompt_tps"] if "native_prompt_tps" in m else None,
        "oneshot_decode_vs_native": (m["oneshot_decode_tps"] / m["native_decode_tps"]
                                     if "native_decode_tps" in m else None),
        "launch_vs_direct": m["launch_bundle_s"] / m["launch_direct_s"],
        "cold_vs_warm": m["launch_cold_s"] / m["launch_bundle_s"],
        "build_vs_cp": m["build_s"] / m["cp_s"],
        "build_vs_cp_large": m["build_large_s"] / m["cp_large_s"],
        "build_vs_cp_sync_large": m["build_large_s"] / m["cp_sync_large_s"],
        "direct_decode_vs_bundle": m["direct_decode_tps"] / m["bundle_decode_tps"],
        "variant_gain": m["bundle_decode_tps"] / m["x64_decode_tps"],
        "first_launch_vs_later": m["first_info_s"] / m["later_info_s"],
        "first_launch_vs_later_large": m["first_info_large_s"] / m["later_info_large_s"],
        "first_check_s": m["first_check_s"],
        "first_check_large_s": m["first_check_large_s"],
        "rss_over_model_mib": m["rss_kib"] / 1024 - results["model_mib"],
        "stub_mib": overhead / 2**20,
        "stub_exe_mib": (stub_dir / "bundle-runtime").stat().st_size / 2**20,
        "http_ttft_vs_direct": m["http_ttft_s"] / m["direct_ttft_s"],
        "http_tps_vs_direct": m["http_tps"] / m["direct_tps"],
        "http_ttft_vs_llama_server": m["http_ttft_s"] / m["llama_server_ttft_s"] if "llama_server_ttft_s" in m else None,
        "http_tps_vs_llama_server": m["http_tps"] / m["llama_server_tps"] if "llama_server_tps" in m else None,
        "medians": m,
    })
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        from bench.concurrency import format_table as concurrency_table

        from bench.grammar import format_table as grammar_table

        print(format_table(results))
        print(concurrency_table(results["concurrency"]))
        if "concurrency_q4_0" in results:
            print("the same, on a Q4_0 copy of the model:")
            print(concurrency_table(results["concurrency_q4_0"]))
        print(grammar_table(results["grammar"]))
    return 0


def format_table(r: dict) -> str:
    m = r["medians"]

    def row(name, a, b, unit, ratio, key):
        ratio_s = f"{ratio:6.2f}" if ratio is not None else "   n/a"
        b_s = f"{b:10.3f}" if b == b else "       n/a"
        return f"{name:<42}{a:10.3f} {b_s}  {unit:<6}{ratio_s}  {key}"

    lines = [
        f"model {r['model']} ({r['model_mib']:.1f} MiB), {r['threads']} threads, CPU variant {r.get('cpu_variant')}, "
        f"medians of {r['rounds']} alternating rounds",
        f"{'measure':<42}{'bundle':>10} {'reference':>10}  {'unit':<6}{'ratio':>6}  key",
        row("decode 128 (vs llama-bench)", m["bundle_decode_tps"], m.get("native_decode_tps", float("nan")), "tok/s",
            r["decode_vs_native"], "decode_vs_native"),
        row("prompt 512 (vs llama-bench)", m["bundle_prompt_tps"], m.get("native_prompt_tps", float("nan")), "tok/s",
            r["prefill_vs_native"], "prefill_vs_native"),
        row("decode, one-shot -p (vs llama-bench)", m["oneshot_decode_tps"], m.get("native_decode_tps", float("nan")),
            "tok/s", r["oneshot_decode_vs_native"], "oneshot_decode_vs_native"),
        row("launch -> first token (vs direct)", m["launch_bundle_s"], m["launch_direct_s"], "s", r["launch_vs_direct"],
            "launch_vs_direct"),
        row("cold launch (vs warm)", m["launch_cold_s"], m["launch_bundle_s"], "s", r["cold_vs_warm"], "cold_vs_warm"),
        row("bundle build (vs cp)", m["build_s"], m["cp_s"], "s", r["build_vs_cp"], "build_vs_cp"),
        row(f"bundle build, {r['large_mib']} MiB (vs cp)", m["build_large_s"], m["cp_large_s"], "s",
            r["build_vs_cp_large"], "build_vs_cp_large"),
        row(f"bundle build, {r['large_mib']} MiB (vs cp+sync)", m["build_large_s"], m["cp_sync_large_s"], "s",
            r["build_vs_cp_sync_large"], "build_vs_cp_sync_large"),
        row("direct llama-cpp-python decode", m["direct_decode_tps"], m["bundle_decode_tps"], "tok/s",
            r["direct_decode_vs_bundle"], "direct_decode_vs_bundle"),
        row(f"decode, {r.get('cpu_variant')} (vs x64 forced)", m["bundle_decode_tps"], m["x64_decode_tps"], "tok/s",
            r["variant_gain"], "variant_gain"),
        row("HTTP time to first token (vs direct)", m["http_ttft_s"], m["direct_ttft_s"], "s",
            r["http_ttft_vs_direct"], "http_ttft_vs_direct"),
        row("HTTP tokens/s (vs direct)", m["http_tps"], m["direct_tps"], "tok/s", r["http_tps_vs_direct"],
            "http_tps_vs_direct"),
        row("HTTP time to first token (vs llama-server)", m["http_ttft_s"], m.get("llama_server_ttft_s", float("nan")),
            "s", r["http_ttft_vs_llama_server"], "http_ttft_vs_llama_server"),
        row("HTTP tokens/s (vs llama-server)", m["http_tps"], m.get("llama_server_tps", float("nan")), "tok/s",
            r["http_tps_vs_llama_server"], "http_tps_vs_llama_server"),
        row("first launch, hashes checked (vs later)", m["first_info_s"], m["later_info_s"], "s",
            r["first_launch_vs_later"], "first_launch_vs_later"),
        row(f"first launch, {r['large_mib']} MiB (vs later)", m["first_info_large_s"], m["later_info_large_s"], "s",
            r["first_launch_vs_later_large"], "first_launch_vs_later_large"),
        f"{'peak RSS over model size':<42}{r['rss_over_model_mib']:10.1f} MiB{'':>18}rss_over_model_mib",
        f"{'runtime + libraries per bundle':<42}{r['stub_mib']:10.1f} MiB (stub executable {r['stub_exe_mib']:.1f})  stub_mib",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
