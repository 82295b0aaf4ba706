"""The Linux targets' toolchain step (targets/linux_x86_64.py, targets/linux_aarch64.py):
stubs/linux-<machine>/, built on this x86-64 machine for either.

1. compile llama-cpp-python from source, portable (GGML_NATIVE=OFF GGML_BACKEND_DL=ON
   GGML_CPU_ALL_VARIANTS=ON), with zig for glibc 2.17 and the target's machine, into a wheel
   cached under ~/.cache/bundle/build/<version>-<flags hash>/ (about 10 minutes on 2 cores; never
   again for the same version, flags and toolchain);
2. (this machine's target) install that wheel into this Python environment;
3. pack its native libraries into one zstd-compressed tar (they travel in each bundle's payload
   and are unpacked once per machine);
4. run PyInstaller (one-file) on runtime/ with the portable CPython of the target's machine
   (buildsys/python.py) and a lean archive: no numpy, no native llama libs. For aarch64 that
   CPython and its PyInstaller run under qemu in an arm64 userland (buildsys/qemu.py):
   PyInstaller does not cross-build;
5. check that nothing but glibc 2.17 is needed, and add the GPU back ends asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import targets
from runtime.host.gpu.registry import GPU_BACKENDS

from . import qemu, rpc, zig
from .cache import fetch_sdist
from .console import log
from .elf import check_portable
from .gpu import sync_gpu
from .stub import (LLAMA_CPP_PYTHON, NATIVE_NAME, ROOT, STUB_REQUIREMENTS, WEB_VENDOR, cache_dir, check_variants,
                   ensure_web_vendor, flags_key, pack_native, pyinstaller_args, run_with_progress, sources_digest,
                   stub_meta, stub_requirements, write_meta)

CPU_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DLLAVA_BUILD=OFF",  # the runtime has no use for the multimodal library; saves build time
    # zig ships no OpenMP; ggml's own thread pool is used (threads are capped at the usable cores)
    "-DGGML_OPENMP=OFF",
]
WHEEL_PLATFORMS = {"x86_64": "manylinux2014_x86_64", "aarch64": "manylinux2014_aarch64"}


def ensure_wheel(version: str, flags: list[str], triple: str = zig.TRIPLE) -> Path:
    """llama-cpp-python compiled by zig for glibc 2.17 and triple's machine (buildsys/zig.py),
    cached by version, flags and toolchain."""
    key = flags_key(version, flags + zig.identity(triple))
    folder = cache_dir() / key
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        log(f"llama-cpp-python {version}: cached ({wheels[0]})")
        return wheels[0]
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    try:
        log(f"llama-cpp-python {version}: fetching the source")
        sdist = fetch_sdist(f"llama-cpp-python=={version}", work, "llama_cpp_python-*.tar.gz")
        log(f"llama-cpp-python {version}: compiling with {' '.join(flags)} (about 10 minutes on 2 cores)")
        tools = zig.cmake_args(zig.tools_folder(cache_dir(), triple), triple)
        env = dict(os.environ, CMAKE_ARGS=" ".join(flags + tools),
                   CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
        # --no-cache-dir: pip's own wheel cache is keyed by the sdist alone, not by CMAKE_ARGS.
        run_with_progress(
            [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-cache-dir", "-w", str(work), str(sdist)],
            env, folder / "build.log",
        )
        wheel = next(work.glob("llama_cpp_python-*.whl"))
        final = folder / wheel.name
        os.replace(wheel, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_installed(wheel: Path) -> None:
    marker = Path(sys.prefix) / ".bundle-llama-wheel"
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if marker.exists() and marker.read_text() == digest:
        return
    log(f"installing {wheel.name} into {sys.prefix}")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True
    )
    marker.write_text(digest)


def native_files(wheel: Path) -> dict[str, bytes]:
    """The shared libraries in the wheel: llama_cpp/lib/*.so* and the CPU variants in bin/."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            base = name.rsplit("/", 1)[-1]
            if (name.startswith("llama_cpp/lib/") or name.startswith("bin/")) and ".so" in base:
                out[base] = z.read(name)
    if "libggml.so.0" not in out or "libllama.so" not in out:
        sys.exit(f"{wheel} lacks libggml.so.0 or libllama.so; delete it from the cache and rebuild")
    return out


def inputs_digest(wheel: Path, python: Path, runner: list[str] = (), rpc_lib: Path | None = None) -> str:
    h = hashlib.sha256()
    if rpc_lib:
        h.update(hashlib.sha256(rpc_lib.read_bytes()).digest())
    h.update(str(python).encode())
    h.update((stub_site(python.parents[1], runner) / ".bundle-stub-env").read_bytes())
    sources_digest(h)
    h.update(wheel.name.encode())
    h.update(json.dumps(WEB_VENDOR, sort_keys=True).encode())
    h.update(str(wheel.stat().st_size).encode())
    import PyInstaller

    h.update(PyInstaller.__version__.encode())
    return h.hexdigest()


def stub_site(prefix: Path, runner: list[str] = ()) -> Path:
    """The portable interpreter's own site folder (Debian's CPython calls it dist-packages)."""
    from buildsys.python import python_env

    out = subprocess.run([*runner, str(prefix / "bin" / "python3.11"), "-c", "import site; print(site.getsitepackages()[-1])"],
                         capture_output=True, text=True, check=True, env=python_env(prefix)).stdout.strip()
    site = Path(out)
    if prefix not in site.parents:
        sys.exit(f"the portable CPython's site folder {site} is outside its prefix {prefix}")
    site.mkdir(parents=True, exist_ok=True)
    return site


def ensure_stub_python(wheel: Path, target, runner: list[str] = ()) -> Path:
    """The portable CPython of the target's machine with the stub's Python side installed:
    PyInstaller (with the bootloader built here), the runtime's dependencies, llama_cpp's Python
    modules. Returns its interpreter."""
    from buildsys import bootloader, python, unwind

    prefix = python.build(cache_dir(), os.cpu_count() or 2, target.triple, list(runner))
    import PyInstaller

    run = bootloader.build(cache_dir(), PyInstaller.__version__, target.triple)
    site = stub_site(prefix, runner)
    pins = stub_requirements()
    wanted = [p for p in pins if p.split("==")[0].lower() in STUB_REQUIREMENTS]
    marker = site / ".bundle-stub-env"
    platform = WHEEL_PLATFORMS[target.machine]
    digest = hashlib.sha256("\n".join([*pins, platform, wheel.name, str(wheel.stat().st_size),
                                       hashlib.sha256(run.read_bytes()).hexdigest()]).encode()).hexdigest()
    if marker.exists() and marker.read_text() == digest:
        unwind.install(site, prefix / "lib", cache_dir(), target.triple, log)  # (buildsys/unwind.py)
        return prefix / "bin" / "python3.11"
    log("stub Python: installing " + ", ".join(wanted) + f" ({platform} wheels)")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(site),
                        "--platform", platform, "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "--only-binary=:all:", "-c", str(constraints), *wanted], check=True)
    # llama_cpp's Python modules only: its native libraries travel in the payload (docs/facts.md #6)
    shutil.rmtree(site / "llama_cpp", ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("llama_cpp/") and name.endswith(".py"):
                z.extract(name, site)
    shutil.copy2(run, site / "PyInstaller" / "bootloader" / bootloader.PLATFORM_DIRS[target.machine] / "run")
    if runner:  # PyInstaller's --strip runs this machine's strip: strip the wheels' libraries here
        python.strip(site, target.machine)
    # Rust extensions (blake3) need libgcc_s's unwinder: one of their own, for glibc 2.17, under a
    # name of its own (buildsys/unwind.py); PyInstaller finds it on the interpreter's library path
    unwind.install(site, prefix / "lib", cache_dir(), target.triple, log)
    marker.write_text(digest)
    return prefix / "bin" / "python3.11"


def run_pyinstaller(out_dir: Path, web_vendor: Path, python: Path, target, userland: Path | None) -> Path:
    """PyInstaller on the target's CPython: here, or (another machine's) under qemu in userland,
    with this tree, the build cache and the work folder seen at their own paths."""
    from buildsys.python import python_env

    work = Path(tempfile.mkdtemp(prefix="bundle-pyi-"))
    try:
        args = [*pyinstaller_args(web_vendor, target.stub_name, strip=userland is None),
                "--distpath", str(work / "dist"), "--workpath", str(work / "build"), "--specpath", str(work)]
        env = python_env(python.parents[1])
        if userland is None:
            subprocess.run([str(python), "-m", "PyInstaller", *args], check=True, env=env, cwd=work)
        else:
            inner = {k: env[k] for k in ("LD_LIBRARY_PATH", "PYTHONNOUSERSITE")}
            r = qemu.run(userland, [str(python), "-m", "PyInstaller", *args], binds=[ROOT, cache_dir(), work],
                         env=inner, cwd=str(work))
            if r.returncode != 0:
                sys.exit(f"PyInstaller under qemu failed (exit {r.returncode})")
        built = work / "dist" / target.stub_name
        final = out_dir / target.stub_name
        tmp = out_dir / (target.stub_name + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def archive_binaries(stub: Path, into: Path) -> list[Path]:
    """Extract the shared libraries PyInstaller put in the stub (to check their glibc needs)."""
    from PyInstaller.archive.readers import CArchiveReader

    reader = CArchiveReader(str(stub))
    out = []
    for name, (*_, typecode) in reader.toc.items():
        if typecode in ("b", "x", "d") or name.endswith(".so") or ".so." in name:
            data = reader.extract(name)
            if data and data[:4] == b"\x7fELF":
                p = into / name.replace("/", "_")
                p.write_bytes(data)
                out.append(p)
    return out


def build(args) -> int:
    """stubs/linux-<machine>/ (args: build.py's: target, force, cuda, vulkan, cuda_archs)."""
    target = targets.by_name(args.target)
    host = targets.host_name()
    if host not in target.built_on:
        sys.exit(f"the {target.name} stub is built on {' or '.join(target.built_on)}; this is {host}")
    out_dir = ROOT / "stubs" / target.name
    out_dir.mkdir(parents=True, exist_ok=True)
    cross = target.machine != os.uname().machine
    userland, runner = None, []
    if cross:
        qemu.check_tools()
        log(f"{target.name}: an arm64 userland for qemu (debootstrap, once)")
        userland = qemu.build_userland(cache_dir())
        runner = [qemu.QEMU, "-L", str(userland)]

    # The two long compiles run side by side: their configure steps are serial, so together they
    # keep both cores busier than one after the other (fresh machine: about 35 minutes).
    from concurrent.futures import ThreadPoolExecutor

    from buildsys import python as portable_python

    with ThreadPoolExecutor(1) as pool:
        cpython = pool.submit(portable_python.build, cache_dir(), os.cpu_count() or 2, target.triple, runner)
        wheel = ensure_wheel(LLAMA_CPP_PYTHON, CPU_FLAGS, target.triple)
        rpc_lib = rpc.ensure_library(cache_dir(), LLAMA_CPP_PYTHON, log, run_with_progress, target.triple)
        cpython.result()
    if not cross:  # the tests and the builder on this machine use the same llama_cpp
        ensure_installed(wheel)

    web_vendor = ensure_web_vendor()
    python = ensure_stub_python(wheel, target, runner)
    meta_path = out_dir / "stub.json"
    digest = inputs_digest(wheel, python, runner, rpc_lib)
    if not args.force and meta_path.exists() and (out_dir / target.stub_name).exists() and (out_dir / NATIVE_NAME).exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs") == digest:
            log(f"stub up to date: {out_dir / target.stub_name}")
            sync_gpu(out_dir, meta, args)
            return 0

    t0 = time.time()
    files = {**native_files(wheel), rpc.LIBRARY: rpc_lib.read_bytes()}  # ggml's RPC, beside the CPU back end
    native = pack_native(files, out_dir / NATIVE_NAME)
    check_variants(target, native)
    log(f"native libraries: {len(files)} files, {native['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{native['size'] / 2**20:.1f} MiB zstd ({', '.join(native['cpu_variants'])})")
    log("running PyInstaller" + (" under qemu (a few minutes)" if cross else ""))
    stub = run_pyinstaller(out_dir, web_vendor, python, target, userland)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        libs = []
        for name, data in files.items():
            p = tmpdir / name
            p.write_bytes(data)
            libs.append(p)
        libs += archive_binaries(stub, tmpdir)
        glibc = check_portable([stub] + libs, machine=target.machine)
    from buildsys.python import python_env

    version = subprocess.run([*runner, str(python), "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True, env=python_env(python.parents[1])).stdout.strip()
    meta = stub_meta(target.name, stub, CPU_FLAGS, version, native, digest, glibc_min=glibc)
    meta.setdefault("backends", {})["rpc"] = {"protocol": rpc.protocol(rpc_lib)}  # --rpc-worker / --rpc
    for b in GPU_BACKENDS:  # a stale GPU blob would not match this stub's record
        (out_dir / b.stub_file).unlink(missing_ok=True)
    write_meta(meta_path, meta)
    log(f"stub: {stub} ({stub.stat().st_size / 2**20:.1f} MiB, needs glibc >= {glibc}) in {time.time() - t0:.0f} s")
    sync_gpu(out_dir, meta, args)
    return 0
