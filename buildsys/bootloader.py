"""PyInstaller's one-file bootloader built for the stub (issue 9).

The bootloader in PyInstaller's wheel links the system's libz.so.1, which minimal userlands lack
(exit 127 before a word is printed). It is built here from the same PyInstaller's sdist with zig
for glibc 2.17, with PyInstaller's own bundled zlib linked statically (`--static-zlib`), plus one
source file of ours (bundle_unpack_dir.c: a folder that can hold code when /tmp is noexec).
Two more of ours make it fail cleanly (bundle_archive_guard.c, patched in by PATCHES): a damaged
archive locator is reported instead of looping forever, its first error is one line in the
project's words and exit status 1, SIGXFSZ is ignored, and a failed unpack removes its folder.
Cached by PyInstaller version, toolchain and the digest of those files and patches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import zig
from .console import log
from .cache import apply_patches, fetch_sdist

HERE = Path(__file__).resolve().parent
OURS = [HERE / "bundle_unpack_dir.c", HERE / "bundle_archive_guard.c"]
# (file under bootloader/src, text in PyInstaller's source, what it becomes). Each text must be
# found exactly once: a PyInstaller upgrade that moves one stops the build instead of dropping it.
_LOCATOR_DECL = ("int bundle_locator_sane(FILE *fp, uint64_t cookie_pos, uint32_t pkg_length, uint32_t toc_offset, "
                 "uint32_t toc_length, uint32_t python_version, const char *python_libname);\nint bundle_toc_sane(const struct TOC_ENTRY *toc, uint32_t toc_length, "
                 "uint32_t toc_offset);\n\n")
PATCHES = [
    ("pyi_archive.c", "struct ARCHIVE *\npyi_archive_open(const char *filename)\n",
     _LOCATOR_DECL + "struct ARCHIVE *\npyi_archive_open(const char *filename)\n"),
    ("pyi_archive.c", "    archive_cookie.python_version = pyi_be32toh(archive_cookie.python_version);\n",
     "    archive_cookie.python_version = pyi_be32toh(archive_cookie.python_version);\n"
     "    if (!bundle_locator_sane(archive_fp, cookie_pos, archive_cookie.pkg_length, archive_cookie.toc_offset,\n"
     "                             archive_cookie.toc_length, archive_cookie.python_version,\n"
     "                             archive_cookie.python_libname)) {\n"
     "        free(archive);\n        archive = NULL;\n        goto cleanup;\n    }\n"),
    ("pyi_archive.c", "    /* Check input file is still ok (should be). */\n",
     "    if (!bundle_toc_sane(archive->toc, archive_cookie.toc_length, archive_cookie.toc_offset)) {\n"
     "        free(archive->toc);\n        free(archive);\n        archive = NULL;\n        goto cleanup;\n    }\n"
     "    /* Check input file is still ok (should be). */\n"),
    ("pyi_global_posix.c", "/* Used by PYI_ERROR macro. */\nvoid pyi_error_message(const char *fmt, ...)\n{\n"
     "    va_list args;\n",
     "int bundle_bootloader_errorv(int error_code, const char *fmt, va_list args);\n\n"
     "/* Used by PYI_ERROR macro. */\nvoid pyi_error_message(const char *fmt, ...)\n{\n    va_list args;\n"
     "    va_start(args, fmt);\n    if (bundle_bootloader_errorv(0, fmt, args)) {\n        va_end(args);\n"
     "        return;\n    }\n    va_end(args);\n"),
    ("pyi_global_posix.c", "    va_list args;\n\n    /* Prefix: [PYI-{PID}:{SEVERITY}]. */\n"
     "    ret = snprintf(msg_ptr, buflen, \"[PYI-%d:ERROR] \", getpid());\n",
     "    va_list args;\n\n    va_start(args, fmt);\n    ret = bundle_bootloader_errorv(error_code, fmt, args);\n"
     "    va_end(args);\n    if (ret) {\n        return;\n    }\n\n    /* Prefix: [PYI-{PID}:{SEVERITY}]. */\n"
     "    ret = snprintf(msg_ptr, buflen, \"[PYI-%d:ERROR] \", getpid());\n"),
    ("main.c", "/* Entry point for POSIX */\n",
     "int bundle_exit_status(int status);\n\n/* Entry point for POSIX */\n"),
    ("main.c", "    return pyi_main(global_pyi_ctx);\n}\n\n#endif /* defined(WIN32) */",
     "    return bundle_exit_status(pyi_main(global_pyi_ctx));\n}\n\n#endif /* defined(WIN32) */"),
    ("pyi_main.c", "        PYI_DEBUG(\"LOADER: failed to extract files!\\n\");\n        return -1;\n",
     "        PYI_DEBUG(\"LOADER: failed to extract files!\\n\");\n"
     "        pyi_recursive_rmdir(pyi_ctx->application_home_dir);\n        return -1;\n"),
]


# Where PyInstaller looks for the bootloader of each machine (and where waf writes it).
PLATFORM_DIRS = {"x86_64": "Linux-64bit-intel", "aarch64": "Linux-64bit-arm"}


def build(cache: Path, pyinstaller_version: str, triple: str = zig.TRIPLE) -> Path:
    """The path of the release bootloader (`run`) for triple's machine, cached."""
    digest = hashlib.sha256("|".join([pyinstaller_version, *zig.identity(triple), repr(PATCHES)]).encode()
                            + b"".join(f.read_bytes() for f in OURS)).hexdigest()
    folder = cache / f"pyinstaller-bootloader-{pyinstaller_version}-{digest[:12]}"
    run = folder / "run"
    if run.exists():
        log(f"bootloader: cached ({run})")
        return run
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=folder))
    logfile = folder / "build.log"
    try:
        log(f"bootloader: building PyInstaller {pyinstaller_version}'s with zig and a static zlib")
        with tarfile.open(fetch_sdist(f"pyinstaller=={pyinstaller_version}", work, "pyinstaller-*.tar.gz")) as tar:
            tar.extractall(work, filter="data")
        src = next(work.glob("pyinstaller-*/bootloader"))
        for f in OURS:
            shutil.copy(f, src / "src" / f.name)
        apply_patches(src / "src", PATCHES, "buildsys/bootloader.py's PATCHES")
        env = zig.env(zig.tools_folder(cache, triple), triple=triple)
        machine = triple.split("-")[0]
        if machine != os.uname().machine:  # waf strips what it links: with binutils for that machine
            from .python import STRIP

            env["STRIP"] = STRIP[machine]
        with open(logfile, "w") as out:
            rc = subprocess.run([sys.executable, "waf", "--static-zlib", "--no-universal2", "distclean", "all"],
                                cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if rc != 0:
            sys.exit("\n".join(logfile.read_text().splitlines()[-20:]) + f"\nbootloader build failed; log: {logfile}")
        built = src.parent / "PyInstaller" / "bootloader" / PLATFORM_DIRS[triple.split("-")[0]] / "run"
        tmp = folder / "run.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, run)
        return run
    finally:
        shutil.rmtree(work, ignore_errors=True)
