"""An unwinder for glibc 2.17 under a name of its own, made from LLVM's libunwind (the copy
inside zig), for the stub's Rust extension modules.

Extension modules written in Rust (the `blake3` wheel) link libgcc_s.so.1 for its unwinder
(`_Unwind_*`, versioned GCC_3.0 / GCC_3.3 / GCC_4.2.0). manylinux counts that library as part
of the system, and PyInstaller would copy this machine's, which needs a newer glibc than the
stub's floor. A stand-in named libgcc_s.so.1 would be worse: once in the process it would be the
libgcc_s of every library loaded later (a GPU driver, Mesa's LLVM), which need far more of
libgcc_s than an unwinder (measured: lavapipe no longer loaded). So the unwinder is built as
libgcc_b.so.1 (the same symbols under the same versions, needing nothing but glibc), and the
extension's dynamic string "libgcc_s.so.1" (its DT_NEEDED and its version requirement's file)
is rewritten to that name, same length, in place: the system's libgcc_s stays the one everything
else finds. It also exports __gcc_personality_v0, as libgcc_s does.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from buildsys import zig

SYSTEM_NAME = b"libgcc_s.so.1"
SONAME = "libgcc_b.so.1"  # the same length as SYSTEM_NAME: the rename is done in place
VERSIONS = """\
GCC_3.0 {
  global:
    _Unwind_DeleteException; _Unwind_FindEnclosingFunction; _Unwind_ForcedUnwind; _Unwind_GetDataRelBase;
    _Unwind_GetGR; _Unwind_GetIP; _Unwind_GetLanguageSpecificData; _Unwind_GetRegionStart;
    _Unwind_GetTextRelBase; _Unwind_RaiseException; _Unwind_Resume; _Unwind_SetGR; _Unwind_SetIP;
  local: *;
};
GCC_3.3 { global: _Unwind_Backtrace; _Unwind_GetCFA; _Unwind_Resume_or_Rethrow; } GCC_3.0;
GCC_3.3.1 { global: __gcc_personality_v0; } GCC_3.3;
GCC_4.2.0 { global: _Unwind_GetIPInfo; } GCC_3.3.1;
"""
SOURCES = {  # libunwind's file: how it is compiled
    "libunwind.cpp": ["-std=c++17", "-fno-exceptions", "-fno-rtti"],
    "UnwindLevel1.c": ["-std=c99"],
    "UnwindLevel1-gcc-ext.c": ["-std=c99"],
    "gcc_personality_v0.c": ["-std=c99"],
    "UnwindRegistersSave.S": [],
    "UnwindRegistersRestore.S": [],
}


def build(cache: Path, triple: str, log=print) -> Path:
    """libgcc_s.so.1 for triple (e.g. x86_64-linux-gnu.2.17), built once and cached."""
    exe = zig.zig_exe()
    src = exe.parent / "lib" / "libunwind"
    key = hashlib.sha256("\n".join([*zig.identity(triple), VERSIONS, repr(SOURCES)]).encode()).hexdigest()[:12]
    out = cache / f"unwinder-{triple}-{key}" / SONAME
    if out.exists():
        return out
    log(f"{SONAME} (an unwinder) for {triple}: building it from zig's libunwind")
    common = ["-target", triple, "-fPIC", "-O2", "-funwind-tables", "-D_LIBUNWIND_IS_NATIVE_ONLY",
              "-D_LIBUNWIND_DISABLE_VISIBILITY_ANNOTATIONS", f"-I{src / 'include'}"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        objects = []
        for name, flags in SOURCES.items():
            obj = work / (name + ".o")
            tool = "c++" if name.endswith(".cpp") else "cc"
            subprocess.run([str(exe), tool, *common, *flags, "-c", str(src / "src" / name), "-o", str(obj)],
                           check=True)
            objects.append(str(obj))
        (work / "versions.map").write_text(VERSIONS)
        lib = work / SONAME
        subprocess.run([str(exe), "cc", "-target", triple, "-shared", "-nostdlib++", f"-Wl,-soname,{SONAME}",
                        f"-Wl,--version-script={work / 'versions.map'}", "-o", str(lib), *objects], check=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        shutil.copy2(lib, tmp_out)
        tmp_out.replace(out)
    return out


def dynstr_span(data: bytes) -> tuple[int, int] | None:
    """(offset, size) of an ELF64 little-endian file's .dynstr section, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        end = data.index(b"\0", names_at + name)
        if data[names_at + name:end] == b".dynstr":
            return offset, size
    return None


def use_own_unwinder(path: Path) -> bool:
    """Make an extension module need SONAME instead of libgcc_s.so.1 (its dynamic string table
    rewritten in place). True when it did need libgcc_s.so.1."""
    data = bytearray(path.read_bytes())
    span = dynstr_span(bytes(data))
    if span is None:
        return False
    offset, size = span
    table = bytes(data[offset:offset + size])
    old, new = b"\0" + SYSTEM_NAME + b"\0", b"\0" + SONAME.encode() + b"\0"
    if old not in table:
        return False
    data[offset:offset + size] = table.replace(old, new)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(bytes(data))
    tmp.chmod(path.stat().st_mode)
    tmp.replace(path)
    return True


def install(site: Path, libdir: Path, cache: Path, triple: str, log=print) -> list[str]:
    """Every extension module under site that needs libgcc_s.so.1 made to need this unwinder, and
    the unwinder put in libdir (the interpreter's library path, where PyInstaller finds it).
    Returns the modules changed now (none when they were changed before)."""
    changed = [str(p.relative_to(site)) for p in sorted(site.rglob("*.so")) if use_own_unwinder(p)]
    needs = changed or [p for p in site.rglob("*.so") if SONAME.encode() in p.read_bytes()[:1 << 20]]
    stale = libdir / SYSTEM_NAME.decode()
    if stale.exists() and not stale.is_symlink():  # a stand-in from before, under the system's name
        stale.unlink()
    if needs:
        shutil.copy2(build(cache, triple, log), libdir / SONAME)
    return changed
