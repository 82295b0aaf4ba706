#!/usr/bin/env python3
"""Build the runtime stub for this platform: stubs/<target>/.

    python build.py            # portable CPU build (every x86-64 generation)
    python build.py --vulkan   # ... with ggml's Vulkan back end (what `make stub` builds)
    python build.py --cuda     # ... with the CUDA back end (long: see the README)
    python build.py --force    # rebuild the stub even if its inputs did not change

Steps (each skipped when its output is already there):
1. compile llama-cpp-python from source, portable (GGML_NATIVE=OFF GGML_BACKEND_DL=ON
   GGML_CPU_ALL_VARIANTS=ON), into a wheel cached under ~/.cache/bundle/build/<version>-<flags
   hash>/ (about 10 minutes on 2 cores; never again for the same version and flags);
2. install that wheel into this Python environment (the stub's Python side comes from it);
3. pack its native libraries into one zstd-compressed tar (they travel in each bundle's payload
   and are unpacked once per machine);
4. run PyInstaller (one-file) on runtime/ with a lean archive: no numpy, no native llama libs.

Output: stubs/<target>/bundle-runtime, native-cpu.tar.zst, stub.json, and one
native-<backend>.tar.zst per GPU back end asked for (runtime/backends.py); a back end not asked
for is removed from the folder, since bundles carry what it holds.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from buildsys import vulkan, zig
from buildsys.cache import fetch_sdist, publish
from runtime.backends import CUDA, GPU_BACKENDS, VULKAN

ROOT = Path(__file__).resolve().parent
LLAMA_CPP_PYTHON = "0.3.36"
CPU_FLAGS = [
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DLLAVA_BUILD=OFF",  # the runtime has no use for the multimodal library; saves build time
    # zig ships no OpenMP; ggml's own thread pool is used (threads are capped at the usable cores)
    "-DGGML_OPENMP=OFF",
]
# The chat page's Markdown renderer and sanitiser, fetched from the npm registry at build time
# (never committed) and shipped inside the stub with their licences.
WEB_VENDOR = {"marked": ("18.2.1", "lib/marked.umd.js"), "dompurify": ("3.5.0", "dist/purify.min.js")}
# CUDA from PyPI. CUDA 12's wheels ship no nvcc (only ptxas), so 13 is the newest *and* the only
# major buildable from the registries: Turing (sm_75) and newer, NVIDIA driver 580 or newer.
CUDA_PACKAGES = ["nvidia-cuda-nvcc==13.5.37", "nvidia-cuda-runtime==13.5.37", "nvidia-cublas==13.10.0.20",
                 "nvidia-cuda-cccl==13.3.5.0.6", "nvidia-cuda-crt==13.5.37", "nvidia-nvvm==13.5.37"]
CUDA_VERSION_MIN = [13, 0]
# Real code for Turing, Ampere, Ada, Hopper, Blackwell (data centre and consumer); PTX of the
# newest for GPUs that come later (the driver compiles it on first use).
CUDA_ARCHITECTURES = "75-real;80-real;86-real;89-real;90-real;100-real;120-real;120-virtual"
CUDA_FLAGS = ["-DGGML_CUDA=ON", "-DGGML_CUDA_NO_VMM=ON", "-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF",
              "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
CUDA_LIBS = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"]
TARGET = "linux-x86_64"
STUB_NAME = "bundle-runtime"
NATIVE_NAME = "native-cpu.tar.zst"
ZSTD_LEVEL = 19
# What the stub's Python side is made of: installed from manylinux2014 (glibc 2.17) wheels into
# the portable CPython (buildsys/python.py), at the versions this environment was tested with.
STUB_REQUIREMENTS = ["pyinstaller", "jinja2", "zstandard", "starlette", "uvicorn"]
WHEEL_PLATFORM = "manylinux2014_x86_64"
# glibc's own libraries: the only ones a stub or its native libraries may need from the system.
GLIBC_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
              "libutil.so.1", "libresolv.so.2"}
GLIBC_FLOOR = tuple(int(x) for x in zig.GLIBC_FLOOR.split("."))
# Modules the runtime never imports; keeping them out keeps launch fast (docs/facts.md #8).
# (ssl stays: uvicorn imports it at module level.)
EXCLUDES = [
    "numpy", "llama_cpp.llama", "llama_cpp.server", "llama_cpp.llama_chat_format",
    "llama_cpp.llava_cpp", "llama_cpp.mtmd_cpp", "llama_cpp.llama_speculative",
    "llama_cpp.llama_cache", "llama_cpp.llama_tokenizer",
    "tkinter", "sqlite3", "unittest", "pydoc", "doctest", "lib2to3",
    "zstandard.backend_cffi", "cffi", "_cffi_backend", "bundler", "pytest",
    "xmlrpc", "setuptools", "pkg_resources", "websockets", "wsproto",
    "uvloop", "httptools", "watchfiles", "yaml", "dotenv",
    # decimal falls back to the pure-Python _pydecimal; nothing here decodes CJK legacy encodings
    "_decimal", "_codecs_cn", "_codecs_jp", "_codecs_kr", "_codecs_tw", "_codecs_hk", "_codecs_iso2022",
]


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


def cache_dir() -> Path:
    base = os.environ.get("BUNDLE_BUILD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bundle", "build"
    )
    return Path(base)


def flags_key(version: str, flags: list[str]) -> str:
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"llama-cpp-python-{version}-{digest}"


def run_with_progress(cmd: list[str], env: dict, logfile: Path) -> None:
    """Run a long build, keeping its full log in logfile and showing compile progress."""
    start = time.time()
    last, last_pct = 0.0, -100
    pattern = re.compile(r"\[\s*(\d+)%\]|\[(\d+)/(\d+)\]")
    with open(logfile, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            m = pattern.search(line)
            now = time.time()
            if m:
                pct = int(m.group(1) or 100 * int(m.group(2)) // int(m.group(3)))
                if pct - last_pct >= 5 or now - last >= 60:  # a line per 5%, or a sign of life a minute
                    log(f"  compiling: {pct}% ({now - start:.0f} s)")
                    last, last_pct = now, pct
        rc = proc.wait()
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        sys.exit("\n".join(tail) + f"\nbuild failed (exit {rc}); full log: {logfile}")


def ensure_wheel(version: str, flags: list[str]) -> Path:
    """llama-cpp-python compiled by zig for glibc 2.17 (buildsys/zig.py), cached by version,
    flags and toolchain."""
    key = flags_key(version, flags + zig.IDENTITY)
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
        env = dict(os.environ, CMAKE_ARGS=" ".join(flags + zig.cmake_args(cache_dir() / "zig-tools")),
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


def pack_native(files: dict[str, bytes], dest: Path) -> dict:
    """One tar: each distinct library once, its other names as symlinks (the wheel holds
    libggml.so, .so.0 and .so.0.x.y as three copies, docs/facts.md #5b)."""
    import zstandard

    by_content: dict[str, list[str]] = {}
    for name, data in files.items():
        by_content.setdefault(hashlib.sha256(data).hexdigest(), []).append(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for names in sorted(by_content.values()):
            # the real file gets the soname-style name (libx.so.0) when there is one
            names.sort(key=lambda n: (not re.search(r"\.so\.\d+$", n), len(n), n))
            real = names[0]
            info = tarfile.TarInfo(real)
            info.size, info.mode, info.mtime = len(files[real]), 0o755, 0
            tar.addfile(info, io.BytesIO(files[real]))
            for alias in names[1:]:
                link = tarfile.TarInfo(alias)
                link.type, link.linkname, link.mtime = tarfile.SYMTYPE, real, 0
                tar.addfile(link)
    raw = buf.getvalue()
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(packed)
    os.replace(tmp, dest)
    variants = sorted(m.group(1) for n in files if (m := re.match(r"(?:lib)?ggml-cpu-(.+?)\.(?:so|dll)$", n)))
    return {
        "file": dest.name,
        "sha256": hashlib.sha256(packed).hexdigest(),
        "size": len(packed),
        "unpacked_size": len(raw),
        "cpu_variants": variants,
        "libraries": sorted(files),
    }


def elf_needs(path: Path) -> tuple[tuple[int, int], set[str]]:
    """(newest GLIBC_x.y symbol version, DT_NEEDED names) of one ELF file, read with readelf."""
    try:
        out = subprocess.run(["readelf", "-V", "-d", "-W", str(path)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit("readelf is needed to check the stub's libraries (binutils)")
    versions = [(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out)]
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    return max(versions, default=(2, 0)), needed


def check_portable(paths: list[Path], system: set[str] = frozenset()) -> str:
    """The glibc floor of these ELF files; exits when one needs a newer glibc than the floor or a
    system library other than glibc's own and `system` (each other name must be among the files
    themselves)."""
    own = {p.name for p in paths} | set(system)
    best, problems = (2, 0), []
    for p in paths:
        version, needed = elf_needs(p)
        best = max(best, version)
        if version > GLIBC_FLOOR:
            problems.append(f"{p.name} needs GLIBC_{version[0]}.{version[1]}")
        for lib in sorted(needed - GLIBC_LIBS - own):
            problems.append(f"{p.name} needs {lib} from the system")
    if problems:
        sys.exit("the stub would not run on every glibc >= " + zig.GLIBC_FLOOR + ":\n  " + "\n  ".join(problems))
    return f"{best[0]}.{best[1]}"


def ensure_web_vendor() -> Path:
    """marked and DOMPurify from the npm registry, cached; returns the folder to ship."""
    folder = cache_dir() / ("web-vendor-" + "-".join(f"{n}{v}" for n, (v, _) in sorted(WEB_VENDOR.items())))
    if (folder / ".complete").exists():
        return folder
    if not shutil.which("npm"):
        sys.exit("npm is needed to fetch the chat page's libraries (marked, DOMPurify); install Node.js/npm")
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache_dir()))
    try:
        out = work / "vendor"
        out.mkdir()
        for name, (version, member) in WEB_VENDOR.items():
            log(f"fetching {name}@{version} from the npm registry")
            tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=work, check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            with tarfile.open(work / tgz) as tar:
                tar.extractall(work / name, filter="data")
            pkg = work / name / "package"
            shutil.copy(pkg / member, out / Path(member).name)
            lic = next(p for p in pkg.iterdir() if p.name.upper().startswith("LICENSE"))
            shutil.copy(lic, out / f"LICENSE.{name}.txt")
        return publish(out, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_cuda_toolkit() -> Path:
    """The CUDA toolkit from PyPI's nvidia-* wheels, unpacked into one tree (bin/nvcc, include/, lib/)."""
    key = hashlib.sha256(" ".join(CUDA_PACKAGES).encode()).hexdigest()[:12]
    root = cache_dir() / f"cuda-toolkit-{key}"
    top = root / "nvidia" / "cu13"
    if (root / ".complete").exists():
        return top
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache_dir()))
    try:
        log(f"CUDA toolkit: fetching {', '.join(CUDA_PACKAGES)} from PyPI")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *CUDA_PACKAGES, "-d", str(work / "dl")],
                       check=True)
        for whl in (work / "dl").glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                z.extractall(work / "tree")
        lib = work / "tree" / "nvidia" / "cu13" / "lib"
        for name in CUDA_LIBS:  # the unversioned names CMake links against
            (lib / name.rsplit(".", 1)[0]).symlink_to(name)
        for exe in (work / "tree" / "nvidia" / "cu13").glob("**/bin/*"):
            if exe.is_file():
                exe.chmod(0o755)
        publish(work / "tree", root)
        return top
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_cuda_backend(archs: str) -> Path:
    """libggml-cuda.so compiled from the same llama.cpp source as the CPU wheel, cached by
    version, CUDA packages, flags and architectures."""
    key = hashlib.sha256(" ".join([*CUDA_PACKAGES, *sorted(CUDA_FLAGS), archs]).encode()).hexdigest()[:12]
    folder = cache_dir() / f"ggml-cuda-{LLAMA_CPP_PYTHON}-{key}"
    lib = folder / "libggml-cuda.so"
    if lib.exists():
        log(f"CUDA back end: cached ({lib})")
        return lib
    toolkit = ensure_cuda_toolkit()
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    try:
        with tarfile.open(fetch_sdist(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", work, "llama_cpp_python-*.tar.gz")) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = work / "build"
        log(f"CUDA back end: configuring for architectures {archs}")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja" if shutil.which("ninja") else "Unix Makefiles",
                        *CUDA_FLAGS, f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DCUDAToolkit_ROOT={toolkit}",
                        f"-DCMAKE_CUDA_COMPILER={toolkit / 'bin' / 'nvcc'}"],
                       check=True, stdout=subprocess.DEVNULL)
        log("CUDA back end: compiling (long: each architecture adds to it; see --cuda-archs)")
        run_with_progress(["cmake", "--build", str(build), "--target", "ggml-cuda", "-j", str(os.cpu_count() or 2)],
                          dict(os.environ), folder / "build.log")
        built = next(build.glob("bin/libggml-cuda.so"))
        os.replace(built, lib)
        return lib
    finally:
        shutil.rmtree(work, ignore_errors=True)


