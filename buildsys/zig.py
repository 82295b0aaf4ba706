"""zig as a cross compiler to an old glibc (issue 9), for every Linux target (x86-64, aarch64).

`zig cc -target x86_64-linux-gnu.2.17` links against the symbol versions of glibc 2.17 and, for
C++, against a static libc++, so what it builds needs nothing from the system but glibc 2.17 or
newer; `-target aarch64-linux-gnu.2.17` does the same for ARM. zig comes from PyPI (the `ziglang`
wheel); the compilers are small shell wrappers, one folder of them per target, since build
systems (CMake, configure, waf) want one executable per compiler.
"""

from __future__ import annotations

import os
from pathlib import Path

ZIG_VERSION = "0.17.0"
GLIBC_FLOOR = "2.17"
TRIPLE = f"x86_64-linux-gnu.{GLIBC_FLOOR}"
# What every build keyed on this toolchain records in its cache key.
IDENTITY = [f"zig={ZIG_VERSION}", f"target={TRIPLE}"]

# GCC's `-march=armv8.2-a+dotprod+fp16` (what ggml's CMake asks for each ARM CPU variant) in
# zig's words: zig reads -march as a CPU name, and takes the architecture and its extensions as
# `-mcpu=generic+v8_2a+dotprod+fullfp16`.
_ARM_MARCH = r'''
case " $* " in *" -march=armv"*)
a=; for x in "$@"; do case "$x" in
  -march=armv*) x=${x#-march=armv}; base=${x%%+*}; ext=; [ "$base" = "$x" ] || ext=+${x#*+}
    case "$base" in 8-a) base=;; *) base=+v$(echo "${base%-a}" | tr . _)a;; esac
    x=-mcpu=generic$base$(echo "$ext" | sed 's/+fp16/+fullfp16/g; s/+no\([a-z0-9]*\)/-\1/g');;
esac; a="$a '$(printf %s "$x" | sed "s/'/'\\\\''/g")'"; done
eval "set -- $a";;
esac
'''


def identity(triple: str = TRIPLE) -> list[str]:
    return [f"zig={ZIG_VERSION}", f"target={triple}"]


def zig_exe() -> Path:
    try:
        import ziglang
    except ImportError:
        raise SystemExit("the ziglang package is missing; run `make venv` (pip install -e '.[build]')") from None
    exe = Path(ziglang.__file__).parent / "zig"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing; reinstall ziglang=={ZIG_VERSION}")
    return exe


def tools_folder(cache: Path, triple: str = TRIPLE) -> Path:
    """Where the wrappers for triple live (x86-64's keep their first name)."""
    return cache / ("zig-tools" if triple == TRIPLE else f"zig-tools-{triple.split('-')[0]}")


def wrappers(folder: Path, triple: str = TRIPLE) -> dict[str, Path]:
    """cc, c++, ar and ranlib for triple, written once into folder; returns their paths."""
    zig = zig_exe()
    folder.mkdir(parents=True, exist_ok=True)
    # zig rejects a glibc version in the triple when the input is stdin (`cc -dM -E -`, which
    # waf runs to identify the compiler); the macros it prints do not depend on the version.
    pick = (f't={triple}\nfor a in "$@"; do [ "$a" = - ] && t={triple.rsplit(".", 2)[0]}; done\n')
    if triple.startswith("aarch64"):
        pick += _ARM_MARCH
    tools = {
        "cc": (pick, 'cc -target "$t"'),
        "c++": (pick, 'c++ -target "$t"'),
        "ar": ("", "ar"),
        "ranlib": ("", "ranlib"),
    }
    out = {}
    for name, (pre, sub) in tools.items():
        path = folder / f"zig-{name}"
        text = f"#!/bin/sh\n{pre}exec '{zig}' {sub} \"$@\"\n"
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            os.replace(tmp, path)
        out[name] = path
    return out


def env(folder: Path, base: dict | None = None, triple: str = TRIPLE) -> dict:
    """An environment whose CC/CXX/AR/RANLIB are the zig wrappers (for configure and waf)."""
    tools = wrappers(folder, triple)
    out = dict(os.environ if base is None else base)
    out.update(CC=str(tools["cc"]), CXX=str(tools["c++"]), AR=str(tools["ar"]), RANLIB=str(tools["ranlib"]))
    return out


def cmake_args(folder: Path, triple: str = TRIPLE) -> list[str]:
    tools = wrappers(folder, triple)
    args = [f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['c++']}",
            f"-DCMAKE_AR={tools['ar']}", f"-DCMAKE_RANLIB={tools['ranlib']}"]
    machine = triple.split("-")[0]
    if machine != os.uname().machine:  # a cross build: CMake must not take this machine's processor
        args += ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={machine}"]
    return args
