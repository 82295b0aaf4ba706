"""One ggml back end library compiled on its own from llama.cpp's source (the Vulkan and RPC
back ends: buildsys/vulkan.py, buildsys/rpc.py), with zig for a target's glibc and machine (or
the toolchain the caller's prepare names: MinGW for Windows), into
its cache folder: fetched, changed where the caller says, configured, compiled, put in place
whole or not at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from . import zig
from .cache import fetch_sdist


def build_library(cache: Path, folder: Path, lib: Path, llama_version: str, triple: str, flags: list[str],
                  target: str, label: str, log, run_with_progress, prepare=lambda src, work: [],
                  strip: str | None = None, compiling: str = "compiling", zig_toolchain: bool = True) -> Path:
    """Compile CMake target `target` (lib's file name under bin/) into lib. prepare(src, work):
    changes the source and returns extra CMake arguments; strip: the binutils strip to run on
    the result; label: how the log names it ("Vulkan back end"); zig_toolchain: False when
    prepare names the toolchain itself."""
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    t0 = time.time()
    try:
        sdist = fetch_sdist(f"llama-cpp-python=={llama_version}", work, "llama_cpp_python-*.tar.gz")
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        extra = prepare(src, work)
        build = work / "build"
        log(f"{label}: configuring")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                        *flags, *(zig.cmake_args(zig.tools_folder(cache, triple), triple) if zig_toolchain else []),
                        *extra],
                       check=True, stdout=subprocess.DEVNULL)
        log(f"{label}: {compiling}")
        run_with_progress(["cmake", "--build", str(build), "--target", target, "-j", str(os.cpu_count() or 2)],
                          dict(os.environ), folder / "build.log")
        built = next(build.glob(f"bin/{lib.name}"))
        if strip:
            subprocess.run([strip, "--strip-unneeded", str(built)], check=True)
        os.replace(built, lib)
        log(f"{label}: built in {time.time() - t0:.0f} s ({lib.stat().st_size / 2**20:.1f} MiB)")
        return lib
    finally:
        shutil.rmtree(work, ignore_errors=True)
