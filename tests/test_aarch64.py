"""Issue 24: the linux-aarch64 bundle, built on this x86-64 machine (make stub-aarch64) and run as
on a Raspberry Pi or a Graviton server: under Debian's qemu-user in an arm64 Debian 11 userland
(glibc 2.31) made by debootstrap's first stage and cached under ~/.cache/bundle/test-rootfs,
with qemu registered in the binfmt_misc of a private user namespace (buildsys/qemu.py; the
machine's own binfmt_misc is never touched). QEMU_CPU picks the processor the bundle sees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from attack import flip
from buildsys import qemu
from conftest import QUESTION, ROOT, run_bundle_cmd, run_exe

pytestmark = pytest.mark.aarch64

ARM_STUB = ROOT / "stubs" / "linux-aarch64"
ANSWER = "Paris"
GLIBC_FLOOR = (2, 17)
GLIBC_OWN = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-aarch64.so.1",
             "libutil.so.1", "libresolv.so.2"}
# ggml's ARM variants (ggml/src/CMakeLists.txt) and the features each needs; the score is
# ggml's (cpu-feats.cpp): the best variant is the eligible one with the most weight.
VARIANTS = {"armv8.0_1": (), "armv8.2_1": ("dotprod",), "armv8.2_2": ("dotprod", "fp16"),
            "armv8.2_3": ("dotprod", "fp16", "sve"), "armv8.6_1": ("dotprod", "fp16", "sve", "i8mm"),
            "armv8.6_2": ("dotprod", "fp16", "sve", "i8mm", "sve2"),
            "armv9.2_1": ("dotprod", "fp16", "sve", "i8mm", "sme"),
            "armv9.2_2": ("dotprod", "fp16", "sve", "i8mm", "sve2", "sme")}
WEIGHT = {"dotprod": 2, "fp16": 4, "sve": 8, "i8mm": 16, "sve2": 32, "sme": 64}


def best_variant(features) -> str:
    ok = [v for v, needs in VARIANTS.items() if set(needs) <= set(features)]
    return max(ok, key=lambda v: sum(WEIGHT[f] for f in VARIANTS[v]))


@pytest.fixture(scope="session")
def arm_stub() -> Path:
    if not (ARM_STUB / "bundle-runtime").exists():
        pytest.fail("the aarch64 stub is missing: run `make stub-aarch64` (python build.py --target linux-aarch64)")
    return ARM_STUB


@pytest.fixture(scope="session")
def arm_bundle(tmp_path_factory, model, arm_stub) -> Path:
    """The demo bundle for aarch64, built as a user would: `bundle build --target linux-aarch64`
    with no -o (so its name says its machine)."""
    where = tmp_path_factory.mktemp("arm")
    os.chmod(where, 0o755)
    r = run_bundle_cmd("build", model, "--target", "linux-aarch64", cwd=where)
    assert r.returncode == 0, r.stderr
    out = where / "dist" / "SmolLM2-135M-Instruct-aarch64"
    assert out.exists(), r.stderr
    assert re.search(r"wrote dist/SmolLM2-135M-Instruct-aarch64 \(.*, linux-aarch64, needs glibc ≥ 2\.17\)", r.stderr), \
        r.stderr
    assert "run it on Linux aarch64: ./dist/SmolLM2-135M-Instruct-aarch64" in r.stderr, r.stderr
    assert "Vulkan back end: carried" in r.stderr, r.stderr  # ARM GPUs through Mesa's drivers
    return out


def run_arm(root: Path, bundle: Path, *args, cpu: str = "cortex-a76", timeout: int = 600, **kw):
    """The bundle run under qemu with that CPU, chrooted in the arm64 userland (the bundle's
    folder seen at its own path), with a clean environment as a login there would have."""
    return qemu.run(root, [str(bundle), *map(str, args)], binds=[bundle.parent], env={"QEMU_CPU": cpu, "TERM": "dumb"},
                    capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def test_p_answers(arm_root, arm_bundle):
    assert "ELF 64-bit LSB" in subprocess.run(["file", str(arm_bundle)], capture_output=True, text=True).stdout
    r = run_arm(arm_root, arm_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert ANSWER in r.stdout, r.stdout


@pytest.mark.parametrize("cpu,expected", [("cortex-a53", "armv8.0_1"), ("cortex-a76", "armv8.2_2"),
                                          ("neoverse-n1", "armv8.2_2"), ("max", "armv9.2_2")])
def test_info_names_the_variant_ggml_chose_for_each_cpu(arm_root, arm_bundle, cpu, expected):
    r = run_arm(arm_root, arm_bundle, "--info", "--json", cpu=cpu)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout)
    features = info["hardware"]["cpu_features"]
    assert info["hardware"]["machine"] == "aarch64" and "asimd" in features, info["hardware"]
    assert info["stub"]["target"] == "linux-aarch64"
    # the right one: what ggml's own scoring picks for the features the kernel (qemu) reports,
    # and what that processor is known to have
    assert info["backend"]["cpu_variant"] == best_variant(features) == expected, (cpu, features, info["backend"])
    text = run_arm(arm_root, arm_bundle, "--info", cpu=cpu)
    assert text.returncode == 0, text.stderr[-2000:]
    assert f"CPU ({expected})" in text.stdout and "target:      linux-aarch64" in text.stdout, text.stdout
    assert "cpu features: " + " ".join(features) in text.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_the_openai_client(arm_root, arm_bundle):
    from openai import OpenAI

    port = _free_port()
    cmd = qemu.command(arm_root, [str(arm_bundle), "--server", "--port", str(port)], binds=[arm_bundle.parent],
                       env={"QEMU_CPU": "cortex-a76"})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.5)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=300)
        reply = client.chat.completions.create(model="any", temperature=0, max_tokens=24,
                                               messages=[{"role": "user", "content": QUESTION}])
        assert ANSWER in reply.choices[0].message.content, reply
        assert reply.usage.completion_tokens > 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _damaged_pair(src: Path, folder: Path, name: str, damage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    dest = folder / name
    shutil.copy2(src, dest)
    damage(dest)
    return dest


def _error_lines(stderr: str, path: Path) -> list[str]:
    return [line.replace(str(path), "BUNDLE") for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("how", ["cut", "flip"])
def test_damage_gives_the_messages_of_the_x86_bundle(arm_root, arm_bundle, built_bundle, tmp_path, how):
    """A cut copy and a flipped model byte: the same one-line message and exit status as the
    x86-64 bundle given the same damage (the names aside)."""
    from runtime.bundlefile import read_payload

    def damage(path: Path):
        if how == "cut":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size - 1000)
        else:
            p = read_payload(str(path))
            flip(path, p.absolute_offset("model.gguf") + p.entries["model.gguf"].size - 1_000_000)

    arm = _damaged_pair(arm_bundle, tmp_path / "arm", "model", damage)
    x86 = _damaged_pair(built_bundle, tmp_path / "x86", "model", damage)
    ra = run_arm(arm_root, arm, "-p", QUESTION, "--temp", "0")
    rx = run_exe(x86, "-p", QUESTION, "--temp", "0")
    assert ra.returncode == rx.returncode == 1, (ra.stderr, rx.stderr)
    assert ra.stdout == rx.stdout == ""
    arm_lines, x86_lines = _error_lines(ra.stderr, arm), _error_lines(rx.stderr, x86)
    assert len(arm_lines) == 1 and "Traceback" not in ra.stderr, ra.stderr
    # the stubs' sizes differ, so do the sizes and offsets: compare the words (and the hashes)
    arm_lines = [re.sub(r"\b\d+\b", "N", x) for x in arm_lines]
    x86_lines = [re.sub(r"\b\d+\b", "N", x) for x in x86_lines]
    assert arm_lines == x86_lines, (ra.stderr, rx.stderr)


REMOVED = ["libz.so.1", "libstdc++.so.6", "libgcc_s.so.1"]


def test_userland_without_zlib_libstdcxx_libgcc_answers(arm_root, arm_bundle):
    moved = []
    try:
        folders = {(arm_root / f).resolve() for f in ("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu")}
        victims = sorted({p for folder in folders for name in REMOVED for p in folder.glob(name + "*")
                          if not p.name.endswith(".hidden-by-test")})
        for p in victims:
            hidden = p.with_name(p.name + ".hidden-by-test")
            os.rename(p, hidden)
            moved.append((hidden, p))
        assert {name for name in REMOVED if any(name in str(p) for _, p in moved)} == set(REMOVED), moved
        r = run_arm(arm_root, arm_bundle, "-p", QUESTION, "--temp", "0", cpu="cortex-a53")
        assert r.returncode == 0, r.stderr[-2000:]
        assert ANSWER in r.stdout, r.stdout
    finally:
        for hidden, p in moved:
            os.rename(hidden, p)


def test_every_elf_file_is_aarch64_and_needs_glibc_217_and_nothing_else(tmp_path, arm_stub):
    """... the Vulkan loader aside: it comes with every GPU driver, and is looked for before the
    back end is loaded."""
    from test_portable import elf_files_of_stub

    files = elf_files_of_stub(arm_stub, tmp_path, ("native-cpu.tar.zst", "native-vulkan.tar.zst"))
    assert any(p.name == "libggml-vulkan.so" for p in files)
    names = {p.name for p in files} | {p.name[len("archive_"):] for p in files}
    names |= {"libggml.so", "libggml-base.so", "libllama.so", "libpython3.11.so.1.0"}
    assert len(files) > 15, [p.name for p in files]
    assert sum(p.name.startswith("libggml-cpu-armv") for p in files) == len(VARIANTS)
    problems = []
    for p in files:
        out = subprocess.run(["readelf", "-h", "-V", "-d", "-W", str(p)], capture_output=True, text=True,
                             check=True).stdout
        machine = re.search(r"Machine:\s+(.+)", out).group(1).strip()
        if machine != "AArch64":
            problems.append(f"{p.name}: {machine}")
        for major, minor in set(re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out)):
            if (int(major), int(minor)) > GLIBC_FLOOR:
                problems.append(f"{p.name}: GLIBC_{major}.{minor}")
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out):
            if lib not in GLIBC_OWN and lib not in names and not (p.name == "libggml-vulkan.so" and lib == "libvulkan.so.1"):
                problems.append(f"{p.name}: needs {lib}")
    assert not problems, problems


@pytest.mark.parametrize("case", ["no loader", "a loader and no driver"])
def test_vulkan_falls_back_to_the_cpu_with_the_reason(arm_root, arm_bundle, case):
    """The aarch64 bundle carries ggml's Vulkan back end; with no Vulkan loader (a minimal
    system) or a loader and no GPU driver, the same probe as on x86-64 says why and the CPU
    answers. (A real ARM GPU cannot be reached here: see the README.)"""
    libdir = arm_root / qemu.LIBDIR
    added = []
    try:
        if case == "a loader and no driver":  # Debian's libvulkan1 for arm64, from the build's userland
            from buildsys.stub import cache_dir

            for lib in (qemu.build_userland(cache_dir()) / qemu.LIBDIR).glob("libvulkan.so.1*"):
                shutil.copy2(lib, libdir / lib.name, follow_symlinks=False)
                added.append(libdir / lib.name)
            assert added
        r = run_arm(arm_root, arm_bundle, "--info", "--json", cpu="cortex-a76")
        assert r.returncode == 0, r.stderr[-2000:]
        b = json.loads(r.stdout)["backend"]
        reason = "no Vulkan driver on this machine" if case == "no loader" else "finds no GPU driver"
        assert b["name"] == "CPU" and reason in b["cpu_reason"] and reason in b["skipped"]["vulkan"], b
        r = run_arm(arm_root, arm_bundle, "-p", QUESTION, "--temp", "0", cpu="cortex-a76")
        assert r.returncode == 0 and ANSWER in r.stdout, r.stderr[-2000:]
    finally:
        for p in added:
            p.unlink()


def test_inspect_says_the_target(arm_bundle):
    r = run_bundle_cmd("inspect", arm_bundle)
    assert r.returncode == 0, r.stderr
    assert "linux-aarch64" in r.stdout


def test_the_x86_stub_is_refused_for_aarch64(model, tmp_path, arm_stub):
    r = run_bundle_cmd("build", model, "--target", "linux-aarch64", "--stub", ROOT / "stubs" / "linux-x86_64" / "bundle-runtime",
                       "-o", tmp_path / "m")
    assert r.returncode == 1
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "linux-x86_64" in lines[0] and "build.py --target linux-aarch64" in lines[0], r.stderr
    assert not (tmp_path / "m").exists()
