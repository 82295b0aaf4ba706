"""The native llama.cpp/ggml libraries: extracted once into a per-user cache, then loaded.

They travel in the payload as one zstd-compressed tar (docs/facts.md #6, #8): extracted on the first
launch into <cache>/native/<hash>/ and reused by every later launch of any bundle carrying the
same libraries (bindings.py loads them). Extraction follows pex's atomic_directory: check, take a blocking lock, check
again, work in a sibling folder, rename into place. A killed launch leaves only a work folder
that the next one removes; never a folder that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import RuntimeFailure
from .. import digest
from . import cachedir

COMPLETE_MARKER = ".complete"
WINDOWS = sys.platform == "win32"
# The only names the runtime ever creates, and so the only ones it ever removes, in <cache>/native/.
_OWN_NAME = re.compile(r"(?:[0-9a-f]{24}|\.work-[0-9a-f]{24}-\d+)\Z")


def _home(environ) -> str | None:
    home = environ.get("HOME")
    if home and os.path.isabs(home):
        return home
    try:
        import pwd

        home = pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError, OSError):
        return None
    return home if home and os.path.isabs(home) else None


def cache_roots(environ=None) -> list[Path]:
    """Where the runtime's cache may go, best first. Always absolute: a uid with no passwd
    entry and no HOME must not make a '~' folder in the working directory (issue 8.11)."""
    environ = os.environ if environ is None else environ
    if environ.get("BUNDLE_CACHE_DIR"):
        return [Path(os.path.abspath(environ["BUNDLE_CACHE_DIR"]))]
    roots = []
    if sys.platform == "win32" and environ.get("LOCALAPPDATA"):
        roots.append(Path(environ["LOCALAPPDATA"]) / "bundle" / "cache")
    xdg = environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        roots.append(Path(xdg) / "bundle")
    home = _home(environ)
    if home:
        roots.append(Path(home) / ".cache" / "bundle")
    # Last: a private folder in a temp directory (HOME unset or read-only); the folder the
    # bootloader unpacked into is one that can hold code (a noexec /tmp cannot, issue 9).
    uid = os.getuid() if hasattr(os, "getuid") else 0
    temps = [tempfile.gettempdir(), "/var/tmp"] if sys.platform != "win32" else [tempfile.gettempdir()]
    meipass = getattr(sys, "_MEIPASS", None)
    if meipass:
        temps.append(os.path.dirname(os.path.abspath(meipass)))
    if sys.platform != "win32":
        temps += [environ.get("XDG_RUNTIME_DIR") or "", "/dev/shm"]
    for t in temps:
        if t and os.path.isabs(t):
            roots.append(Path(t) / f"bundle-cache-{uid}")
    out = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def cache_root(environ=None) -> Path:
    return cache_roots(environ)[0]


def usable_cache_root(environ=None) -> Path:
    """The first cache root that exists or can be made, that is ours to write, and that nobody
    else can write (runtime/host/cachedir.py). A root another user could write, or a link another user
    made, is refused with the command that fixes it; one that is missing, read-only, on a noexec
    filesystem or (for the default places) another user's is passed over for the next."""
    environ = os.environ if environ is None else environ
    explicit = bool(environ.get("BUNDLE_CACHE_DIR"))
    temps = _temp_roots(environ)
    problems = []
    for root in cache_roots(environ):
        try:
            if root in temps:
                root = cachedir.private_temp_root(str(root.parent))
            if _noexec(root):
                raise OSError(0, "on a filesystem mounted noexec")
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                with cachedir.Folder.open_root(root):
                    pass
            except cachedir.UnsafeCacheError as exc:
                st = os.stat(root)
                if explicit or not hasattr(os, "geteuid") or st.st_uid == os.geteuid():
                    raise
                raise OSError(0, str(exc)) from None
            if not os.access(root, os.W_OK | os.X_OK):
                raise OSError(0, "not writable")
            return root
        except OSError as exc:
            problems.append(f"{root} ({exc.strerror or exc})")
    raise RuntimeFailure("no folder for the runtime cache is writable: " + "; ".join(problems)
                         + "; set BUNDLE_CACHE_DIR to a writable folder")


def _temp_roots(environ) -> set[Path]:
    """The roots in shared temp folders (the last ones of cache_roots)."""
    if environ.get("BUNDLE_CACHE_DIR"):
        return set()
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return {r for r in cache_roots(environ) if r.name == f"bundle-cache-{uid}"}


def _noexec(path: Path) -> bool:
    """Whether the filesystem that holds path (or would: its nearest existing folder) forbids
    running code from it; the runtime's libraries cannot be loaded from there."""
    if not hasattr(os, "statvfs"):
        return False
    for p in (path, *path.parents):
        try:
            return bool(os.statvfs(p).f_flag & os.ST_NOEXEC)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


