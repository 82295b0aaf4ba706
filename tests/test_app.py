"""The built executable, run as a user runs it (subprocess), on the real demo model."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import QUESTION, run_bundle_cmd, run_exe


def test_one_shot_answer_only_on_stdout(built_bundle):
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert r.stdout.strip() == r.stdout.strip().splitlines()[0]  # the answer alone, no banner
    assert "llama" not in r.stdout.lower() and "load" not in r.stdout.lower()
    assert "CPU (" in r.stderr  # the banner went to stderr


def test_one_shot_never_imports_the_server(built_bundle):
    """-p loads only what an answer needs: the runtime run from source (BUNDLE_SELF: the same
    code as in the stub, the bundle's libraries and model) under -X importtime answers without
    importing the serving layer or the web stack. (The layers' import-linter contracts cannot see
    this: the launch may import the server, only not on this path.)"""
    import sys

    env = dict(os.environ, BUNDLE_SELF=str(built_bundle))
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "runtime", "-p", QUESTION, "--temp", "0", "-n", "8"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "runtime.inference.scheduler" in imported and "runtime.launch.modes" in imported  # the measure works
    assert not {m for m in imported if m.startswith(("runtime.serving", "starlette", "uvicorn", "h11"))}


def test_prompt_from_file_and_stdin(built_bundle, tmp_path):
    f = tmp_path / "q.txt"
    f.write_text(QUESTION)
    r = run_exe(built_bundle, "-f", f, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout
    r = run_exe(built_bundle, "-f", "-", "--temp", "0", input=QUESTION)
    assert r.returncode == 0 and "Paris" in r.stdout


def test_usage_errors(built_bundle, tmp_path):
    r = run_exe(built_bundle, "-f", tmp_path / "missing.txt")
    assert r.returncode == 2 and "cannot read the prompt file" in r.stderr
    r = run_exe(built_bundle, "-p", "   ")
    assert r.returncode == 2 and "prompt is empty" in r.stderr
    r = run_exe(built_bundle, "-p", "hi", "--ctx", "-3")
    assert r.returncode == 2 and "ctx=-3" in r.stderr


def test_max_tokens_limits_the_answer(built_bundle):
    r = run_exe(built_bundle, "-p", "Write a long story about a dragon.", "--temp", "0", "-n", "5")
    assert r.returncode == 0
    assert 0 < len(r.stdout.split()) <= 6


def test_llama_cpp_sampling_flags(built_bundle):
    story = "Write a short story about a cat."
    greedy = run_exe(built_bundle, "-p", story, "--temp", "0", "-n", "12")
    assert greedy.returncode == 0 and greedy.stdout.strip()
    # min-p 1 keeps only the likeliest token: greedy at any temperature; the same from BUNDLE_MIN_P
    hot = run_exe(built_bundle, "-p", story, "--temp", "1.5", "--min-p", "1", "--seed", "3", "-n", "12")
    assert hot.returncode == 0 and hot.stdout == greedy.stdout
    env = dict(os.environ, BUNDLE_MIN_P="1")
    assert run_exe(built_bundle, "-p", story, "--temp", "1.5", "--seed", "3", "-n", "12", env=env).stdout == greedy.stdout
    # without min-p, the same seed and order through --samplers, the text changes
    free = run_exe(built_bundle, "-p", story, "--temp", "1.5", "--seed", "3", "-n", "12", "--samplers", "top_k;temperature")
    assert free.returncode == 0 and free.stdout != greedy.stdout
    short = run_exe(built_bundle, "-p", QUESTION, "--temp", "0", "-n", "40")
    long = run_exe(built_bundle, "-p", QUESTION, "--temp", "0", "-n", "40", "--ignore-eos")
    assert long.returncode == 0 and long.stdout.startswith(short.stdout.strip()) and len(long.stdout) > len(short.stdout)
    for flags, words in ((["--samplers", "top_k;bogus"], "'bogus' is not a sampler"), (["--min-p", "2"], "min_p=2"),
                         (["--dry-base", "0.5"], "dry_base=0.5")):
        r = run_exe(built_bundle, "-p", "hi", *flags)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_info_json(built_bundle):
    r = run_exe(built_bundle, "--info", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["backend"]["name"] == "CPU"
    assert d["backend"]["cpu_variant"] in {
        "x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
        "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids"}
    assert d["threads"] >= 1 and d["context"] == 4096
    assert d["model"]["quantization"] == "Q4_1"
    assert d["hardware"]["physical_cores"] >= 1
    assert d["stub"]["glibc_min"]
    r = run_exe(built_bundle, "--info")
    assert r.returncode == 0 and "back end:" in r.stdout


def test_settings_precedence(model, tmp_path):
    """defaults < manifest < BUNDLE_* environment < flags"""
    out = tmp_path / "b"
    assert run_bundle_cmd("build", model, "-o", out, "--temp", "0.3", "--top-k", "7", "--ctx", "1024",
                          "--context-overflow", "error").returncode == 0
    env = dict(os.environ, BUNDLE_TOP_K="9", BUNDLE_CTX="2048")
    d = json.loads(run_exe(out, "--info", "--json", "--ctx", "512", env=env).stdout)
    s = d["settings"]
    assert s["temp"] == 0.3  # manifest over default
    assert s["top_k"] == 9  # environment over manifest
    assert s["ctx"] == 512  # flag over environment
    assert s["top_p"] == 0.95  # built-in default
    assert s["context_overflow"] == "error" and s["min_p"] == 0.05
    s = json.loads(run_exe(out, "--info", "--json", "--context-overflow", "truncate", env=dict(
        os.environ, BUNDLE_MIN_P="0.2")).stdout)["settings"]
    assert s["context_overflow"] == "truncate" and s["min_p"] == 0.2
    r = run_exe(out, "--info", env=dict(os.environ, BUNDLE_TEMP="hot"))
    assert r.returncode == 2 and "BUNDLE_" in r.stderr and "not a number" in r.stderr


def test_forced_cpu_variant(built_bundle):
    env = dict(os.environ, BUNDLE_CPU_VARIANT="x64")
    d = json.loads(run_exe(built_bundle, "--info", "--json", env=env).stdout)
    assert d["backend"]["cpu_variant"] == "x64"
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0", env=env)
    assert "Paris" in r.stdout
    r = run_exe(built_bundle, "--info", env=dict(os.environ, BUNDLE_CPU_VARIANT="z80"))
    assert r.returncode == 1 and "no CPU variant 'z80'" in r.stderr


def cache_files(root: Path):
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_model_is_mapped_from_the_executable_never_copied(built_bundle, isolated_user_dirs, tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([str(built_bundle), "--cli"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        # wait for the chat prompt: the model is loaded by then
        deadline = time.time() + 60
        seen = ""
        while "Type a message" not in seen and time.time() < deadline:
            seen += proc.stdout.readline()
        assert "Type a message" in seen
        # the Python process is the bootloader's child (PyInstaller one-file)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        pids = [proc.pid] + [int(c) for c in children]
        model_size = 98_000_000
        mapped = []
        for pid in pids:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 6 and parts[5] == str(built_bundle):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    mapped.append(hi - lo)
        assert max(mapped) > 90_000_000, mapped  # the model, mapped straight from the bundle
        big = [p for p in cache_files(isolated_user_dirs) + cache_files(tmpdir) if p.stat().st_size > model_size // 2]
        assert big == [], big  # no copy of the model anywhere
    finally:
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)


def test_two_cold_launches_at_once_share_one_extraction(built_bundle, isolated_user_dirs):
    cache = isolated_user_dirs / "cache" / "bundle"
    assert not cache.exists()
    procs = [subprocess.Popen([str(built_bundle), "-p", QUESTION, "--temp", "0"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Paris" in out
    native = cache / "native"
    folders = [p for p in native.iterdir() if p.is_dir()]
    assert len(folders) == 1, folders  # one extraction, no work folders left
    assert (folders[0] / ".complete").exists()
    mtime = folders[0].stat().st_mtime_ns
    assert run_exe(built_bundle, "-p", QUESTION, "--temp", "0").returncode == 0
    assert folders[0].stat().st_mtime_ns == mtime  # not extracted again


def test_killed_extraction_leaves_nothing_that_looks_complete(built_bundle, isolated_user_dirs):
    """A work folder from a launch killed mid-extraction is removed by the next launch."""
    from runtime.bundlefile import read_payload

    sha = read_payload(str(built_bundle)).entries["native/cpu.tar.zst"].digest.split(":")[1]
    native = isolated_user_dirs / "cache" / "bundle" / "native"
    stale = native / f".work-{sha[:24]}-99999"
    stale.mkdir(parents=True)
    (stale / "libggml.so.0").write_bytes(b"half")
    r = run_exe(built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout
    assert sorted(p.name for p in native.iterdir() if p.is_dir()) == [sha[:24]]


def test_killed_bundles_temp_folders_are_swept(built_bundle, tmp_path):
    """PyInstaller's _MEI folder of a SIGKILLed bundle is removed by the next launch."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir))
    proc = subprocess.Popen([str(built_bundle), "--cli"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    proc.stdout.readline()  # banner: the runtime is up
    children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    for pid in children + [proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    left = [p.name for p in tmpdir.iterdir() if p.name.startswith("_MEI")]
    assert len(left) == 1  # what one-file tools leave behind
    r = run_exe(built_bundle, "--info", env=env)
    assert r.returncode == 0
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("_MEI")] == []


def test_truncated_bundle_says_copy_again(bundle_copy):
    size = bundle_copy.stat().st_size
    for keep in (size - 1000, size // 2):
        with open(bundle_copy, "r+b") as f:
            f.truncate(keep)
        r = run_exe(bundle_copy, "-p", QUESTION)
        assert r.returncode == 1
        assert f"this file is incomplete: {keep} of {size} bytes" in r.stderr
        assert "copy it again" in r.stderr and "Traceback" not in r.stderr
        assert r.stdout == ""


def test_corrupted_model_is_named(bundle_copy):
    from runtime.bundlefile import read_payload

    p = read_payload(str(bundle_copy))
    at = p.absolute_offset("model.gguf")
    with open(bundle_copy, "r+b") as f:
        f.seek(at + 24)  # inside the GGUF header's key/value table
        f.write(b"\xff" * 16)
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1
    assert "model.gguf (the model): damaged" in r.stderr and "copy the file again" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_exe(bundle_copy, "--verify")
    assert r.returncode == 1 and "damaged: model.gguf" in r.stderr


def test_corrupted_table_of_contents(bundle_copy):
    from runtime.bundlefile import HEADER_SIZE, read_payload

    p = read_payload(str(bundle_copy))
    with open(bundle_copy, "r+b") as f:
        f.seek(p.payload_start + p.payload_size - HEADER_SIZE - 40)
        f.write(b"~~~~")
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1 and "table of contents is damaged" in r.stderr and "Traceback" not in r.stderr


def test_corrupted_native_libraries(bundle_copy):
    from runtime.bundlefile import read_payload

    p = read_payload(str(bundle_copy))
    with open(bundle_copy, "r+b") as f:
        f.seek(p.absolute_offset("native/cpu.tar.zst") + 100_000)
        f.write(b"\x00" * 64)
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1 and "the runtime libraries" in r.stderr and "damaged" in r.stderr


def test_verify_flag_on_intact_bundle(built_bundle):
    r = run_exe(built_bundle, "--verify")
    assert r.returncode == 0 and "intact" in r.stdout


def test_newer_format_refused_by_the_runtime(bundle_copy):
    import struct

    from runtime.bundlefile import FORMAT_VERSION, HEADER_SIZE, read_payload

    p = read_payload(str(bundle_copy))
    with open(bundle_copy, "r+b") as f:
        f.seek(p.payload_start + p.payload_size - HEADER_SIZE + 8)
        f.write(struct.pack("<I", FORMAT_VERSION + 1))
    r = run_exe(bundle_copy, "-p", QUESTION)
    assert r.returncode == 1 and "newer than this program understands" in r.stderr


def test_archive_tail_layout_runs(model, stub, tmp_path):
    """The layout used past 4 GiB (archive copied to the end) launches like the usual one."""
    from bundler.stubs import find_stub
    from bundler.writer import write_bundle

    out = tmp_path / "big-layout"
    write_bundle(model, find_stub(), out, {"name": "x", "settings": {}}, tail_mode="archive")
    r = run_exe(out, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr


def test_bench_flag(built_bundle):
    r = run_exe(built_bundle, "--bench", "--json", env=dict(os.environ, BUNDLE_BENCH_REPS="1"))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["decode_tps"] > 0 and d["prompt_tps"] > 0 and d["model"]
