"""Issue 9: one bundle runs on every x86-64 Linux with glibc 2.17 or newer, needing nothing from
the system but the kernel and glibc, wherever /tmp and HOME are unusable, and travels on FAT32
sticks as parts.

The old-userland test runs the real demo bundle inside a Debian 11 (bullseye, glibc 2.31)
minimal root made by debootstrap (cached under ~/.cache/bundle/test-rootfs; `make buildtools`
installs debootstrap), with chroot and a clean environment.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import MODEL, QUESTION, STUB_DIR, run_bundle_cmd, run_exe

GLIBC_FLOOR = (2, 17)
GLIBC_OWN = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
             "libutil.so.1", "libresolv.so.2"}
ROOTFS = Path(os.environ.get("BUNDLE_TEST_ROOTFS") or Path.home() / ".cache" / "bundle" / "test-rootfs" /
              "bullseye-minbase")
ANSWER = "Paris"


def elf_files_of_stub(stub_dir: Path, into: Path, tars=("native-cpu.tar.zst",)) -> list[Path]:
    """Every ELF file a bundle brings: the stub, what PyInstaller put in its archive, and the
    native libraries of the payload (in those tars)."""
    from PyInstaller.archive.readers import CArchiveReader

    out = [stub_dir / "bundle-runtime"]
    reader = CArchiveReader(str(out[0]))
    for name in reader.toc:
        data = reader.extract(name)
        if data and data[:4] == b"\x7fELF":
            p = into / ("archive_" + name.replace("/", "_"))
            p.write_bytes(data)
            out.append(p)
    import zstandard

    for name in tars:
        with open(stub_dir / name, "rb") as f:
            raw = zstandard.ZstdDecompressor().stream_reader(f).read()
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    data = tar.extractfile(m).read()
                    if data[:4] == b"\x7fELF":
                        p = into / m.name
                        p.write_bytes(data)
                        out.append(p)
    return out


def test_every_elf_file_needs_glibc_217_and_nothing_else_from_the_system(tmp_path, stub):
    files = elf_files_of_stub(STUB_DIR, tmp_path)
    names = {p.name for p in files} | {p.name[len("archive_"):] for p in files}
    # the archive's and the tar's own names (libggml.so.0 is also reached as libggml.so)
    names |= {"libggml.so", "libggml-base.so", "libllama.so", "libpython3.11.so.1.0"}
    assert len(files) > 20, [p.name for p in files]
    problems = []
    for p in files:
        out = subprocess.run(["readelf", "-V", "-d", "-W", str(p)], capture_output=True, text=True, check=True).stdout
        for major, minor in set(re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out)):
            if (int(major), int(minor)) > GLIBC_FLOOR:
                problems.append(f"{p.name}: GLIBC_{major}.{minor}")
        for lib in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out):
            if lib not in GLIBC_OWN and lib not in names:
                problems.append(f"{p.name}: needs {lib}")
    assert not problems, problems
    meta = json.loads((STUB_DIR / "stub.json").read_text())
    assert tuple(int(x) for x in meta["glibc_min"].split(".")) <= GLIBC_FLOOR


# -- an old, minimal userland ---------------------------------------------------------------


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("chroot and mount namespaces need root (CI runs as root)")


@pytest.fixture(scope="session")
def bullseye() -> Path:
    """Debian 11's minimal userland (glibc 2.31), made once and kept."""
    _need_root()
    if (ROOTFS / ".complete").exists():
        return ROOTFS
    if not shutil.which("debootstrap"):
        pytest.fail("debootstrap is missing: run `make buildtools`")
    work = ROOTFS.with_name(ROOTFS.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["debootstrap", "--variant=minbase", "bullseye", str(work), "http://deb.debian.org/debian"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (work / ".complete").write_text("")
    if ROOTFS.exists():
        shutil.rmtree(ROOTFS)
    os.replace(work, ROOTFS)
    return ROOTFS


def _run_in_root(root: Path, bundle: Path, *args: str, timeout=300) -> subprocess.CompletedProcess:
    """The bundle run inside root (bind-mounted at /opt/b), in a private mount namespace, with a
    clean environment as a login there would have."""
    inner = "/opt/b/" + bundle.name
    script = (f"set -e; mkdir -p {root}/opt/b; mount --bind {bundle.parent} {root}/opt/b; "
              f"mount -t proc proc {root}/proc; mount --bind /dev {root}/dev; "
              f"exec chroot {root} /usr/bin/env -i HOME=/root PATH=/usr/bin:/bin TERM=dumb "
              f"{inner} " + " ".join(f"'{a}'" for a in args))
    return subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", script], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_bullseye_glibc_231_answers(bullseye, built_bundle):
    libc = next(bullseye.glob("lib/x86_64-linux-gnu/libc-2.*.so"), None)
    assert libc is not None and "2.31" in libc.name, list(bullseye.glob("lib/x86_64-linux-gnu/libc*"))
    r = _run_in_root(bullseye, built_bundle, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ANSWER in r.stdout, r.stdout


REMOVED = ["libz.so.1", "libstdc++.so.6", "libgcc_s.so.1", "libgomp.so.1", "libffi.so.7", "libssl.so.1.1",
           "libcrypto.so.1.1"]


def test_bullseye_without_zlib_libstdcxx_libgomp_answers(bullseye, built_bundle):
    moved = []
    try:
        folders = {(bullseye / f).resolve() for f in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")}
        victims = sorted({p for folder in folders for name in REMOVED for p in folder.glob(name + "*")
                          if not p.name.endswith(".hidden-by-test")})
        for p in victims:
            hidden = p.with_name(p.name + ".hidden-by-test")
            os.rename(p, hidden)
            moved.append((hidden, p))
        assert any("libz.so" in str(p) for _, p in moved) and any("libstdc++" in str(p) for _, p in moved)
        r = _run_in_root(bullseye, built_bundle, "-p", QUESTION, "--temp", "0")
        assert r.returncode == 0, r.stderr[-2000:]
        assert ANSWER in r.stdout, r.stdout
    finally:
        for hidden, p in moved:
            os.rename(hidden, p)


# -- unusable /tmp, TMPDIR, HOME, passwd ------------------------------------------------------


def _in_namespace(script: str, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--fork", "sh", "-c", "set -e; " + script], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _env_line(env: dict) -> str:
    return "env -i " + " ".join(f"{k}='{v}'" for k, v in env.items())


@pytest.fixture
def place(built_bundle, tmp_path):
    """A world-readable folder with a copy of the bundle, seen at /mnt inside the namespace (a
    tmpfs over /tmp there hides pytest's own folders)."""
    _need_root()
    os.chmod(tmp_path, 0o755)
    shutil.copy2(built_bundle, tmp_path / "bundle")
    for name in ("cwd", "userhome", "noexec", "temp"):
        (tmp_path / name).mkdir()
        (tmp_path / name).chmod(0o777)
    return tmp_path


MNT = "mount --bind {place} /mnt; "
NOEXEC_TMP = "mount -t tmpfs -o noexec tmpfs /tmp; "


def test_noexec_tmp_and_tmpdir(place):
    """/tmp and TMPDIR both on noexec filesystems: the runtime is unpacked where code can run,
    --info says where and why, nothing lands in the working directory."""
    env = {"HOME": "/mnt/userhome", "PATH": "/usr/bin:/bin", "TMPDIR": "/mnt/noexec"}
    run = f"{_env_line(env)} /mnt/bundle"
    r = _in_namespace(MNT.format(place=place) + NOEXEC_TMP + "mount -t tmpfs -o noexec tmpfs /mnt/noexec; "
                      f"cd /mnt/cwd; {run} -p '{QUESTION}' --temp 0; {run} --info --json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ANSWER in r.stdout
    info = json.loads(r.stdout[r.stdout.index("{"):])
    unpacked = info["unpacked_in"]
    assert unpacked["folder"] not in ("/tmp", "/mnt/noexec"), unpacked
    assert "noexec" in (unpacked["reason"] or ""), unpacked
    assert info["cache_dir"].startswith("/mnt/userhome/"), info["cache_dir"]
    assert list((place / "cwd").iterdir()) == []


def test_no_home_no_passwd_entry_noexec_tmp(place):
    """A uid with no passwd entry, HOME unset, /tmp noexec: still answers (the runtime finds a
    folder that can hold code: /var/tmp here), and writes nothing into the working directory."""
    uid = 54329
    assert subprocess.run(["getent", "passwd", str(uid)], capture_output=True).returncode != 0
    try:
        r = _in_namespace(MNT.format(place=place) + NOEXEC_TMP + "cd /mnt/cwd; "
                          f"setpriv --reuid={uid} --regid={uid} --clear-groups {_env_line({'PATH': '/usr/bin:/bin'})} "
                          f"/mnt/bundle -p '{QUESTION}' --temp 0")
        assert r.returncode == 0, r.stderr[-2000:]
        assert ANSWER in r.stdout
        assert list((place / "cwd").iterdir()) == []
    finally:
        shutil.rmtree(f"/var/tmp/bundle-cache-{uid}", ignore_errors=True)


def test_read_only_home(place):
    """HOME on a read-only filesystem: the cache goes to the temp folder instead; answers."""
    env = {"HOME": "/mnt/userhome", "PATH": "/usr/bin:/bin", "TMPDIR": "/mnt/temp"}
    run = f"{_env_line(env)} /mnt/bundle"
    r = _in_namespace(MNT.format(place=place) + "mount --bind /mnt/userhome /mnt/userhome; "
                      "mount -o remount,bind,ro /mnt/userhome; "
                      f"{run} -p '{QUESTION}' --temp 0; {run} --info --json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ANSWER in r.stdout
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["cache_dir"].startswith("/mnt/temp/"), info["cache_dir"]
    assert list((place / "userhome").iterdir()) == []


def test_no_home_at_all(place):
    """HOME unset and a passwd home that does not exist (nobody's /nonexistent)."""
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": "/mnt/temp"}
    r = _in_namespace(MNT.format(place=place) + "cd /mnt/cwd; setpriv --reuid=65534 --regid=65534 --clear-groups "
                      f"{_env_line(env)} /mnt/bundle -p '{QUESTION}' --temp 0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ANSWER in r.stdout
    assert list((place / "cwd").iterdir()) == []
    assert any(p.name.startswith("bundle-cache-") for p in (place / "temp").iterdir())


# -- FAT32: a model over 4 GiB as parts -----------------------------------------------------


def test_split_demo_model_answers_from_its_parts(tmp_path, stub):
    out = tmp_path / "usb" / "demo"
    r = run_bundle_cmd("build", MODEL, "-o", out, "--max-file-size", "40M")
    assert r.returncode == 0, r.stderr
    parts = sorted(out.parent.glob("demo-*-of-*.gguf"))
    assert [p.name for p in parts] == [f"demo-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert all(p.stat().st_size <= 40 << 20 for p in [out, *parts])
    assert out.stat().st_size < 30 << 20  # the executable carries no model
    r = run_bundle_cmd("inspect", out)
    assert r.returncode == 0 and all(p.name in r.stdout for p in parts), r.stdout
    r = run_exe(out, "-p", QUESTION, "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert ANSWER in r.stdout
    # a missing part is named, exit 1
    parts[1].rename(tmp_path / "away.gguf")
    r = run_exe(out, "-p", QUESTION)
    assert r.returncode == 1
    assert "model part 2 of 3 (demo-00002-of-00003.gguf) is missing" in r.stderr, r.stderr
    (tmp_path / "away.gguf").rename(parts[1])
    # a damaged part (after a good launch: new mtime, checked again) is named
    with open(parts[2], "r+b") as f:
        f.seek(1_000_000)
        b = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([b[0] ^ 0x20]))
    r = run_exe(out, "-p", QUESTION)
    assert r.returncode == 1
    assert "model part 3 of 3 (demo-00003-of-00003.gguf): damaged" in r.stderr, r.stderr
    r = run_bundle_cmd("verify", out)
    assert r.returncode == 1 and "model part 3 of 3" in (r.stdout + r.stderr)


def test_model_over_4gib_is_split_under_fat32_limit(tmp_path, stub):
    from bigmodel import make_big_model

    big = tmp_path / "big.gguf"
    size = make_big_model(big, MODEL)
    assert size > 4 << 30
    # without --split: built, with a warning that FAT32 cannot hold it
    one = tmp_path / "one" / "big"
    r = run_bundle_cmd("build", big, "-o", one)
    assert r.returncode == 0, r.stderr
    assert "FAT32" in r.stderr and "--split" in r.stderr
    one.unlink()
    out = tmp_path / "usb" / "big"
    r = run_bundle_cmd("build", big, "-o", out, "--split")
    assert r.returncode == 0, r.stderr
    parts = sorted(out.parent.glob("big-*-of-*.gguf"))
    assert len(parts) == 2, parts
    assert all(p.stat().st_size < 4 << 30 for p in [out, *parts])
    r = run_exe(out, "-p", "Hi", "-n", "2", "--temp", "0", "--ctx", "256", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    # mapped from the parts, not copied: no file in the cache near the model's size
    cache = Path(os.environ["BUNDLE_CACHE_DIR"])
    try:
        assert all(p.stat().st_size < 1 << 30 for p in cache.rglob("*") if p.is_file())
    finally:  # 4 GiB of real bytes: pytest keeps the last runs' folders
        for p in [out, *parts]:
            p.unlink(missing_ok=True)


# -- threads: ggml's own thread pool must not compete with busy programs ----------------------


def test_default_threads_leave_the_cores_other_programs_use(built_bundle):
    """Without OpenMP, ggml's workers spin at barriers; beside busy programs on every core,
    two threads on two cores decoded next to nothing. The default leaves busy cores alone."""
    n = len(os.sched_getaffinity(0))
    if n < 2:
        pytest.skip("needs 2 CPUs")
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(n)]
    try:
        import time

        time.sleep(0.5)
        r = run_exe(built_bundle, "-p", QUESTION, "-n", "8", "--temp", "0", timeout=120)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert r.returncode == 0, r.stderr
    assert "other programs are using" in r.stderr, r.stderr
    assert " 1 threads" in r.stderr or "· 1 thread" in r.stderr, r.stderr
    # an explicit -t is obeyed
    r = run_exe(built_bundle, "-p", QUESTION, "-n", "2", "-t", "2", "--temp", "0")
    assert r.returncode == 0 and "other programs" not in r.stderr, r.stderr


def test_as_pid_1_of_its_namespace_answers(built_bundle):
    """A container's entrypoint without an init (docker run IMAGE ./model): the bootloader is PID
    1, and its child must not take that for the bootloader having died (it once exited 1 there
    without a word)."""
    _need_root()
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(built_bundle), "-p", QUESTION, "--temp", "0"],
                       capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ANSWER in r.stdout, r.stdout