class _HashingReader:
    """A file-like view of one payload entry that hashes what is read through it."""

    def __init__(self, f, size: int, algorithm: str):
        self.f, self.left, self.algorithm = f, size, algorithm
        self.digest = digest.hasher(algorithm)

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        data = self.f.read(n)
        self.left -= len(data)
        self.digest.update(data)
        return data


def _lock(folder: cachedir.Folder, name: str, say):
    fd = folder.open(name, os.O_RDWR | os.O_CREAT, 0o600)
    f = os.fdopen(fd, "a+b")
    if WINDOWS:
        import msvcrt

        waited = False
        while True:  # LK_LOCK gives up after 10 s; another launch may unpack for longer
            try:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return f
            except OSError:
                if not waited:
                    say("waiting for another launch to finish unpacking the runtime…")
                    waited = True
                time.sleep(0.2)
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("waiting for another launch to finish unpacking the runtime…")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


# Folders of libraries this process has checked and keeps open: code path -> (Folder, real path).
_opened: dict[str, tuple[cachedir.Folder, Path]] = {}


def real_path(path) -> Path:
    """The folder's path on disk, for messages and --info (path may be /proc/self/fd/N)."""
    found = _opened.get(str(path))
    return found[1] if found else Path(path)


def extract_entry(payload, name: str, root: Path | None = None, say=lambda msg: None) -> Path:
    """Extract a tar.zst payload entry once into <cache>/native/<key>/; return the folder to load
    its files from. A folder is used only when it holds exactly the files its unpacking recorded
    (.complete), each of the recorded size and hash (hashed again only when its inode, size,
    mtime or ctime differs from the record: a stat per file a launch); anything else, such as a
    library cut short by a full disk or a file added, is unpacked again. Never followed through
    a link, never written through one (runtime/host/cachedir.py)."""
    entry = payload.entries.get(name)
    if entry is None:
        raise RuntimeFailure(f"{payload.path} carries no {name} (its table of contents does not list it): it was "
                             "not made by bundle build, or is damaged; build or copy it again")
    if not digest.is_digest(entry.digest):  # read_payload checked it; never build a path from less
        raise RuntimeFailure(f"{payload.path}: the table of contents is damaged; copy the file again")
    root = root or usable_cache_root()
    key = digest.hex_of(entry.digest)[:24]
    try:
        with cachedir.Folder.open_root(root) as top, top.sub("native") as natives:
            for code, (_, real) in _opened.items():
                if real == natives.path / key:
                    return Path(code)
            folder = _intact_folder(natives, key, entry)
            if folder is None:
                lock = _lock(natives, f"{key}.lock", say)
                try:
                    folder = _intact_folder(natives, key, entry)
                    if folder is None:
                        folder = _unpack_locked(payload, entry, natives, key)
                finally:
                    lock.close()
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot unpack the runtime into {root}: {exc.strerror or exc}; free some disk space or set "
            "BUNDLE_CACHE_DIR to another folder"
        ) from None
    code = folder.code_path()
    _opened[str(code)] = (folder, folder.path)
    return code


def _intact_folder(natives: cachedir.Folder, key: str, entry) -> cachedir.Folder | None:
    """natives/<key>, opened, when it holds exactly what its record says; else None."""
    try:
        folder = natives.sub(key, create=False)
    except FileNotFoundError:
        return None
    try:
        if _intact(folder, entry):
            return folder
    except OSError:
        pass
    folder.close()
    return None


def _intact(folder: cachedir.Folder, entry) -> bool:
    try:
        record = json.loads(folder.read_own(COMPLETE_MARKER) or b"null")
        files, seen = record["files"], record["seen"]
        if record["digest"] != entry.digest or not isinstance(files, dict) or not isinstance(seen, dict):
            return False
    except (ValueError, KeyError, TypeError):
        return False  # no record, an older runtime's, or a damaged one
    if set(folder.listdir()) - {COMPLETE_MARKER} != set(files):
        return False  # a file missing, or one that was never unpacked (ggml would load it)
    changed = False
    for fname, want in files.items():
        st = folder.lstat(fname)
        if "link" in want:
            if not stat.S_ISLNK(st.st_mode) or folder.readlink(fname) != want["link"]:
                return False
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != want["size"]:
            return False
        if cachedir.POSIX and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
            return False
        now = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if seen.get(fname) != now:
            if _hash_file(folder, fname) != want["sha256"]:
                return False
            seen[fname], changed = now, True
    if changed:
        try:
            folder.write_atomic(COMPLETE_MARKER, json.dumps(record).encode())
        except OSError:
            pass  # hashed again next time
    return True