def runpath_to_origin(lib: Path) -> bytes:
    """The library's bytes with its RUNPATH (CMake leaves the build folder there, a path that
    on another machine could be anyone's /tmp) overwritten in place by $ORIGIN."""
    data = lib.read_bytes()
    out = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True, check=True).stdout
    m = re.search(r"\((?:RUNPATH|RPATH)\)\s+Library r(?:un)?path: \[(.*)\]", out)
    if not m or m.group(1) == "$ORIGIN":
        return data
    old = m.group(1).encode() + b"\0"
    if data.count(old) != 1 or len(old) < 8:
        sys.exit(f"cannot rewrite the RUNPATH of {lib} ({m.group(1)!r}); rebuild it")
    return data.replace(old, b"$ORIGIN".ljust(len(old), b"\0"))


def pack_tar(files: dict[str, Path], dest: Path, level: int) -> dict:
    """Libraries as one zstd tar (a GPU back end's entry), their RUNPATHs set to $ORIGIN.
    Multi-threaded zstd: the CUDA libraries are ~1 GB."""
    import zstandard

    tmp = dest.with_suffix(".tmp")
    unpacked = 0
    cctx = zstandard.ZstdCompressor(level=level, threads=-1)
    with open(tmp, "wb") as raw, cctx.stream_writer(raw) as out, tarfile.open(fileobj=out, mode="w|") as tar:
        for name, path in files.items():
            data = runpath_to_origin(path) if name.startswith("libggml") else None
            info = tar.gettarinfo(str(path.resolve()), arcname=name)
            info.mtime, info.mode = 0, 0o755
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            unpacked += info.size
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    os.replace(tmp, dest)
    return {"file": dest.name, "sha256": digest.hexdigest(), "size": dest.stat().st_size, "unpacked_size": unpacked,
            "libraries": sorted(files)}


