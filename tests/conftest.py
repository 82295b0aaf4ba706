"""Shared fixtures: the real demo model, the real stub, real bundles built once per session.

`make test` builds the stub (python build.py) and fetches the demo model before pytest runs;
nothing here compiles anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.gguf"
STUB_DIR = ROOT / "stubs" / "linux-x86_64"  # targets/linux_x86_64.py: run natively here
BUNDLE_CMD = [str(Path(sys.executable).parent / "bundle")]  # the installed command, as users run it
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(autouse=True)
def isolated_user_dirs(tmp_path, monkeypatch):
    """Every user/cache folder points at a temporary one (also inherited by subprocesses)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("BUNDLE_CACHE_DIR", str(home / "cache" / "bundle"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("BUNDLE_TEMP", "BUNDLE_CTX", "BUNDLE_SYSTEM", "BUNDLE_MAX_TOKENS", "BUNDLE_DEBUG", "BUNDLE_TOP_K",
                "BUNDLE_TOP_P", "BUNDLE_SEED", "BUNDLE_THREADS", "BUNDLE_REPEAT_PENALTY", "BUNDLE_CPU_VARIANT",
                # the GPU choice, as a user's environment could steer it
                "BUNDLE_GPU", "BUNDLE_NVML_LIBRARY", "BUNDLE_VULKAN_LIBRARY", "GGML_VK_VISIBLE_DEVICES",
                "VK_ICD_FILENAMES", "VK_DRIVER_FILES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    yield home


@pytest.fixture(scope="session")
def wine(tmp_path_factory):
    """wine in a fresh prefix of its own, for the session (Windows' executables: tests/wine.py)."""
    import targets
    from wine import NATIVE, WINE, WINESERVER, Wine

    assert targets.by_name("windows-x86_64").runner == "wine"  # how its executables run on a Linux machine
    if not NATIVE and (not WINE or not WINESERVER):
        pytest.fail("wine is missing: run `make buildtools-windows` (Debian's wine64)")
    w = Wine(tmp_path_factory.mktemp("wineprefix") / "prefix").start()
    yield w
    w.stop()


# The arm64 Debian 11 userland the aarch64 executables run in under qemu-user (buildsys/qemu.py).
ARM_ROOTFS = Path(os.environ.get("BUNDLE_TEST_ROOTFS_ARM64") or Path.home() / ".cache" / "bundle" / "test-rootfs" /
                  "bullseye-arm64-minbase")


@pytest.fixture(scope="session")
def arm_root() -> Path:
    from buildsys import qemu

    if os.geteuid() != 0:
        pytest.skip("debootstrap and chroot need root (CI runs as root)")
    return qemu.ensure_userland(ARM_ROOTFS)


@pytest.fixture(scope="session")
def model() -> Path:
    if not MODEL.exists():
        pytest.fail(f"the demo model is missing: run `make model` (expected {MODEL})")
    return MODEL


@pytest.fixture(scope="session")
def stub() -> Path:
    exe = STUB_DIR / "bundle-runtime"
    if not exe.exists():
        pytest.fail("the runtime stub is missing: run `make stub` (python build.py)")
    return exe


def run_bundle_cmd(*args, cwd=None, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BUNDLE_CMD, *map(str, args)], cwd=cwd or ROOT, env=env, capture_output=True, text=True, **kw
    )


@pytest.fixture(scope="session")
def built_bundle(tmp_path_factory, model, stub) -> Path:
    """One real bundle of the demo model, built with the real `bundle build`."""
    out = tmp_path_factory.mktemp("dist") / "SmolLM2-135M-Instruct"
    r = run_bundle_cmd("build", model, "-o", out)
    assert r.returncode == 0, r.stderr
    return out


# The Windows bundle's folder and name: spaces and letters outside ASCII (and outside most code pages).
WIN_FOLDER = "My Models Ünïcode 模型"
WIN_NAME = "SmolLM2 démo"


@pytest.fixture(scope="session")
def win_stub() -> Path:
    import targets

    stub = ROOT / "stubs" / "windows-x86_64" / targets.by_name("windows-x86_64").stub_name
    if not stub.exists():
        pytest.fail("the Windows stub is missing: run `make stub-windows` (python build.py --target windows-x86_64)")
    return stub


@pytest.fixture(scope="session")
def win_bundle(tmp_path_factory, model, win_stub) -> Path:
    """The demo model's Windows bundle (model.exe), built with the real `bundle build`."""
    out = tmp_path_factory.mktemp("windist") / WIN_FOLDER / WIN_NAME
    r = run_bundle_cmd("build", model, "--target", "windows-x86_64", "-o", out)
    assert r.returncode == 0, r.stderr
    exe = out.with_name(WIN_NAME + ".exe")
    assert exe.is_file(), r.stderr  # the .exe name is added for Windows
    assert "needs Windows" in r.stderr
    return exe


@pytest.fixture
def bundle_copy(built_bundle, tmp_path) -> Path:
    """A private copy of the bundle a test may damage."""
    dest = tmp_path / "copy" / built_bundle.name
    dest.parent.mkdir()
    shutil.copy2(built_bundle, dest)
    return dest


def wait_for_line(stream, pattern: str, seen: list, seconds: float = 60):
    """Read stream's lines (into seen) until one matches pattern: the match, or None when the
    stream ends or seconds pass first (a started process saying where it listens)."""
    import re
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        line = stream.readline()
        if not line:
            return None
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    return None


def run_exe(exe: Path, *args, input=None, timeout=120, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(exe), *map(str, args)], input=input, capture_output=True, text=True, timeout=timeout,
        env=env, stdin=None if input is not None else subprocess.DEVNULL,
    )


def as_nobody() -> list[str]:
    """A prefix that runs a command as an unprivileged user (root ignores file permissions)."""
    if os.geteuid() != 0:
        return []
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def load_engine(bundle: Path, cache: Path, **kw):
    """The real model in-process, as the runtime loads it: libraries unpacked from the bundle
    into cache, the model mapped from inside the bundle at its payload offset."""
    from runtime.bundlefile import MODEL_ENTRY, read_payload
    from runtime.host import bindings, libraries
    from runtime.inference.engine import Engine

    payload = read_payload(str(bundle))
    libdir = libraries.extract_entry(payload, "native/cpu.tar.zst", root=cache)
    C = bindings.import_bindings(libdir)
    bindings.set_logging(C, False)
    bindings.load_backends(libdir)
    return Engine(C, str(bundle), payload.absolute_offset(MODEL_ENTRY), **kw)