def _hash_file(folder: cachedir.Folder, name: str) -> str:
    h = hashlib.sha256()
    with os.fdopen(folder.open(name, os.O_RDONLY), "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _unpack_locked(payload, entry, natives: cachedir.Folder, key: str) -> cachedir.Folder:
    """Under the lock: clear what is there, unpack into a work folder, record, rename into place.
    Only names the runtime gives are ever removed (_OWN_NAME), and never through a link."""
    for stale in natives.listdir():
        if stale == key or (stale.startswith(f".work-{key}-") and _OWN_NAME.match(stale)):
            natives.remove(stale)
    work_name = f".work-{key}-{os.getpid()}"
    natives.mkdir(work_name)
    try:
        with natives.sub(work_name, create=False) as work:
            files = _unpack(payload, entry, work)
            record = {"digest": entry.digest, "files": files, "seen": {}}
            for fname, want in files.items():
                if "link" not in want:
                    st = work.lstat(fname)
                    record["seen"][fname] = [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
            work.write_atomic(COMPLETE_MARKER, json.dumps(record).encode())
        natives.rename(work_name, key)
    except BaseException:
        natives.remove(work_name)
        raise
    return natives.sub(key, create=False)


class _Bounded:
    """The decompressed stream, cut off past the size the table of contents records (a small
    entry that expands to fill the disk is damage, issue 22.6)."""

    def __init__(self, stream, limit: int):
        self.stream, self.left = stream, limit

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.left -= len(data)
        if self.left < 0:
            raise tarfile.TarError("the entry unpacks to more than its recorded size")
        return data


# What a native entry may unpack to when its size was not recorded (older bundles), and the most
# members its tar may have.
UNRECORDED_LIMIT = 4 << 30
MAX_MEMBERS = 1000


def _unpack(payload, entry, work: cachedir.Folder) -> dict:
    import zstandard

    # The tar stream is at most the recorded size plus a header and padding for each member.
    limit = (entry.unpacked_size if entry.unpacked_size is not None else UNRECORDED_LIMIT) + MAX_MEMBERS * 1024
    with open(payload.source, "rb") as f:
        f.seek(payload.payload_start + entry.offset)
        raw = _HashingReader(f, entry.size, digest.algorithm_of(entry.digest))
        try:
            if entry.compression == "none":  # a plain tar (bench/gpu_check.sh packs one where zstd is missing)
                with tarfile.open(fileobj=_Bounded(raw, limit), mode="r|") as tar:
                    files = _extract_flat(tar, work, entry.unpacked_size)
            else:
                with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                    with tarfile.open(fileobj=_Bounded(stream, limit), mode="r|") as tar:
                        files = _extract_flat(tar, work, entry.unpacked_size)
        except (zstandard.ZstdError, tarfile.TarError, EOFError):
            raise RuntimeFailure(
                f"{payload.path}: the runtime libraries inside it are damaged; copy the file again"
            ) from None
        raw.read()  # hash any tail the tar reader did not need
        if digest.make(raw.algorithm, raw.digest.hexdigest()) != entry.digest:
            raise RuntimeFailure(
                f"{payload.path}: the runtime libraries inside it are damaged; copy the file again"
            )
    return files


_FLAT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}\Z")


def _extract_flat(tar: tarfile.TarFile, work: cachedir.Folder, unpacked_size: int | None) -> dict:
    """Extract a native-library tar, which is flat: regular files and symlinks to them, every
    name a plain file name. Anything else (a path, '..', a device, a link out) is damage, and so
    are files that add up to more than the recorded size. (The stub's CPython predates tarfile's
    extraction filters, and this is stricter than them.) Returns what was written: name ->
    {size, sha256} or {link}."""
    budget = unpacked_size if unpacked_size is not None else UNRECORDED_LIMIT
    files: dict = {}
    for i, m in enumerate(tar):
        if i >= MAX_MEMBERS or not _FLAT_NAME.match(m.name) or ".." in m.name or m.name == COMPLETE_MARKER:
            raise tarfile.TarError(f"unexpected member name {m.name!r}")
        if m.issym():
            if not _FLAT_NAME.match(m.linkname) or ".." in m.linkname:
                raise tarfile.TarError(f"unexpected link {m.linkname!r}")
            work.symlink(m.linkname, m.name)
            files[m.name] = {"link": m.linkname}
        elif m.isreg():
            budget -= m.size
            if budget < 0:
                raise tarfile.TarError("the entry unpacks to more than its recorded size")
            src = tar.extractfile(m)
            h, size = hashlib.sha256(), 0
            with os.fdopen(work.open(m.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755), "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > m.size:
                        raise tarfile.TarError(f"{m.name!r} is longer than its header says")
                    h.update(chunk)
                    out.write(chunk)
            files[m.name] = {"size": size, "sha256": h.hexdigest()}
        else:
            raise tarfile.TarError(f"unexpected member type in {m.name!r}")
    return files


# The ggml library libllama links against: on Linux its soname (a second copy under another name
# gives a registry libllama never sees, docs/facts.md #5b); on Windows the DLL name it imports.
