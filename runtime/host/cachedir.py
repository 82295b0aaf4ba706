"""The per-user cache as a trust boundary, as OpenSSH treats ~/.ssh (issue 22).

The runtime loads code from its cache (the native libraries) and believes what it finds there
(the first-launch verdicts), so whoever can write into it can run code as the user. Hence:

- Every folder from the cache root down is owned by the user and writable by nobody else. The
  folders the runtime names itself (native/, native/<key>/, verified/) get their mode fixed when
  it is looser; a root that another user can write, or that another user owns, is refused with
  one line naming the folder and the command that fixes it.
- Nothing in it is followed through a symbolic link: each folder is opened once, with
  O_NOFOLLOW, and everything below it is reached relative to that open folder (openat and
  friends); a link where a folder or file of the runtime's should be is refused.
- The fallback cache in a shared temp folder (/tmp/bundle-cache-<uid>) is made with mode 0700
  and used only when it is ours and private; otherwise another private name is used.
- Code is loaded through /proc/self/fd/N of the opened folder (Linux), so no path component can
  be swapped between the check and dlopen.

Windows has no modes, no O_NOFOLLOW and no dir_fd: there the cache lives under %LOCALAPPDATA%,
which the system's ACLs keep per-user, and the same operations run on plain paths.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import RuntimeFailure

POSIX = hasattr(os, "getuid") and os.open in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_BINARY = getattr(os, "O_BINARY", 0)


class UnsafeCacheError(RuntimeFailure):
    """A cache folder another user could write, or a link where the runtime's own entry should be."""


def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


def _loose(st: os.stat_result) -> bool:
    return bool(st.st_mode & 0o022)


def owner_problem(path, st: os.stat_result) -> str | None:
    """Why a folder cannot be trusted as the root of the cache, with the command that fixes it."""
    if not POSIX:
        return None
    if st.st_uid != _uid():
        return (f"the runtime cache {path} belongs to another user (uid {st.st_uid}); use a folder of your own "
                f"(set BUNDLE_CACHE_DIR), or take it: chown -R {_uid()} {path}")
    if _loose(st):
        return (f"the runtime cache {path} can be written by other users, who could plant code in it; "
                f"run: chmod go-w {path}")
    return None


