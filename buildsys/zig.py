"""zig as a cross compiler to an old glibc (issue 9).

`zig cc -target x86_64-linux-gnu.2.17` links against the symbol versions of glibc 2.17 and, for
C++, against a static libc++, so what it builds needs nothing from the system but glibc 2.17 or
newer. zig comes from PyPI (the `ziglang` wheel); the compilers are small shell wrappers, since
build systems (CMake, configure, waf) want one executable per compiler.
"""

from __future__ import annotations

import os
from pathlib import Path

ZIG_VERSION = "0.17.0"
GLIBC_FLOOR = "2.17"
TRIPLE = f"x86_64-linux-gnu.{GLIBC_FLOOR}"
# What every build keyed on this toolchain records in its cache key.
IDENTITY = [f"zig={ZIG_VERSION}", f"target={TRIPLE}"]


def zig_exe() -> Path:
    try:
        import ziglang
    except ImportError:
        raise SystemExit("the ziglang package is missing; run `make venv` (pip install -e '.[build]')") from None
    exe = Path(ziglang.__file__).parent / "zig"
    if not exe.exists():
        raise SystemExit(f"{exe} is missing; reinstall ziglang=={ZIG_VERSION}")
    return exe


def wrappers(folder: Path) -> dict[str, Path]:
    """cc, c++, ar and ranlib for TRIPLE, written once into folder; returns their paths."""
    zig = zig_exe()
    folder.mkdir(parents=True, exist_ok=True)
    # zig rejects a glibc version in the triple when the input is stdin (`cc -dM -E -`, which
    # waf runs to identify the compiler); the macros it prints do not depend on the version.
    pick = (f't={TRIPLE}\nfor a in "$@"; do [ "$a" = - ] && t={TRIPLE.rsplit(".", 2)[0]}; done\n')
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


def env(folder: Path, base: dict | None = None) -> dict:
    """An environment whose CC/CXX/AR/RANLIB are the zig wrappers (for configure and waf)."""
    tools = wrappers(folder)
    out = dict(os.environ if base is None else base)
    out.update(CC=str(tools["cc"]), CXX=str(tools["c++"]), AR=str(tools["ar"]), RANLIB=str(tools["ranlib"]))
    return out


def cmake_args(folder: Path) -> list[str]:
    tools = wrappers(folder)
    return [f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['c++']}",
            f"-DCMAKE_AR={tools['ar']}", f"-DCMAKE_RANLIB={tools['ranlib']}"]