def add_cuda(out_dir: Path, meta: dict, args) -> None:
    """libggml-cuda.so and the CUDA runtime libraries it needs (the runtime preloads them from
    the entry by path, so their location needs no RPATH)."""
    archs = args.cuda_archs
    cuda = meta.get("native", {}).get("cuda")
    if cuda and cuda.get("architectures") == archs and (out_dir / CUDA.stub_file).exists():
        log(f"CUDA back end up to date: {out_dir / CUDA.stub_file}")
        return
    lib = ensure_cuda_backend(archs)
    log("CUDA back end: packing it with the CUDA runtime libraries")
    toolkit = ensure_cuda_toolkit()
    files = {CUDA.library: lib, **{name: toolkit / "lib" / name for name in CUDA_LIBS}}
    # level 10: the libraries are ~1 GB, and level 19 would take many minutes
    record = pack_tar(files, out_dir / CUDA.stub_file, 10)
    meta["native"]["cuda"] = {**record, "architectures": archs, "cuda_packages": CUDA_PACKAGES}
    meta["cuda_version_min"] = CUDA_VERSION_MIN
    meta["cuda_architectures"] = archs
    write_meta(out_dir / "stub.json", meta)
    log(f"CUDA back end: {out_dir / CUDA.stub_file} ({record['size'] / 2**20:.0f} MiB; needs NVIDIA driver for CUDA "
        f"{'.'.join(map(str, CUDA_VERSION_MIN))}+)")


