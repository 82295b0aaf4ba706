"""A CPython for the stub that needs nothing but glibc 2.17 (issue 9).

The Python that runs build.py was built against this machine's glibc (2.36), and PyInstaller
copies that interpreter, its standard-library extensions and the system libraries they link
(libz, libffi, libssl, libcrypto, liblzma) into every stub. Instead, CPython 3.11 and the
libraries its needed extensions use (zlib, libffi, OpenSSL) are compiled here from Debian's
source packages with zig for glibc 2.17 (buildsys/zig.py), the libraries statically, into a
prefix cached under ~/.cache/bundle/build/. The stub's Python side (PyInstaller, the runtime's
dependencies, llama_cpp's Python code) is then installed into that prefix from manylinux2014
wheels (glibc 2.17) and PyInstaller runs with it.

Sources come from Debian's bookworm suite through a private apt configuration (the machine's
own sources are never edited), unpacked with dpkg-source so Debian's security patches apply.
Modules the runtime never uses are not built (sqlite3, tkinter, curses, readline, dbm, lzma,
bz2, uuid, decimal's libmpdec is bundled and excluded from the stub anyway).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import zig
from .console import log

# Bump when the recipe below changes in a way the cache key would not see.
RECIPE = "3"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = {"zlib": "zlib", "libffi": "libffi", "openssl": "openssl", "python": "python3.11"}
PYTHON_CONFIGURE = ["--enable-shared", "--without-ensurepip", "--disable-test-modules",
                    "--with-lto=no", "--without-doc-strings"]
OPENSSL_CONFIGURE = ["linux-x86_64", "no-shared", "no-tests", "no-ui-console", "no-comp", "no-legacy",
                     "-fPIC"]
FFI_CONFIGURE = ["--disable-shared", "--enable-static", "--with-pic", "--disable-docs",
                 "--disable-multi-os-directory", "--disable-exec-static-tramp"]
CFLAGS = "-O2 -fPIC -Wno-date-time"


# A CPython for another machine (aarch64) is cross-compiled: configure is told the machine it
# builds for and what it cannot find out without running a program there, and the Python that
# runs build.py (the same 3.11) runs CPython's own build scripts.
CROSS_SITE = "ac_cv_file__dev_ptmx=yes\nac_cv_file__dev_ptc=no\nac_cv_buggy_getaddrinfo=no\n"
OPENSSL_TARGETS = {"x86_64": "linux-x86_64", "aarch64": "linux-aarch64"}
# Binutils that can strip an ELF of each machine (PyInstaller's --strip cannot run where the
# stub of another machine is analysed).
STRIP = {"aarch64": "aarch64-linux-gnu-strip"}


def _machine(triple: str) -> str:
    return triple.split("-")[0]


def _cross(triple: str) -> bool:
    return _machine(triple) != os.uname().machine


def key(triple: str = zig.TRIPLE) -> str:
    parts = [RECIPE, zig.identity(triple), DEBIAN_SUITE, PACKAGES, PYTHON_CONFIGURE, OPENSSL_CONFIGURE,
             FFI_CONFIGURE, CFLAGS]
    if _cross(triple):
        parts += [CROSS_SITE, OPENSSL_TARGETS[_machine(triple)], STRIP.get(_machine(triple))]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]


def _run(cmd: list[str], cwd: Path, env: dict, logfile: Path, what: str) -> None:
    with open(logfile, "a") as out:
        out.write(f"\n$ {' '.join(cmd)}  (in {cwd})\n")
        out.flush()
        rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = logfile.read_text(errors="replace").splitlines()[-30:]
        sys.exit("\n".join(tail) + f"\n{what} failed (exit {rc}); full log: {logfile}")


def fetch_sources(dest: Path, logfile: Path, names: list[str]) -> dict[str, Path]:
    """Debian source packages, unpacked with their patches: {name: source folder}."""
    for tool in ("apt-get", "dpkg-source"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is needed to fetch Debian's source packages; install dpkg-dev (make buildtools)")
    apt = dest / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "etc"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "etc" / "sources.list").write_text(
        f"deb-src [signed-by={DEBIAN_KEYRING}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n")
    opts = [f"-oDir::Etc::SourceList={apt}/etc/sources.list", "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={apt}/lists", f"-oDir::Cache={apt}/cache", "-oDebug::NoLocking=1",
            "-oAPT::Sandbox::User=root"]
    env = dict(os.environ, LC_ALL="C")
    _run(["apt-get", *opts, "-q", "update"], dest, env, logfile, "apt-get update (Debian sources)")
    dl = dest / "dl"
    dl.mkdir(exist_ok=True)
    _run(["apt-get", *opts, "-q", "source", "--download-only", *(PACKAGES[n] for n in names)], dl, env, logfile,
         "apt-get source")
    out = {}
    for name in names:
        pkg = PACKAGES[name]
        dsc = sorted(dl.glob(f"{pkg}_*.dsc"))
        if not dsc:
            sys.exit(f"Debian source package {pkg} was not downloaded; see {logfile}")
        folder = dest / name
        _run(["dpkg-source", "--no-check", "-x", str(dsc[-1]), str(folder)], dest, env, logfile,
             f"dpkg-source -x {dsc[-1].name}")
        out[name] = folder
    shutil.rmtree(apt, ignore_errors=True)
    return out


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        sys.exit(f"cannot adapt {path} for zig ({old!r} not found); the source changed, update buildsys/python.py")
    path.write_text(text.replace(old, new))


def _build_deps(cache: Path, jobs: int, env: dict, logfile: Path, triple: str) -> Path:
    """zlib, libffi and OpenSSL as static libraries with headers, in a prefix of their own
    (cached apart from CPython, so a failed CPython step does not rebuild them)."""
    deps = cache / f"portable-deps-{key(triple)}"
    if (deps / ".complete").exists():
        return deps
    # Installed straight into its final place (the .pc files and libtool archives record the
    # prefix); it counts only once .complete is written.
    shutil.rmtree(deps, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".work-deps-", dir=cache))
    try:
        out = deps
        env = dict(env, PKG_CONFIG_LIBDIR=str(out / "lib" / "pkgconfig"))
        log("portable CPython: fetching Debian's sources (openssl, libffi, zlib)")
        src = fetch_sources(work / "src", logfile, ["zlib", "libffi", "openssl"])
        make = ["make", f"-j{jobs}"]
        log("portable CPython: zlib (static)")
        _run(["./configure", "--static", f"--prefix={out}"], src["zlib"], env, logfile, "zlib configure")
        _run([*make, "install"], src["zlib"], env, logfile, "zlib")
        log("portable CPython: libffi (static)")
        host = [f"--host={_machine(triple)}-linux-gnu", "--build=x86_64-pc-linux-gnu"] if _cross(triple) else []
        _run(["./configure", f"--prefix={out}", *FFI_CONFIGURE, *host], src["libffi"], env, logfile,
             "libffi configure")
        _run([*make, "install"], src["libffi"], env, logfile, "libffi")
        log("portable CPython: OpenSSL (static; a few minutes)")
        # the first word names the machine
        _run(["perl", "./Configure", OPENSSL_TARGETS[_machine(triple)], *OPENSSL_CONFIGURE[1:], f"--prefix={out}", "--libdir=lib",
              "--openssldir=/usr/lib/ssl"], src["openssl"], env, logfile, "OpenSSL Configure")
        _run([*make, "build_libs"], src["openssl"], env, logfile, "OpenSSL")
        _run(["make", "install_dev"], src["openssl"], env, logfile, "OpenSSL install")
        (deps / ".complete").write_text("")
        return deps
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(cache: Path, jobs: int, triple: str = zig.TRIPLE, runner: list[str] | None = None) -> Path:
    """The prefix holding bin/python3.11 for triple's machine (cached); built in about 15 minutes
    on 2 cores. runner: the command that runs a program of that machine here (qemu), when it
    is not this one's."""
    prefix = cache / f"portable-python-3.11-{key(triple)}"
    if (prefix / ".complete").exists():
        log(f"portable CPython ({_machine(triple)}): cached ({prefix})")
        return prefix
    cache.mkdir(parents=True, exist_ok=True)
    logfile = cache / f"portable-python-{key(triple)}.log"
    logfile.write_text("")
    env = zig.env(zig.tools_folder(cache, triple), triple=triple)
    env.update(CFLAGS=CFLAGS, CXXFLAGS=CFLAGS, LC_ALL="C", PKG_CONFIG_PATH="")
    deps = _build_deps(cache, jobs, env, logfile, triple)
    env["PKG_CONFIG_LIBDIR"] = str(deps / "lib" / "pkgconfig")
    work = Path(tempfile.mkdtemp(prefix=".work-python-", dir=cache))
    try:
        py = work / "prefix"
        log("portable CPython: fetching Debian's source (python3.11)")
        cpy = fetch_sources(work / "src", logfile, ["python"])["python"]
        log("portable CPython: CPython 3.11 (about 8 minutes)")
        # Debian's multiarch paths would put this machine's glibc headers before zig's.
        _patch(cpy / "setup.py", "        self.add_multiarch_paths()\n", "        pass  # no multiarch: zig's libc\n")
        # zig's linker spells the soname option out.
        _patch(cpy / "Makefile.pre.in", "-Wl,-h$(INSTSONAME)", "-Wl,-soname,$(INSTSONAME)")
        # Debian's security backport in pyexpat.c includes an internal header without saying
        # it is a core module (Debian itself builds it another way).
        expat = cpy / "Modules" / "pyexpat.c"
        if '"pycore_ceval.h"' in expat.read_text() and "Py_BUILD_CORE_MODULE" not in expat.read_text():
            expat.write_text("#ifndef Py_BUILD_CORE_BUILTIN\n#  define Py_BUILD_CORE_MODULE 1\n#endif\n"
                             + expat.read_text())
        cenv = dict(env, CPPFLAGS=f"-I{deps}/include", LDFLAGS=f"-L{deps}/lib")
        cross = []
        if _cross(triple):
            # Debian names the sysconfig data by the multiarch triple alone (its sysconfig.py
            # looks for that name); configure's cross-build line still writes upstream's name.
            _patch(cpy / "configure", "_PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata_$(ABIFLAGS)_$(MACHDEP)_$(MULTIARCH)",
                   "_PYTHON_SYSCONFIGDATA_NAME=_sysconfigdata_$(ABIFLAGS)_$(MULTIARCH)")
            # setup.py would add the include folders the compiler names for its own (for zig
            # reading stdin: this machine's /usr/include, whose glibc headers are not the target's)
            _patch(cpy / "setup.py", "            self.add_cross_compiling_paths()\n",
                   "            pass  # zig finds its own libc headers\n")
            (work / "config.site").write_text(CROSS_SITE)
            cenv["CONFIG_SITE"] = str(work / "config.site")
            cross = [f"--host={_machine(triple)}-linux-gnu", "--build=x86_64-pc-linux-gnu",
                     f"--with-build-python={build_python()}"]
        _run(["./configure", f"--prefix={py}", f"--with-openssl={deps}", *PYTHON_CONFIGURE, *cross], cpy, cenv,
             logfile, "CPython configure")
        # No libpython3.so (the stable-ABI forwarder): nothing here links against it, and zig
        # cannot link a library made of nothing but another library.
        _run(["make", f"-j{jobs}", "PY3LIBRARY="], cpy, cenv, logfile, "CPython")
        _run(["make", "install", "PY3LIBRARY="], cpy, cenv, logfile, "CPython install")
        if _cross(triple):
            strip(py, _machine(triple))
        missing = check_modules(py, runner)
        if missing:
            sys.exit(f"the portable CPython lacks {', '.join(missing)}; see {logfile}")
        (py / ".complete").write_text("")
        if prefix.exists():
            shutil.rmtree(prefix)
        os.replace(py, prefix)
        log(f"portable CPython: {prefix}")
        return prefix
    finally:
        shutil.rmtree(work, ignore_errors=True)