class Folder:
    """A cache folder opened once (fd), everything below it reached relative to it. On Windows
    fd is None and names are joined to path."""

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = Path(path), fd

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _at(self, name: str) -> tuple[str, dict]:
        if self.fd is None:
            return os.path.join(self.path, name), {}
        return name, {"dir_fd": self.fd}

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open_root(cls, path: Path) -> "Folder":
        """The cache root, which must exist. A link is followed only when it is the user's own;
        what it leads to must be a folder of the user's that nobody else can write."""
        if not POSIX:
            if not os.path.isdir(path):
                raise OSError(0, "not a folder")
            return cls(path, None)
        lst = os.lstat(path)
        if stat.S_ISLNK(lst.st_mode) and lst.st_uid != _uid():
            raise UnsafeCacheError(f"the runtime cache {path} is a link made by another user (uid {lst.st_uid}); "
                                   f"remove it (rm {path}) or set BUNDLE_CACHE_DIR to a folder of your own")
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
        try:
            problem = owner_problem(path, os.fstat(fd))
            if problem:
                raise UnsafeCacheError(problem)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def sub(self, name: str, create: bool = True) -> "Folder":
        """A folder the runtime names inside this one: made with mode 0700 when missing, its mode
        tightened when looser, refused when it is a link, not a folder, or another user's."""
        at, kw = self._at(name)
        path = self.path / name
        if not POSIX:
            if create:
                os.makedirs(at, exist_ok=True)
            if not os.path.lexists(at):
                raise FileNotFoundError(2, "no such folder", at)
            if not os.path.isdir(at):
                raise UnsafeCacheError(f"{path} is not a folder; remove it (the runtime makes it again)")
            return Folder(path, None)
        if create:
            try:
                os.mkdir(at, 0o700, **kw)
            except FileExistsError:
                pass
        try:
            fd = os.open(at, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, **kw)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a link, a file
                raise UnsafeCacheError(f"{path} in the runtime cache is a link or a file, not the folder the "
                                       f"runtime made; remove it (rm {path}) and run again") from None
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid != _uid():
                raise UnsafeCacheError(f"{path} in the runtime cache belongs to another user (uid {st.st_uid}); "
                                       f"remove it (rm -r {path}) and run again")
            if _loose(st):
                os.fchmod(fd, 0o700)  # the runtime's own folder: made private again
        except BaseException:
            os.close(fd)
            raise
        return Folder(path, fd)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        """A file in this folder, never through a link (ELOOP: an UnsafeCacheError)."""
        at, kw = self._at(name)
        try:
            return os.open(at, flags | _NOFOLLOW | _CLOEXEC | _BINARY, mode, **kw)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafeCacheError(f"{self.path / name} in the runtime cache is a link; remove it "
                                       f"(rm {self.path / name}) and run again") from None
            raise

    def read_own(self, name: str, limit: int = 1 << 20) -> bytes | None:
        """A small regular file of the user's that nobody else can write; None when there is none
        (or it is anything else)."""
        try:
            fd = self.open(name, os.O_RDONLY)
        except (OSError, UnsafeCacheError):
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or (POSIX and (st.st_uid != _uid() or _loose(st))):
                return None
            return f.read(limit)

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write name whole or not at all: a private temp file, then a rename over it."""
        tmp = f".{name}.{os.getpid()}.tmp"
        fd = self.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.rename(tmp, name)
        except BaseException:
            self.unlink(tmp)
            raise

    # -- the rest, relative to the folder -----------------------------------------------------

    def lstat(self, name: str) -> os.stat_result:
        at, kw = self._at(name)
        return os.stat(at, follow_symlinks=False, **kw) if kw else os.lstat(at)

    def listdir(self) -> list[str]:
        return os.listdir(self.fd if self.fd is not None else self.path)

    def mkdir(self, name: str) -> None:
        at, kw = self._at(name)
        os.mkdir(at, 0o700, **kw)

    def symlink(self, target: str, name: str) -> None:
        at, kw = self._at(name)
        os.symlink(target, at, **kw)

    def readlink(self, name: str) -> str:
        at, kw = self._at(name)
        return os.readlink(at, **kw)

    def rename(self, src: str, dst: str) -> None:
        a, kw = self._at(src)
        b, _ = self._at(dst)
        if kw:
            os.replace(a, b, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            os.replace(a, b)

    def unlink(self, name: str) -> None:
        at, kw = self._at(name)
        try:
            os.unlink(at, **kw)
        except FileNotFoundError:
            pass

    def remove(self, name: str) -> None:
        """Remove an entry of this folder without following any link: a link or file is
        unlinked, a folder removed with what is in it (shutil.rmtree is fd-based here)."""
        try:
            st = self.lstat(name)
        except FileNotFoundError:
            return
        at, kw = self._at(name)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(at, ignore_errors=True, **kw)
        else:
            self.unlink(name)

    def code_path(self) -> Path:
        """The path to hand dlopen for files in this folder: /proc/self/fd/N where /proc is
        there (the open folder itself, whatever happens to the path), else the path."""
        if self.fd is not None and os.path.isdir(f"/proc/self/fd/{self.fd}"):
            return Path(f"/proc/self/fd/{self.fd}")
        return self.path


def private_temp_root(temp: str) -> Path:
    """The cache in a shared temp folder: <temp>/bundle-cache-<uid>, made with mode 0700, when it
    is ours and private (not a link); else a private folder of ours named after it that exists,
    or a new one (mkdtemp). Another user who made the name first gets nothing from it."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    base = Path(temp) / f"bundle-cache-{uid}"
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    if _private(base):
        return base
    for p in sorted(Path(temp).glob(f"bundle-cache-{uid}-*")):
        if _private(p):
            return p
    return Path(tempfile.mkdtemp(prefix=f"bundle-cache-{uid}-", dir=temp))


def _private(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    return not POSIX or (st.st_uid == _uid() and not st.st_mode & 0o077)