def add_vulkan(out_dir: Path, meta: dict, args) -> None:
    """libggml-vulkan.so (buildsys/vulkan.py). The Vulkan loader it links is the system's."""
    lib = vulkan.ensure_backend(cache_dir(), LLAMA_CPP_PYTHON, log, run_with_progress)
    digest = hashlib.sha256(lib.read_bytes()).hexdigest()
    record = meta.get("native", {}).get("vulkan")
    if record and record.get("library_sha256") == digest and (out_dir / VULKAN.stub_file).exists():
        log(f"Vulkan back end up to date: {out_dir / VULKAN.stub_file}")
        return
    check_portable([lib], system={vulkan.LOADER, "libggml-base.so.0"})
    t0 = time.time()
    record = pack_tar({VULKAN.library: lib}, out_dir / VULKAN.stub_file, ZSTD_LEVEL)
    meta["native"]["vulkan"] = {**record, "library_sha256": digest, "loader": vulkan.LOADER}
    write_meta(out_dir / "stub.json", meta)
    log(f"Vulkan back end: {out_dir / VULKAN.stub_file} ({record['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{record['size'] / 2**20:.1f} MiB zstd in {time.time() - t0:.0f} s; needs a Vulkan 1.2 driver)")


GPU_BUILDS = {"cuda": add_cuda, "vulkan": add_vulkan}


