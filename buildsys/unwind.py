"""libgcc_s.so.1 for glibc 2.17, made from LLVM's libunwind (the copy inside zig).

Extension modules written in Rust (the `blake3` wheel) link libgcc_s.so.1 for its unwinder
(`_Unwind_*`, versioned GCC_3.0 / GCC_3.3 / GCC_4.2.0). manylinux counts that library as part
of the system, and PyInstaller would copy this machine's, which needs a newer glibc than the
stub's floor. So the stub carries this one instead: the same symbols under the same versions,
built with zig against glibc 2.17 for the stub's machine, needing nothing but glibc. It also
exports __gcc_personality_v0, which glibc looks up (with _Unwind_ForcedUnwind, _Unwind_GetCFA
and _Unwind_Resume) when pthread_cancel or pthread_exit unwinds a thread.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from buildsys import zig

SONAME = "libgcc_s.so.1"
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
    out = cache / f"libgcc_s-{triple}-{key}" / SONAME
    if out.exists():
        return out
    log(f"libgcc_s.so.1 for {triple}: building it from zig's libunwind")
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
