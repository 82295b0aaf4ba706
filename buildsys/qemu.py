"""Running aarch64 programs on this x86-64 machine, for the linux-aarch64 target's build (its
PyInstaller runs on its own CPython) and for its tests.

Debian's qemu-user-static is registered in the binfmt_misc of a private user namespace (Linux
6.7 and newer give each user namespace its own), so an aarch64 program, and everything it
forks and execs, runs under qemu there; the machine's own binfmt_misc is never touched. The
programs run chrooted in an arm64 Debian 11 userland (glibc 2.31) made by debootstrap's first
stage, which unpacks the packages without running anything (no emulation needed).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

QEMU = "/usr/bin/qemu-aarch64-static"
SUITE = "bullseye"
MIRROR = "http://deb.debian.org/debian"
# binfmt_misc's line for AArch64 ELF executables (e_ident of a 64-bit little-endian ELF, e_type
# EXEC or DYN, e_machine 0xb7). F: qemu is opened now, so it need not exist inside the chroot.
_MAGIC = r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
REGISTER = f":qemu-aarch64:M::{_MAGIC}:{_MASK}:{QEMU}:F"


# The userland a build runs aarch64 programs in: PyInstaller reads what each library needs with
# binutils' objdump; the Vulkan back end links against the loader (libvulkan.so.1, never shipped).
BUILD_PACKAGES = ("binutils", "libvulkan1")
LIBDIR = "usr/lib/aarch64-linux-gnu"


def build_userland(cache: Path) -> Path:
    """The arm64 userland of the build, in the build cache (made once)."""
    return ensure_userland(cache / f"userland-arm64-{SUITE}-{'-'.join(BUILD_PACKAGES)}", BUILD_PACKAGES)


def check_tools() -> None:
    missing = [t for t in ("debootstrap", "unshare", "chroot") if not shutil.which(t)]
    if not os.path.exists(QEMU):
        missing.append(QEMU)
    if missing:
        sys.exit(f"{', '.join(missing)} missing: the aarch64 build and tests need Debian's qemu-user-static and "
                 "debootstrap (run `make buildtools-aarch64`)")


def ensure_userland(folder: Path, include: tuple[str, ...] = ()) -> Path:
    """An arm64 Debian 11 minimal userland in folder, with the packages in include (made once:
    about a minute)."""
    if (folder / ".complete").exists():
        return folder
    check_tools()
    work = folder.with_name(folder.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    work.parent.mkdir(parents=True, exist_ok=True)
    extra = [f"--include={','.join(include)}"] if include else []
    r = subprocess.run(["debootstrap", "--foreign", "--variant=minbase", "--arch=arm64", *extra, SUITE, str(work), MIRROR],
                       capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        sys.exit((r.stdout + r.stderr)[-3000:] + f"\ndebootstrap of an arm64 {SUITE} userland failed")
    for name in ("proc", "sys"):  # the first stage leaves /proc a link to the machine's: a loop once chrooted
        if (work / name).is_symlink():
            (work / name).unlink()
        (work / name).mkdir(exist_ok=True)
    if include:  # the first stage only downloads what it does not need itself: unpack the rest
        for deb in sorted((work / "var" / "cache" / "apt" / "archives").glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(work)], check=True)
    # the loader's cache, which PyInstaller's search for libraries reads (`ldconfig -p`)
    r = run(work, ["/sbin/ldconfig"], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        sys.exit(f"ldconfig in the arm64 userland failed: {r.stderr[-1000:]}")
    (work / ".complete").write_text("")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(work, folder)
    return folder


def command(root: Path, argv: list[str], binds=(), env: dict | None = None, cwd: str = "/",
            prelude: str = "") -> list[str]:
    """The command line that runs argv chrooted in root under qemu, in a new user, mount and PID
    namespace (killed with it): binds are host folders seen at the same path inside, env the
    whole environment (QEMU_CPU picks the emulated CPU), prelude shell run before the chroot."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8", **(env or {})}
    q = shlex.quote
    lines = ["set -e", "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc",
             f"printf '%s' {q(REGISTER)} > /proc/sys/fs/binfmt_misc/register",
             f"mount -t proc proc {q(str(root))}/proc", f"mount --rbind /dev {q(str(root))}/dev",
             f"mount --rbind /sys {q(str(root))}/sys"]
    for b in binds:
        inside = f"{root}{Path(b).resolve()}"
        lines += [f"mkdir -p {q(inside)}", f"mount --rbind {q(str(Path(b).resolve()))} {q(inside)}"]
    if prelude:
        lines.append(prelude)
    envs = " ".join(q(f"{k}={v}") for k, v in env.items())
    lines.append(f"exec chroot {q(str(root))} /usr/bin/env -i {envs} /bin/sh -c "
                 + q(f"cd {q(cwd)} && exec " + " ".join(map(q, argv))))
    return ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child",
            "sh", "-c", "\n".join(lines)]


def run(root: Path, argv: list[str], binds=(), env: dict | None = None, cwd: str = "/", **kw):
    """subprocess.run of command(...)."""
    return subprocess.run(command(root, argv, binds, env, cwd), **kw)