def sync_gpu(out_dir: Path, meta: dict, args) -> None:
    """The stub folder holds exactly the GPU back ends asked for (bundles carry what it holds).
    A compiled back end stays cached: asking for it again re-adds it in seconds."""
    for b in GPU_BACKENDS:
        if getattr(args, b.key):
            GPU_BUILDS[b.key](out_dir, meta, args)
        elif (out_dir / b.stub_file).exists() or meta.get("native", {}).get(b.key):
            (out_dir / b.stub_file).unlink(missing_ok=True)
            meta.get("native", {}).pop(b.key, None)
            for k in [k for k in meta if k.startswith(b.key + "_")]:
                meta.pop(k)
            write_meta(out_dir / "stub.json", meta)
            log(f"{b.label} back end removed from the stub folder (python build.py {b.build_flag} adds it back)")


def inputs_digest(wheel: Path, python: Path) -> str:
    h = hashlib.sha256()
    h.update(str(python).encode())
    h.update((stub_site(python.parents[1]) / ".bundle-stub-env").read_bytes())
    for p in sorted((ROOT / "buildsys").glob("*")):
        if p.is_file():
            h.update(p.read_bytes())
    for p in sorted((ROOT / "runtime").rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    for p in sorted((ROOT / "build_hooks").glob("*.py")):
        h.update(p.read_bytes())
    h.update(wheel.name.encode())
    h.update(json.dumps(WEB_VENDOR, sort_keys=True).encode())
    h.update(str(wheel.stat().st_size).encode())
    import PyInstaller

    h.update(PyInstaller.__version__.encode())
    return h.hexdigest()


def stub_requirements() -> list[str]:
    """STUB_REQUIREMENTS at the versions installed here, and everything they pull in pinned the
    same way (a constraints list of this environment)."""
    from importlib import metadata

    pins = []
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() not in ("bundle", "llama_cpp_python", "llama-cpp-python"):
            pins.append(f"{name}=={dist.version}")
    return sorted(set(pins), key=str.lower)


def stub_site(prefix: Path) -> Path:
    """The portable interpreter's own site folder (Debian's CPython calls it dist-packages)."""
    from buildsys.python import python_env

    out = subprocess.run([str(prefix / "bin" / "python3.11"), "-c", "import site; print(site.getsitepackages()[-1])"],
                         capture_output=True, text=True, check=True, env=python_env(prefix)).stdout.strip()
    site = Path(out)
    if prefix not in site.parents:
        sys.exit(f"the portable CPython's site folder {site} is outside its prefix {prefix}")
    site.mkdir(parents=True, exist_ok=True)
    return site


def ensure_stub_python(wheel: Path) -> Path:
    """The portable CPython with the stub's Python side installed: PyInstaller (with the
    bootloader built here), the runtime's dependencies, llama_cpp's Python modules. Returns its
    interpreter."""
    from buildsys import bootloader, python

    prefix = python.build(cache_dir(), os.cpu_count() or 2)
    import PyInstaller

    run = bootloader.build(cache_dir(), PyInstaller.__version__)
    site = stub_site(prefix)
    pins = stub_requirements()
    wanted = [p for p in pins if p.split("==")[0].lower() in STUB_REQUIREMENTS]
    marker = site / ".bundle-stub-env"
    digest = hashlib.sha256("\n".join([*pins, wheel.name, str(wheel.stat().st_size),
                                       hashlib.sha256(run.read_bytes()).hexdigest()]).encode()).hexdigest()
    if marker.exists() and marker.read_text() == digest:
        return prefix / "bin" / "python3.11"
    log("stub Python: installing " + ", ".join(wanted) + f" ({WHEEL_PLATFORM} wheels)")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(site),
                        "--platform", WHEEL_PLATFORM, "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "--only-binary=:all:", "-c", str(constraints), *wanted], check=True)
    # llama_cpp's Python modules only: its native libraries travel in the payload (docs/facts.md #6)
    shutil.rmtree(site / "llama_cpp", ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("llama_cpp/") and name.endswith(".py"):
                z.extract(name, site)
    target = site / "PyInstaller" / "bootloader" / "Linux-64bit-intel" / "run"
    shutil.copy2(run, target)
    marker.write_text(digest)
    return prefix / "bin" / "python3.11"


def pyinstaller_args(web_vendor: Path, name: str, native_path=str, strip: bool = True) -> list[str]:
    """PyInstaller's arguments for the stub, the same for every target; native_path turns a
    path of this machine into one the target's PyInstaller reads (wine's Z: drive)."""
    sep = ";" if native_path is not str else os.pathsep
    p = native_path
    args = [
        p(ROOT / "runtime" / "__main__.py"),
        # --strip: the bootloader unpacks the archive at every launch, and symbols are most of
        # libpython (23 -> 6 MiB) and of zstandard's extension (12 -> 1 MiB). (ELF only.)
        "--onefile", *(["--strip"] if strip else []), "--name", name, "--noconfirm", "--clean",
        "--log-level", "WARN", "--paths", p(ROOT),
        "--additional-hooks-dir", p(ROOT / "build_hooks"),
        "--runtime-hook", p(ROOT / "build_hooks" / "rth_bundle_signals.py"),
        "--runtime-hook", p(ROOT / "build_hooks" / "rth_bundle_tmpdir.py"),
        "--hidden-import", "runtime.app", "--hidden-import", "llama_cpp.llama_cpp",
        "--hidden-import", "jinja2.ext", "--hidden-import", "zstandard.backend_c",
        "--hidden-import", "llama_cpp.llama_grammar",  # JSON schema -> GBNF (structured output)
        "--hidden-import", "runtime.server", "--hidden-import", "runtime.modes",
        "--hidden-import", "uvicorn.protocols.http.h11_impl", "--hidden-import", "uvicorn.loops.asyncio",
        "--hidden-import", "uvicorn.lifespan.off",
        "--add-data", f"{p(ROOT / 'runtime' / 'web')}{sep}runtime/web",
        "--add-data", f"{p(web_vendor)}{sep}runtime/web/vendor",
    ]
    for mod in EXCLUDES:
        args += ["--exclude-module", mod]
    return args


def run_pyinstaller(out_dir: Path, web_vendor: Path, python: Path) -> Path:
    work = Path(tempfile.mkdtemp(prefix="bundle-pyi-"))
    try:
        args = [*pyinstaller_args(web_vendor, STUB_NAME),
                "--distpath", str(work / "dist"), "--workpath", str(work / "build"), "--specpath", str(work)]
        from buildsys.python import python_env

        subprocess.run([str(python), "-m", "PyInstaller", *args], check=True, env=python_env(python.parents[1]),
                       cwd=work)
        built = work / "dist" / STUB_NAME
        final = out_dir / STUB_NAME
        tmp = out_dir / (STUB_NAME + ".tmp")
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


def build_windows(force: bool) -> int:
    """stubs/windows-x86_64/: the Windows stub, built here (buildsys/windows.py)."""
    from buildsys import windows

    out_dir = ROOT / "stubs" / windows.TARGET
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir()
    t0 = time.time()
    libs = windows.ensure_llama(cache, LLAMA_CPP_PYTHON, os.cpu_count() or 2, run_with_progress)
    web_vendor = ensure_web_vendor()
    pydir = windows.ensure_python(cache)
    pins = stub_requirements()
    wanted = [p for p in pins if p.split("==")[0].lower() in STUB_REQUIREMENTS]
    site_digest = windows.ensure_site(pydir, pins, wanted, windows.llama_python_files(cache, LLAMA_CPP_PYTHON))
    h = hashlib.sha256()
    h.update(site_digest.encode())
    h.update(libs.name.encode())
    h.update(json.dumps(WEB_VENDOR, sort_keys=True).encode())
    for folder in ("runtime", "buildsys", "build_hooks"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode())
                h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    digest = h.hexdigest()
    meta_path = out_dir / "stub.json"
    stub_name = windows.STUB_NAME
    if not force and meta_path.exists() and (out_dir / stub_name).exists() and (out_dir / NATIVE_NAME).exists():
        if json.loads(meta_path.read_text()).get("inputs") == digest:
            log(f"Windows stub up to date: {out_dir / stub_name}")
            return 0
    files = windows.native_files(libs)
    if "msvcrt.dll" not in windows.dll_imports(libs / "libllama.dll"):
        # runtime/engine.py hands libllama a FILE* from msvcrt.dll: both must share that C runtime
        sys.exit(f"{libs / 'libllama.dll'} does not use msvcrt.dll (a UCRT toolchain?); runtime/engine.py must "
                 "open the model with the C runtime libllama uses")
    native = pack_native(files, out_dir / NATIVE_NAME)
    log(f"Windows native libraries: {len(files)} files, {native['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{native['size'] / 2**20:.1f} MiB zstd ({', '.join(native['cpu_variants'])})")
    env = windows.ensure_wine(cache / "wine-prefix")
    try:
        version = windows.python_version(pydir, env)
        log("running PyInstaller under wine")
        stub = windows.run_pyinstaller(pydir, env, pyinstaller_args(web_vendor, stub_name.removesuffix(".exe"),
                                                                    windows.to_windows_path, strip=False),
                                       out_dir, cache)
    finally:
        windows.stop_wine(env)
    meta = stub_meta(windows.TARGET, stub, windows.FLAGS, version, native, digest,
                     toolchain=windows.toolchain_identity(), windows_min=windows.WINDOWS_MIN)
    write_meta(meta_path, meta)
    log(f"Windows stub: {stub} ({stub.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.0f} s")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="Build the bundle runtime stub for this platform.")
    ap.add_argument("--target", choices=[TARGET, "windows-x86_64"], default=TARGET,
                    help=f"the platform of the stub (default {TARGET}); windows-x86_64 is built here "
                         "with MinGW and wine")
    ap.add_argument("--force", action="store_true", help="rebuild the stub even if nothing changed")
    ap.add_argument("--cuda", action="store_true", help="also build the CUDA back end (CUDA 13 from PyPI)")
    ap.add_argument("--vulkan", action="store_true",
                    help="also build the Vulkan back end (AMD, Intel and NVIDIA GPUs; glslc and libvulkan-dev from Debian)")
    ap.add_argument("--cuda-archs", default=os.environ.get("BUNDLE_CUDA_ARCHS", CUDA_ARCHITECTURES),
                    help=f"CMAKE_CUDA_ARCHITECTURES (default {CUDA_ARCHITECTURES})")
    args = ap.parse_args()
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        sys.exit(f"build.py builds stubs on {TARGET} only; this is {sys.platform}/{os.uname().machine}")
    if args.target != TARGET:
        if args.cuda or args.vulkan:
            sys.exit(f"--{'cuda' if args.cuda else 'vulkan'}: the Windows stub has no GPU back end yet")
        return build_windows(args.force)
    out_dir = ROOT / "stubs" / TARGET
    out_dir.mkdir(parents=True, exist_ok=True)

    # The two long compiles run side by side: their configure steps are serial, so together they
    # keep both cores busier than one after the other (fresh machine: about 35 minutes).
    from concurrent.futures import ThreadPoolExecutor

    from buildsys import python as portable_python

    with ThreadPoolExecutor(1) as pool:
        cpython = pool.submit(portable_python.build, cache_dir(), os.cpu_count() or 2)
        wheel = ensure_wheel(LLAMA_CPP_PYTHON, CPU_FLAGS)
        cpython.result()
    ensure_installed(wheel)

    web_vendor = ensure_web_vendor()
    python = ensure_stub_python(wheel)
    meta_path = out_dir / "stub.json"
    digest = inputs_digest(wheel, python)
    if not args.force and meta_path.exists() and (out_dir / STUB_NAME).exists() and (out_dir / NATIVE_NAME).exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("inputs") == digest:
            log(f"stub up to date: {out_dir / STUB_NAME}")
            sync_gpu(out_dir, meta, args)
            return 0

    t0 = time.time()
    files = native_files(wheel)
    native = pack_native(files, out_dir / NATIVE_NAME)
    log(f"native libraries: {len(files)} files, {native['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{native['size'] / 2**20:.1f} MiB zstd ({', '.join(native['cpu_variants'])})")
    log("running PyInstaller")
    stub = run_pyinstaller(out_dir, web_vendor, python)
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        libs = []
        for name, data in files.items():
            p = tmpdir / name
            p.write_bytes(data)
            libs.append(p)
        libs += archive_binaries(stub, tmpdir)
        glibc = check_portable([stub] + libs)
    from buildsys.python import python_env

    version = subprocess.run([str(python), "-c", "import platform; print(platform.python_version())"],
                             capture_output=True, text=True, check=True, env=python_env(python.parents[1])).stdout.strip()
    meta = stub_meta(TARGET, stub, CPU_FLAGS, version, native, digest, glibc_min=glibc)
    for b in GPU_BACKENDS:  # a stale GPU blob would not match this stub's record
        (out_dir / b.stub_file).unlink(missing_ok=True)
    write_meta(meta_path, meta)
    log(f"stub: {stub} ({stub.stat().st_size / 2**20:.1f} MiB, needs glibc >= {glibc}) in {time.time() - t0:.0f} s")
    sync_gpu(out_dir, meta, args)
    return 0


def llama_architectures(version: str = LLAMA_CPP_PYTHON) -> list[str]:
    """The model architectures the vendored llama.cpp loads (LLM_ARCH_NAMES in src/llama-arch.cpp),
    for `bundle build` to refuse a model that would build and then not load. Read from the
    sdist once, cached."""
    cached = cache_dir() / f"llama-architectures-{version}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fetch_sdist(f"llama-cpp-python=={version}", Path(tmp), "llama_cpp_python-*.tar.gz")) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("vendor/llama.cpp/src/llama-arch.cpp"))
            text = tar.extractfile(member).read().decode("utf-8")
    table = text.split("LLM_ARCH_NAMES = {", 1)[1].split("};", 1)[0]
    names = sorted({name for key, name in re.findall(r'\{\s*LLM_ARCH_(\w+)\s*,\s*"([^"]+)"', table)
                    if key not in ("CLIP", "UNKNOWN")})  # clip: a placeholder for llama-quantize
    if len(names) < 20:
        sys.exit(f"llama-arch.cpp of llama-cpp-python {version}: found only {len(names)} architectures")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = cached.with_suffix(".tmp")
    tmp_file.write_text(json.dumps(names))
    os.replace(tmp_file, cached)
    return names


def stub_meta(target: str, stub: Path, flags: list[str], python_version: str, native: dict, inputs: str,
              **extra) -> dict:
    """stub.json's record of a stub, the same keys for every target (plus extra)."""
    import PyInstaller

    from runtime import __version__ as runtime_version
    from runtime.payload import FORMAT_VERSION

    return {
        "target": target,
        "stub": stub.name,
        "stub_sha256": hashlib.sha256(stub.read_bytes()).hexdigest(),
        "stub_size": stub.stat().st_size,
        "runtime_version": runtime_version,
        "format_version": FORMAT_VERSION,
        "llama_cpp_python": LLAMA_CPP_PYTHON,
        "build_flags": flags,
        "python": python_version,
        "pyinstaller": PyInstaller.__version__,
        "architectures": llama_architectures(),
        **extra,
        "native": {"cpu": native},
        "inputs": inputs,
    }


def write_meta(path: Path, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