# The stub imports these (directly or through uvicorn, jinja2, tarfile, hashlib, PyInstaller).
NEEDED_MODULES = ["zlib", "_ctypes", "_ssl", "_hashlib", "_json", "_struct", "select", "_socket", "_asyncio",
                  "binascii", "math", "_posixsubprocess", "fcntl", "mmap", "_queue", "_contextvars", "unicodedata",
                  "_sha256", "_blake2", "pyexpat", "array", "_random", "_bisect", "_heapq", "_pickle", "_datetime"]


def python_env(prefix: Path, base: dict | None = None) -> dict:
    """The environment to run the portable interpreter in: its libpython from its own prefix
    (no RPATH is baked in), nothing of the calling virtualenv."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["LD_LIBRARY_PATH"] = str(prefix / "lib")
    env["PYTHONNOUSERSITE"] = "1"
    return env


def build_python() -> str:
    """The Python 3.11 that runs a cross build's scripts (this one, when it is 3.11)."""
    if sys.version_info[:2] == (3, 11):  # the interpreter itself, not a virtualenv's (its include folder)
        return getattr(sys, "_base_executable", sys.executable)
    found = shutil.which("python3.11")
    if not found:
        sys.exit("cross-compiling CPython 3.11 needs a Python 3.11 here (python3.11)")
    return found


