"""The portability check of everything a Linux stub ships: which glibc symbol versions and which
libraries each ELF file needs (readelf), against the only ones allowed from the system."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from . import zig

# glibc's own libraries: the only ones a stub or its native libraries may need from the system.
GLIBC_LIBS = {"libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "ld-linux-x86-64.so.2",
              "ld-linux-aarch64.so.1", "libutil.so.1", "libresolv.so.2"}
# readelf's name for each machine's ELF files
MACHINES = {"x86_64": "Advanced Micro Devices X86-64", "aarch64": "AArch64"}
GLIBC_FLOOR = tuple(int(x) for x in zig.GLIBC_FLOOR.split("."))


def elf_needs(path: Path) -> tuple[tuple[int, int], set[str], str]:
    """(newest GLIBC_x.y symbol version, DT_NEEDED names, machine) of one ELF file, read with
    readelf."""
    try:
        out = subprocess.run(["readelf", "-h", "-V", "-d", "-W", str(path)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        sys.exit("readelf is needed to check the stub's libraries (binutils)")
    versions = [(int(a), int(b)) for a, b in re.findall(r"Name: GLIBC_(\d+)\.(\d+)", out)]
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    machine = re.search(r"Machine:\s+(.+)", out)
    return max(versions, default=(2, 0)), needed, machine.group(1).strip() if machine else "?"


def check_portable(paths: list[Path], system: set[str] = frozenset(), machine: str = "x86_64") -> str:
    """The glibc floor of these ELF files; exits when one is for another machine, needs a newer
    glibc than the floor or a system library other than glibc's own and `system` (each other
    name must be among the files themselves)."""
    own = {p.name for p in paths} | set(system)
    best, problems = (2, 0), []
    for p in paths:
        version, needed, arch = elf_needs(p)
        if arch != MACHINES[machine]:
            problems.append(f"{p.name} is for {arch}, not {MACHINES[machine]}")
        best = max(best, version)
        if version > GLIBC_FLOOR:
            problems.append(f"{p.name} needs GLIBC_{version[0]}.{version[1]}")
        for lib in sorted(needed - GLIBC_LIBS - own):
            problems.append(f"{p.name} needs {lib} from the system")
    if problems:
        sys.exit("the stub would not run on every glibc >= " + zig.GLIBC_FLOOR + ":\n  " + "\n  ".join(problems))
    return f"{best[0]}.{best[1]}"
