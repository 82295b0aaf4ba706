"""PyInstaller's one-file bootloader built for the stub (issue 9).

The bootloader in PyInstaller's wheel links the system's libz.so.1, which minimal userlands lack
(exit 127 before a word is printed). It is built here from the same PyInstaller's sdist with zig
for glibc 2.17, with PyInstaller's own bundled zlib linked statically (`--static-zlib`), plus one
source file of ours (bundle_unpack_dir.c: a folder that can hold code when /tmp is noexec).
Cached by PyInstaller version, toolchain and the digest of that file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import zig
from .cache import fetch_sdist

HERE = Path(__file__).resolve().parent
OURS = HERE / "bundle_unpack_dir.c"
PLATFORM_DIR = "Linux-64bit-intel"


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def build(cache: Path, pyinstaller_version: str) -> Path:
    """The path of the release bootloader (`run`), cached."""
    digest = hashlib.sha256("|".join([pyinstaller_version, *zig.IDENTITY]).encode() + OURS.read_bytes()).hexdigest()
    folder = cache / f"pyinstaller-bootloader-{pyinstaller_version}-{digest[:12]}"
    run = folder / "run"
    if run.exists():
        log(f"bootloader: cached ({run})")
        return run
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    logfile = folder / "build.log"
    try:
        log(f"bootloader: building PyInstaller {pyinstaller_version}'s with zig and a static zlib")
        with tarfile.open(fetch_sdist(f"pyinstaller=={pyinstaller_version}", work, "pyinstaller-*.tar.gz")) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("pyinstaller-*/bootloader"))
        shutil.copy(OURS, src / "src" / OURS.name)
        env = zig.env(cache / "zig-tools")
        with open(logfile, "w") as out:
            rc = subprocess.run([sys.executable, "waf", "--static-zlib", "--no-universal2", "distclean", "all"],
                                cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit("\n".join(logfile.read_text().splitlines()[-20:]) + f"\nbootloader build failed; log: {logfile}")
        built = src.parent / "PyInstaller" / "bootloader" / PLATFORM_DIR / "run"
        tmp = folder / "run.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, run)
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)
