"""The universal file (`bundle build --target universal` -> model.exe): one file that Windows runs
as a program and a Linux shell runs as a script, which unpacks the runtime for its machine into
the cache once and runs it on the file (the model is mapped from the file, never copied).

Everything is the real thing: the three stubs built by build.py, the real `bundle build`, the
file run by bash, dash, busybox sh and zsh (Debian's), by wine in a prefix of its own, and by
qemu-user as aarch64 in the arm64 userland of test_aarch64.py; the official openai client on
this side of loopback.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import blake3
import pytest

from buildsys import qemu
from conftest import QUESTION, ROOT, run_bundle_cmd
from runtime.bundlefile import read_payload

pytestmark = [pytest.mark.universal]
STUBS = Path(os.environ.get("BUNDLE_STUBS_DIR") or ROOT / "stubs")
NEEDED = {"windows-x86_64": "bundle-runtime.exe", "linux-x86_64": "bundle-runtime", "linux-aarch64": "bundle-runtime"}
FOLDER = "USB stick"  # a space in the path: the launcher quotes what it must
NAME = "SmolLM2 démo"
SHELLS = {"bash": ["bash"], "dash": ["dash"], "busybox sh": ["busybox", "sh"], "zsh": ["zsh"]}
ASK = ["-p", QUESTION, "--temp", "0", "-n", "8"]


@pytest.fixture(scope="session")
def uni(tmp_path_factory, model) -> Path:
    """The demo model's universal file, built as a user would, with every stub built."""
    missing = [t for t, exe in NEEDED.items() if not (STUBS / t / exe).is_file()]
    if missing:
        pytest.fail(f"stubs missing for {', '.join(missing)}: run `make stub stub-windows stub-aarch64`")
    for shell in ("zsh", "busybox"):
        if not shutil.which(shell):
            pytest.fail(f"{shell} is missing: run `make buildtools-universal` (Debian's zsh and busybox)")
    where = tmp_path_factory.mktemp("uni") / FOLDER
    where.mkdir()
    os.chmod(where.parent, 0o755)
    os.chmod(where, 0o755)
    r = run_bundle_cmd("build", model, "--target", "universal", "-o", where / NAME)
    assert r.returncode == 0, r.stderr
    out = where / (NAME + ".exe")
    assert out.is_file(), r.stderr
    assert "universal: runs on Windows x86-64, Linux x86-64 and Linux aarch64" in r.stderr, r.stderr
    assert "on Linux, from a shell:" in r.stderr, r.stderr
    return out


def _cache(tmp_path: Path) -> dict:
    return {**os.environ, "BUNDLE_CACHE_DIR": str(tmp_path / "cache")}