def strip(prefix: Path, machine: str) -> None:
    """Strip the interpreter and every shared library of a prefix for another machine (the
    symbols are most of libpython, and PyInstaller's --strip only knows this machine's)."""
    tool = shutil.which(STRIP[machine])
    if not tool:
        sys.exit(f"{STRIP[machine]} is needed to strip the {machine} CPython; install binutils-{machine}-linux-gnu "
                 "(make buildtools-aarch64)")
    files = [p for p in prefix.rglob("*") if p.is_file() and not p.is_symlink()
             and (p.suffix == ".so" or ".so." in p.name or p.parent.name == "bin")]
    elfs = [str(p) for p in files if p.read_bytes()[:4] == b"\x7fELF"]
    subprocess.run([tool, "--strip-unneeded", *elfs], check=True)


def check_modules(prefix: Path, runner: list[str] | None = None) -> list[str]:
    python = prefix / "bin" / "python3.11"
    code = ("import importlib,sys\nbad=[]\nfor m in sys.argv[1:]:\n try: importlib.import_module(m)\n"
            " except Exception as e: bad.append(f'{m} ({e})')\nprint('\\n'.join(bad))")
    out = subprocess.run([*(runner or []), str(python), "-c", code, *NEEDED_MODULES], capture_output=True, text=True,
                         env=python_env(prefix))
    if out.returncode != 0:
        return [f"a working interpreter ({out.stderr.strip()[-300:]})"]
    return [line for line in out.stdout.splitlines() if line.strip()]
