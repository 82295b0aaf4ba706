"""Long use (issue 27): what hashing and the prompt caches save, side by side in one run.

    python -m bench.caches [--rounds N] [--large-mib 1600] [--json]

    check_s_per_gib        the first launch's check of a new file, seconds per GiB of bundle, for the
                           same synthetic model built now (BLAKE3) and rewritten as a bundle from
                           before (SHA-256, format 1); their ratio is check_blake3_vs_sha256
    build_vs_cp_large      `bundle build` / `cp` of the same synthetic .gguf (--large-mib), in the
                           page cache; _sync_large: / `cp && sync` (neither the build nor cp waits
                           for the disk; this says what waiting for it would cost); _cold_large:
                           both reading the model from the disk (the page cache dropped before
                           each: needs root, else not measured)
    second_vs_first_launch launch -> first answer byte with a system prompt of about 2,000 tokens:
                           the second launch (its state read from the per-user cache) / the first
                           launch (an empty prompt cache: it decodes the system prompt and saves it)
Time to first token at 4 clients against llama-server is bench.concurrency's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.__main__ import BUNDLE, DEFAULT_MODEL, err, first_byte, run_json, wall, write_synthetic_gguf  # noqa: E402

SYSTEM = " ".join(f"Fact {i}: the archive room number {i} holds {i * 7} boxes of old letters." for i in range(110))
QUESTION = "What is the capital of France? Answer in one word."


def as_sha256_bundle(path: Path) -> None:
    """Rewrite a bundle as bundle build wrote it before BLAKE3 (format 1, SHA-256 digests): the
    'before' of the hashing measure, on the very same bytes."""
    from runtime import bundlefile as P
    from runtime.bundlefile.layout import unpack_header

    p = P.read_payload(str(path))
    with open(path, "rb") as f:
        f.seek(p.payload_start + p.payload_size - P.HEADER_SIZE)
        trailer = unpack_header(f.read(P.HEADER_SIZE))
        _, _, _, payload_size, file_size, toc_offset, toc_size, _ = trailer
        f.seek(p.payload_start + toc_offset)
        toc = json.loads(f.read(toc_size))

    def sha(offset: int, size: int) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(offset)
            while size:
                chunk = f.read(min(1 << 22, size))
                h.update(chunk)
                size -= len(chunk)
        return h.hexdigest()

    for e in toc["entries"]:
        del e["blake3"]
        e["sha256"] = sha(p.payload_start + e["offset"], e["size"])
    for r in toc["regions"]:
        del r["blake3"]
        r["sha256"] = sha(r["offset"], r["size"])
    model = toc["manifest"]["model"]
    if model.pop("blake3", None):
        model["sha256"] = next(e["sha256"] for e in toc["entries"] if e["name"] == "model.gguf")
    toc["format"] = 1
    data = json.dumps(toc).encode()
    at = payload_size - P.HEADER_SIZE - len(data)
    digest = hashlib.sha256(data).digest()[:16]
    with open(path, "r+b") as f:
        f.seek(p.payload_start + at)
        f.write(data)
        for magic, where in ((P.TRAILER_MAGIC, payload_size - P.HEADER_SIZE), (P.HEADER_MAGIC, 0)):
            f.seek(p.payload_start + where)
            f.write(struct.pack(P.HEADER_FORMAT, magic, 1, 0, payload_size, file_size, at, len(data), digest))


def check_seconds(exe: Path, cache: Path) -> float:
    """The first-launch check of a new copy of exe (its libraries unpacked beforehand)."""
    env = dict(os.environ, BUNDLE_CACHE_DIR=str(cache))
    wall([str(exe), "--info"], env)
    fresh = exe.with_name(exe.name + ".copy")
    shutil.copyfile(exe, fresh)
    fresh.chmod(0o755)
    try:
        info, _ = run_json([str(fresh), "--info", "--json"], env)
    finally:
        fresh.unlink()
    return info["first_launch_check"]["seconds"]


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def sync() -> None:
    if hasattr(os, "sync"):
        os.sync()


def can_drop_caches() -> bool:
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_caches() -> None:
    sync()
    DROP_CACHES.write_text("3\n")


def read_through(path: Path) -> None:
    """Read a file whole, so that the page cache holds it."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def measure(model: Path, rounds: int, large_mib: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bundle-bench-caches-"))
    raw: dict[str, list] = {}

    def add(key, value):
        raw.setdefault(key, []).append(value)

    try:
        big = work / "large.gguf"
        write_synthetic_gguf(big, large_mib)
        err(f"build vs cp, {large_mib} MiB model; the first-launch check, BLAKE3 vs SHA-256 ({rounds} rounds)")
        build = BUNDLE + ["build", str(big), "-o", str(work / "b3")]
        copy = ["cp", str(big), str(work / "c3")]
        for i in range(rounds):
            # The model in the page cache (read through first), who goes first alternating. Each
            # writes with no other copy of the model left on the disk and after a sync: on this
            # machine's disk a second fresh 1.6 GB file is throttled to the disk's speed (4-5 s
            # instead of 0.4) while the first is still there.
            read_through(big)
            for what in (("build", "cp") if i % 2 == 0 else ("cp", "build")):
                (work / "c3").unlink(missing_ok=True)
                if what == "build":
                    sync()
                    add("build_large_s", wall(build))
                else:
                    (work / "b3").unlink(missing_ok=True)
                    sync()
                    add("cp_large_s", wall(copy))
            (work / "c3").unlink(missing_ok=True)
            if not (work / "b3").exists():
                wall(build)
            size = (work / "b3").stat().st_size
            new = check_seconds(work / "b3", work / f"chk{i}")
            as_sha256_bundle(work / "b3")
            old = check_seconds(work / "b3", work / f"chk{i}")
            add("check_blake3_s_per_gib", new / (size / 2**30))
            add("check_sha256_s_per_gib", old / (size / 2**30))
            add("check_blake3_vs_sha256", new / old)
            (work / "b3").unlink()
            sync()
            add("cp_sync_large_s", wall(["sh", "-c", f"cp '{big}' '{work / 'c4'}' && sync '{work / 'c4'}'"]))
            (work / "c4").unlink()
            if can_drop_caches():
                # The model read from the disk (the page cache dropped; the bundle tool's own files
                # read back first, as a tool used before would have them).
                drop_caches()
                wall(BUNDLE + ["build", "--help"])
                add("build_cold_large_s", wall(build))
                (work / "b3").unlink()
                drop_caches()
                add("cp_cold_large_s", wall(copy))
                (work / "c3").unlink()
        big.unlink()

        bundle = work / "model-bundle"
        subprocess.run(BUNDLE + ["build", str(model), "-o", str(bundle)], check=True, capture_output=True)
        cmd = [str(bundle), "--system", SYSTEM, "-p", QUESTION, "--temp", "0", "-n", "8"]
        err(f"launch to first answer byte with a 2,000-token system prompt: first vs second launch ({rounds} rounds)")
        for i in range(rounds):
            env = dict(os.environ, BUNDLE_CACHE_DIR=str(work / f"launch{i}"))
            (work / f"launch{i}").mkdir(mode=0o700)
            subprocess.run([str(bundle), "--info"], env=env, check=True, capture_output=True)  # libraries, check
            first, a = first_byte(cmd, env)
            second, b = first_byte(cmd, env)
            if a != b:
                raise RuntimeError(f"the second launch answered otherwise: {a!r} / {b!r}")
            add("first_launch_s", first)
            add("second_launch_s", second)
            add("second_vs_first_launch", second / first)
        r = subprocess.run(cmd + ["-v"], env=env, capture_output=True, text=True, check=True)
        system_line = next((x for x in r.stderr.splitlines() if x.startswith("system prompt:")), "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {k: statistics.median(v) for k, v in raw.items()}
    out["build_vs_cp_large"] = out["build_large_s"] / out["cp_large_s"]
    if "cp_cold_large_s" in out:
        out["build_vs_cp_cold_large"] = out["build_cold_large_s"] / out["cp_cold_large_s"]
    out["build_vs_cp_sync_large"] = out["build_large_s"] / out["cp_sync_large_s"]
    out.update({"rounds": rounds, "large_mib": large_mib, "system_prompt": system_line,
                "all": raw})
    return out


def format_table(r: dict) -> str:
    return "\n".join([
        f"long use ({r['rounds']} rounds, medians; {r['system_prompt']})",
        f"  first-launch check, s per GiB     BLAKE3 {r['check_blake3_s_per_gib']:.3f}   SHA-256 "
        f"{r['check_sha256_s_per_gib']:.3f}   ratio {r['check_blake3_vs_sha256']:.2f}",
        f"  bundle build / cp, {r['large_mib']} MiB       {r['build_large_s']:.2f} s / {r['cp_large_s']:.2f} s"
        f"   ratio {r['build_vs_cp_large']:.2f}; / cp && sync {r['cp_sync_large_s']:.2f} s   ratio "
        f"{r['build_vs_cp_sync_large']:.2f}",
        (f"  ... from the disk (page cache dropped) {r['build_cold_large_s']:.2f} s / {r['cp_cold_large_s']:.2f} s"
         f"   ratio {r['build_vs_cp_cold_large']:.2f}" if "build_vs_cp_cold_large" in r else
         "  ... from the disk: not measured (dropping the page cache needs root)"),
        f"  first answer byte, 2,000-token system prompt: second launch {r['second_launch_s']:.2f} s / first "
        f"{r['first_launch_s']:.2f} s   ratio {r['second_vs_first_launch']:.2f}",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.caches", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--large-mib", type=int, default=1600)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = measure(args.model, args.rounds, args.large_mib)
    print(json.dumps(r, indent=2) if args.json else format_table(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