def _sh(shell: list[str], how: str, exe: Path, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """exe run from shell as `./NAME args` (the shell runs it as a script when the kernel says
    ENOEXEC) or as `SHELL ./NAME args`."""
    quoted = " ".join("'" + a.replace("'", "'\\''") + "'" for a in map(str, args))
    if how == "./file":
        argv = [*shell, "-c", f"./'{exe.name}' {quoted}"]
    else:
        argv = [*shell, f"./{exe.name}", *map(str, args)]
    return subprocess.run(argv, cwd=exe.parent, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _payload(path: Path):
    return read_payload(str(path))


# -- what is in it ---------------------------------------------------------------------------------


def test_size_is_the_model_and_the_stubs_and_at_most_1_mib_more(uni, model):
    parts = sum((STUBS / t / exe).stat().st_size + (STUBS / t / "native-cpu.tar.zst").stat().st_size
                for t, exe in NEEDED.items())
    parts += sum(p.stat().st_size for p in STUBS.glob("*/native-vulkan.tar.zst"))
    overhead = uni.stat().st_size - parts - model.stat().st_size
    assert 0 < overhead <= 1 << 20, overhead


def test_inspect_and_verify_read_the_universal_layout(uni, tmp_path):
    r = run_bundle_cmd("inspect", "--json", uni)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["runs_on"] == ["windows-x86_64", "linux-x86_64", "linux-aarch64"]
    names = {e["name"] for e in d["entries"]}
    for t in ("linux-x86_64", "linux-aarch64"):
        assert {f"{t}/runtime", f"{t}/native/cpu.tar.zst", f"{t}/native/vulkan.tar.zst"} <= names, names
        # stored as built, but for its archive's magic (written back by the launcher: a Windows
        # bootloader scanning a cut copy must not find this archive)
        runtime = next(e for e in d["entries"] if e["name"] == f"{t}/runtime")
        stub = (STUBS / t / "bundle-runtime").read_bytes()
        stored = read_payload(str(uni)).read_entry(f"{t}/runtime")
        assert len(stored) == len(stub) and blake3.blake3(stored).hexdigest() == runtime["blake3"]
        at = stub.rindex(b"MEI\014\013\012\013\016")
        assert stored == stub[:at] + bytes(8) + stub[at + 8:]
    assert sum(n == "model.gguf" for n in names) == 1  # the model once
    text = run_bundle_cmd("inspect", uni).stdout
    assert "runs on:     Windows x86-64, Linux x86-64 and Linux aarch64" in text, text
    assert run_bundle_cmd("verify", uni).returncode == 0
    r = _sh(["sh"], "sh ./file", uni, "--verify", env=_cache(tmp_path))
    assert r.returncode == 0, r.stderr


def test_a_direct_execve_is_refused_by_the_kernel(uni):
    """The documented limit: no shell, no script (file managers, subprocess, systemd)."""
    with pytest.raises(OSError) as exc:
        subprocess.run([str(uni), "--help"], capture_output=True, timeout=30)
    assert exc.value.errno == 8  # ENOEXEC: "Exec format error"


# -- Linux x86-64, from every shell ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["./file", "sh ./file"])
@pytest.mark.parametrize("shell", list(SHELLS))
def test_linux_shells_answer(uni, tmp_path, shell, how):
    r = _sh(SHELLS[shell], how, uni, *ASK, env=_cache(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout, r.stdout
    runtimes = list((tmp_path / "cache" / "runtimes").iterdir())
    expected = hashlib.sha256((STUBS / "linux-x86_64" / "bundle-runtime").read_bytes()).hexdigest()
    assert [p.name for p in runtimes] == [expected]


def test_info_names_this_runtime_and_every_machine_the_file_runs_on(uni, tmp_path):
    r = _sh(["sh"], "sh ./file", uni, "--info", "--json", env=_cache(tmp_path))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["stub"]["target"] == "linux-x86_64"
    assert info["runs_on"] == ["windows-x86_64", "linux-x86_64", "linux-aarch64"]
    assert info["bundle"] == str(uni)  # the file itself, not the runtime in the cache
    assert "linux-x86_64/runtime" not in info["entries"] and "runtime" in info["entries"]
    r = _sh(["sh"], "sh ./file", uni, "--info", env=_cache(tmp_path))
    assert "target:      linux-x86_64 (this file runs on windows-x86_64, linux-x86_64, linux-aarch64)" in r.stdout


def test_the_model_is_mapped_from_the_file_not_copied(uni, tmp_path):
    """Nothing model-sized lands in the cache: the runtime there is ~10 MiB, the libraries are
    the libraries, and the running server maps the universal file itself."""
    env = _cache(tmp_path)
    port = _free_port()
    proc = subprocess.Popen(["sh", str(uni), "--server", "--port", str(port), "--no-browser"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        _wait_health(port, proc)
        # sh exec'd the runtime: the bootloader, whose child runs Python and llama.cpp
        pids = [proc.pid] + Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in pids)
        assert str(uni) in maps, "the universal file is not mapped"
        model_size = _payload(uni).entries["model.gguf"].size
        big = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.stat().st_size >= model_size // 2]
        assert big == [], big
        _ask_openai(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_home_unset_uses_a_private_temp_cache(uni, tmp_path):
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {"PATH": os.environ["PATH"], "TMPDIR": str(temp)}
    r = _sh(["sh"], "sh ./file", uni, *ASK, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    folder = temp / f"bundle-cache-{os.getuid()}"
    assert folder.stat().st_mode & 0o777 == 0o700
    assert len(list((folder / "runtimes").iterdir())) == 1


def _in_namespace(script: str, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", "set -e; " + script], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("how", ["read-only", "noexec"])
def test_an_unusable_cache_is_passed_over(uni, tmp_path, how):
    """The usual cache (~/.cache/bundle) on a read-only or a noexec filesystem: the runtime goes
    to the private temp cache instead and answers; nothing is left in the unusable one."""
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root here (CI runs as root)")
    xdg, temp = tmp_path / "xdg", tmp_path / "temp"
    xdg.mkdir()
    temp.mkdir()
    mount = (f"mount --bind {xdg} {xdg}; mount -o remount,bind,ro {xdg}; " if how == "read-only"
             else f"mount -t tmpfs -o noexec tmpfs {xdg}; ")
    env = f"env -i PATH=/usr/bin:/bin HOME={xdg} TMPDIR={temp}"
    r = _in_namespace(mount + f"cd '{uni.parent}'; {env} sh './{uni.name}' " + " ".join(f"'{a}'" for a in ASK)
                      + f"; find {xdg} -type f | wc -l")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "0"  # nothing left where it could not run
    assert len(list((temp / f"bundle-cache-{os.getuid()}" / "runtimes").iterdir())) == 1


def test_a_noexec_bundle_cache_dir_is_one_line(uni, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root here (CI runs as root)")
    cache = tmp_path / "c"
    cache.mkdir()
    r = _in_namespace(f"mount -t tmpfs -o noexec tmpfs {cache}; cd '{uni.parent}'; "
                      f"BUNDLE_CACHE_DIR={cache} sh './{uni.name}' -p hi || echo rc=$?")
    assert r.stdout.strip() == "rc=1", r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: BUNDLE_CACHE_DIR={cache} cannot hold the runtime")


def test_eight_first_launches_at_once_leave_one_runtime(uni, tmp_path):
    env = _cache(tmp_path)
    procs = [subprocess.Popen(["sh", str(uni), "--info", "--json"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True) for _ in range(8)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-2000:]
        assert json.loads(out)["stub"]["target"] == "linux-x86_64"
    left = sorted(p.name for p in (tmp_path / "cache" / "runtimes").iterdir())
    assert len(left) == 1 and not left[0].startswith("."), left  # no temp file left over


def test_another_machine_gets_one_line_naming_those_it_runs_on(uni, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    for system, machine in (("Linux", "riscv64"), ("FreeBSD", "amd64")):
        (fake / "uname").write_text(f"#!/bin/sh\ncase $1 in -s) echo {system};; -m) echo {machine};; esac\n")
        (fake / "uname").chmod(0o755)
        env = {**_cache(tmp_path), "PATH": f"{fake}:{os.environ['PATH']}"}
        r = _sh(["sh"], "sh ./file", uni, "-p", "hi", env=env)
        assert r.returncode == 1
        assert r.stderr.strip() == ("error: this file runs on Windows x86-64, Linux x86-64 and Linux aarch64, "
                                    f"not on {system} {machine}"), r.stderr
        assert not (tmp_path / "cache").exists()


# -- damage ------------------------------------------------------------------------------------------


def _copy(uni: Path, folder: Path, name: str = "copy.exe") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / name
    shutil.copyfile(uni, dest)
    dest.chmod(0o755)
    return dest


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _no_numbers(line: str, path: Path) -> str:
    return re.sub(r"\d+", "N", line.replace(str(path), "PATH"))


def test_a_cut_copy_is_named_by_the_shell_part_as_the_runtime_names_it(uni, tmp_path, wine):
    cut = _copy(uni, tmp_path / "cut")
    size = uni.stat().st_size
    os.truncate(cut, size // 2)
    r = _sh(["sh"], "sh ./file", cut, "-p", "hi", env=_cache(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip() == f"error: this file is incomplete: {size // 2} of {size} bytes ({cut}); copy it again"
    w = wine.run(cut, "-p", "hi")
    assert w.returncode == 1
    line = next(x for x in w.stderr.splitlines() if "incomplete" in x)
    assert _no_numbers(line, Path("x")).startswith("error: this file is incomplete: N of N bytes"), line


@pytest.mark.parametrize("target", ["linux-x86_64", "linux-aarch64"])
def test_a_damaged_linux_runtime_is_refused_before_it_runs(uni, tmp_path, arm_root, target):
    bad = _copy(uni, tmp_path / "bad")
    entry = _payload(uni).entries[f"{target}/runtime"]
    _flip(bad, _payload(uni).payload_start + entry.offset + entry.size // 2)
    r = run_bundle_cmd("verify", bad)
    assert r.returncode == 1 and f"{target}/runtime (the runtime program): damaged" in r.stderr, r.stderr
    if target == "linux-x86_64":
        r = _sh(["sh"], "sh ./file", bad, "-p", "hi", env=_cache(tmp_path))
    else:
        r = qemu.run(arm_root, ["sh", str(bad), "-p", "hi"], binds=[bad.parent],
                     env={"QEMU_CPU": "cortex-a76", "BUNDLE_CACHE_DIR": "/tmp/fresh-cache-for-damage"},
                     capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 1, r.stderr
    machine = {"linux-x86_64": "Linux x86-64", "linux-aarch64": "Linux aarch64"}[target]
    assert r.stderr.strip() == f"error: the runtime for {machine} in {bad} is damaged; copy the file again"


def test_a_runtime_already_in_the_cache_does_not_hide_damage_in_the_file(uni, tmp_path):
    """The runtime unpacked from an intact copy is used (it is the right one), and its first-launch
    check of the damaged file names the damaged part."""
    env = _cache(tmp_path)
    assert _sh(["sh"], "sh ./file", uni, "--info", env=env).returncode == 0
    bad = _copy(uni, tmp_path / "bad")
    entry = _payload(uni).entries["linux-x86_64/runtime"]
    _flip(bad, _payload(uni).payload_start + entry.offset + 4096)
    r = _sh(["sh"], "sh ./file", bad, "-p", "hi", env=env)
    assert r.returncode == 1
    assert "runtime (the runtime program): damaged" in r.stderr, r.stderr


def test_a_damaged_windows_runtime_is_refused_under_wine(uni, tmp_path, wine):
    bad = _copy(uni, tmp_path / "bad")
    # a byte of the PE's resources (the icon): the program still starts; its check finds it
    rsrc = _section_offset(uni.read_bytes(), b".rsrc")
    _flip(bad, rsrc + 0x400)
    r = run_bundle_cmd("verify", bad)
    assert r.returncode == 1 and "bootloader" in r.stderr, r.stderr
    w = wine.run(bad, "-p", "hi")
    assert w.returncode == 1
    assert "damaged" in w.stderr and "bootloader" in w.stderr, w.stderr[-2000:]
    # the Linux side checks the same bytes at its first launch
    r = _sh(["sh"], "sh ./file", bad, "-p", "hi", env=_cache(tmp_path))
    assert r.returncode == 1 and "bootloader" in r.stderr, r.stderr


def _section_offset(pe: bytes, name: bytes) -> int:
    import struct

    lfanew = struct.unpack_from("<I", pe, 0x3C)[0]
    n, opt = struct.unpack_from("<H", pe, lfanew + 6)[0], struct.unpack_from("<H", pe, lfanew + 20)[0]
    for i in range(n):
        at = lfanew + 24 + opt + 40 * i
        if pe[at:at + 8].rstrip(b"\0") == name:
            return struct.unpack_from("<I", pe, at + 20)[0]
    raise AssertionError(f"no {name} section")


# -- Windows (wine) and aarch64 (qemu) ----------------------------------------------------------------


def test_wine_answers_and_says_how_to_run_the_native_runtime(uni, wine):
    r = wine.run(uni, *ASK)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    assert f"running under wine on Linux; this file runs natively there (faster, and on the GPU): sh ./{uni.name}" \
        in r.stderr, r.stderr


def test_aarch64_under_qemu_answers(uni, arm_root):
    r = qemu.run(arm_root, ["sh", str(uni), *ASK], binds=[uni.parent], env={"QEMU_CPU": "cortex-a76"},
                 capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
    r = qemu.run(arm_root, ["sh", "-c", f"cd '{uni.parent}' && './{uni.name}' --info --json"], binds=[uni.parent],
                 env={"QEMU_CPU": "cortex-a76"}, capture_output=True, text=True, timeout=900,
                 stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["stub"]["target"] == "linux-aarch64" and info["backend"]["cpu_variant"] == "armv8.2_2", info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(port: int, proc) -> None:
    from wine import wait_for_http

    wait_for_http(f"http://127.0.0.1:{port}/health", proc)


def _ask_openai(port: int) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    reply = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content


def test_the_server_answers_the_openai_client_on_linux_and_under_wine(uni, tmp_path, wine):
    port = _free_port()
    proc = subprocess.Popen(["sh", str(uni), "--server", "--port", str(port), "--no-browser"], env=_cache(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        _wait_health(port, proc)
        _ask_openai(port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    proc, port = wine.serve(uni)
    try:
        _ask_openai(port)
    finally:
        proc.kill()
        proc.wait(timeout=60)


# -- signing, big models ---------------------------------------------------------------------------------


def test_a_signed_copy_verifies_and_runs_on_both_sides(uni, tmp_path, wine):
    if not shutil.which("osslsigncode") or not shutil.which("openssl"):
        pytest.fail("osslsigncode and openssl are needed: run `make buildtools-windows`")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=bundle test signer"], check=True, capture_output=True)
    signed = tmp_path / "signed" / uni.name
    signed.parent.mkdir()
    r = subprocess.run(["osslsigncode", "sign", "-certs", cert, "-key", key, "-n", "demo", "-in", uni,
                        "-out", signed], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    signed.chmod(0o755)
    r = subprocess.run(["osslsigncode", "verify", "-in", signed, "-CAfile", cert], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert run_bundle_cmd("verify", signed).returncode == 0
    r = _sh(["sh"], "./file", signed, *ASK, env=_cache(tmp_path))
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-2000:]
    r = wine.run(signed, *ASK)
    assert r.returncode == 0 and "Paris" in r.stdout, r.stderr[-2000:]


def test_a_model_over_4gib_goes_beside_the_file_and_linux_finds_it(model, tmp_path, uni):
    from bigmodel import make_big_model

    big = tmp_path / "big.gguf"
    assert make_big_model(big, model) > 4 << 30
    out = tmp_path / "dist" / "big"
    r = run_bundle_cmd("build", big, "--target", "universal", "-o", out)
    big.unlink()
    exe = out.with_name("big.exe")
    parts = sorted(exe.parent.glob("big-*-of-*.gguf"))
    try:
        assert r.returncode == 0, r.stderr
        assert "Windows runs no executable over 4 GiB" in r.stderr, r.stderr
        assert len(parts) == 2 and all(p.stat().st_size < 4 << 30 for p in [exe, *parts])
        r = _sh(["sh"], "sh ./file", exe, "-p", "Hi", "-n", "2", "--temp", "0", "--ctx", "256",
                env=_cache(tmp_path), timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
    finally:  # 4 GiB of real bytes: pytest keeps the last runs' folders
        for p in [exe, *parts]:
            p.unlink(missing_ok=True)


# -- the table of contents' new fields, checked like the rest ---------------------------------------


def test_each_runtime_sees_its_own_entries_under_the_plain_names(uni):
    payload = _payload(uni)
    for target in ("linux-x86_64", "linux-aarch64"):
        view = payload.for_runtime(target)
        assert sorted(view.entries) == ["model.gguf", "native/cpu.tar.zst", "native/vulkan.tar.zst", "runtime"]
        assert view.entries["native/cpu.tar.zst"].digest == payload.entries[f"{target}/native/cpu.tar.zst"].digest
        assert view.manifest.stub.target == target and view.regions == payload.regions
    assert payload.for_runtime("windows-x86_64") is payload  # the front runtime reads the file as it is


@pytest.mark.parametrize("runtimes, why", [
    ({"linux-riscv64": {"target": "linux-riscv64"}}, "is not a target a universal file carries"),
    ({"linux-aarch64": {"target": "linux-x86_64"}}, "differs from its key"),
    ({"linux-aarch64": []}, "expected"),
])
def test_a_forged_runtimes_record_is_refused(runtimes, why):
    from runtime.bundlefile import Manifest
    from runtime.bundlefile.fields import Invalid

    with pytest.raises(Invalid) as exc:
        Manifest.from_json({"runtimes": runtimes})
    assert why in str(exc.value)


def test_packed_adapters_apply_on_linux_from_the_universal_file(model, uni, tmp_path):
    """Adapters ride in the universal file like the model (mapped entries every runtime sees)."""
    from test_lora import POEM, make_lora

    out = tmp_path / "dist" / "poet"
    r = run_bundle_cmd("build", model, "--target", "universal", "--lora", make_lora(model, tmp_path / "poet.gguf"),
                       "-o", out)
    assert r.returncode == 0, r.stderr
    exe = out.with_name("poet.exe")
    env = _cache(tmp_path)
    poet = _sh(["sh"], "sh ./file", exe, *POEM, env=env)
    base = _sh(["sh"], "sh ./file", exe, *POEM, "--no-lora", env=env)
    plain = _sh(["sh"], "sh ./file", uni, *POEM, env=env)
    assert poet.returncode == base.returncode == plain.returncode == 0, poet.stderr + base.stderr
    assert poet.stdout != base.stdout and base.stdout == plain.stdout
