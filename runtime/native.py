"""The native llama.cpp/ggml libraries: extracted once into a per-user cache, then loaded.

They travel in the payload as one zstd-compressed tar (DESIGN.md #6, #8): extracted on the first
launch into <cache>/native/<hash>/ and reused by every later launch of any bundle carrying the
same libraries. Extraction follows pex's atomic_directory: check, take a blocking lock, check
again, work in a sibling folder, rename into place. A killed launch leaves only a work folder
that the next one removes; never a folder that looks complete.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from .errors import RuntimeFailure
from .payload import is_sha256_hex

COMPLETE_MARKER = ".complete"
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
    """The first cache root that exists or can be made, and that is ours to write."""
    problems = []
    for root in cache_roots(environ):
        try:
            if _noexec(root):
                raise OSError(0, "on a filesystem mounted noexec")
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = os.lstat(root)
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise OSError(0, "not a folder")
            if hasattr(os, "getuid") and st.st_uid != os.getuid():
                raise OSError(0, "owned by another user")
            if not os.access(root, os.W_OK | os.X_OK):
                raise OSError(0, "not writable")
            return root
        except OSError as exc:
            problems.append(f"{root} ({exc.strerror or exc})")
    raise RuntimeFailure("no folder for the runtime cache is writable: " + "; ".join(problems)
                         + "; set BUNDLE_CACHE_DIR to a writable folder")


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


def _remove_own(path: Path, root: Path) -> None:
    """Remove a folder the runtime made in root, and nothing else: the name must be one the
    runtime gives, the folder must sit directly in root, and it must not be a link."""
    if path.parent != root or not _OWN_NAME.match(path.name):
        raise RuntimeFailure(f"refusing to remove {path}: not a folder this runtime made")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)


class _HashingReader:
    """A file-like view of one payload entry that hashes what is read through it."""

    def __init__(self, f, size: int):
        self.f, self.left, self.digest = f, size, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            n = self.left
        data = self.f.read(n)
        self.left -= len(data)
        self.digest.update(data)
        return data


def _lock(path: Path, say):
    f = open(path, "a+b")
    if sys.platform == "win32":  # pragma: no cover - Windows stub
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
        return f
    import fcntl

    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        say("waiting for another launch to finish unpacking the runtime…")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    return f


def extract_entry(payload, name: str, root: Path | None = None, say=lambda msg: None) -> Path:
    """Extract a tar.zst payload entry once; return the folder holding its files."""
    entry = payload.entries[name]
    if not is_sha256_hex(entry.sha256):  # read_payload checked it; never build a path from less
        raise RuntimeFailure(f"{payload.path}: the table of contents is damaged; copy the file again")
    root = (root or usable_cache_root()) / "native"
    key = entry.sha256[:24]
    target = root / key
    if (target / COMPLETE_MARKER).exists():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root / f"{key}.lock", say)
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot write the runtime cache {root}: {exc.strerror}; set BUNDLE_CACHE_DIR to a writable folder"
        ) from None
    try:
        if (target / COMPLETE_MARKER).exists():
            return target
        # Work folders left by killed launches (we hold the lock, so none is in use).
        for stale in root.glob(f".work-{key}-*"):
            _remove_own(stale, root)
        if target.exists() or target.is_symlink():  # no marker: an old, broken folder
            _remove_own(target, root)
        work = root / f".work-{key}-{os.getpid()}"
        work.mkdir()
        try:
            _unpack(payload, entry, work)
            (work / COMPLETE_MARKER).write_text(entry.sha256)
            os.rename(work, target)
        except BaseException:
            _remove_own(work, root)
            raise
        return target
    except OSError as exc:
        raise RuntimeFailure(
            f"cannot unpack the runtime into {root}: {exc.strerror}; free some disk space or set "
            "BUNDLE_CACHE_DIR to another folder"
        ) from None
    finally:
        lock.close()


def _unpack(payload, entry, work: Path) -> None:
    import zstandard

    with open(payload.path, "rb") as f:
        f.seek(payload.payload_start + entry.offset)
        raw = _HashingReader(f, entry.size)
        try:
            if entry.compression == "none":  # a plain tar (bench/gpu_check.sh packs one where zstd is missing)
                with tarfile.open(fileobj=raw, mode="r|") as tar:
                    _extract_flat(tar, work)
            else:
                with zstandard.ZstdDecompressor().stream_reader(raw) as stream:
                    with tarfile.open(fileobj=stream, mode="r|") as tar:
                        _extract_flat(tar, work)
        except (zstandard.ZstdError, tarfile.TarError, EOFError):
            raise RuntimeFailure(
                f"{payload.path}: the runtime libraries inside it are damaged; copy the file again"
            ) from None
        raw.read()  # hash any tail the tar reader did not need
        if raw.digest.hexdigest() != entry.sha256:
            raise RuntimeFailure(
                f"{payload.path}: the runtime libraries inside it are damaged; copy the file again"
            )


_FLAT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,200}\Z")


def _extract_flat(tar: tarfile.TarFile, work: Path) -> None:
    """Extract a native-library tar, which is flat: regular files and symlinks to them, every
    name a plain file name. Anything else (a path, '..', a device, a link out) is damage. (The
    stub's CPython predates tarfile's extraction filters, and this is stricter than them.)"""
    for m in tar:
        if not _FLAT_NAME.match(m.name) or ".." in m.name:
            raise tarfile.TarError(f"unexpected member name {m.name!r}")
        dest = work / m.name
        if m.issym():
            if not _FLAT_NAME.match(m.linkname) or ".." in m.linkname:
                raise tarfile.TarError(f"unexpected link {m.linkname!r}")
            os.symlink(m.linkname, dest)
        elif m.isreg():
            src = tar.extractfile(m)
            with open(dest, "xb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.chmod(dest, 0o755)
        else:
            raise tarfile.TarError(f"unexpected member type in {m.name!r}")


def load_backends(libdir: Path, variant: str | None = None):
    """Load ggml and its best CPU variant (or the one named) from libdir.

    Called through libggml.so.0, the file libllama links against: loading through a second
    copy of ggml gives a registry libllama never sees (DESIGN.md #5b).
    """
    ggml = ctypes.CDLL(str(libdir / "libggml.so.0"), mode=ctypes.RTLD_GLOBAL)
    if variant:
        path = libdir / f"libggml-cpu-{variant}.so"
        if not path.exists():
            choices = sorted(p.name[len("libggml-cpu-"):-3] for p in libdir.glob("libggml-cpu-*.so"))
            raise RuntimeFailure(f"no CPU variant {variant!r}; this bundle has: {', '.join(choices)}")
        ggml.ggml_backend_load.restype = ctypes.c_void_p
        ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
        if not ggml.ggml_backend_load(str(path).encode()):
            raise RuntimeFailure(f"the CPU variant {variant!r} does not run on this processor")
    else:
        ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
        ggml.ggml_backend_load_all_from_path(str(libdir).encode())
    return ggml


def loaded_cpu_variant() -> str | None:
    """Which libggml-cpu-*.so this process mapped (read from /proc/self/maps)."""
    try:
        with open("/proc/self/maps", errors="surrogateescape") as f:
            for line in f:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith("libggml-cpu-") and name.endswith(".so"):
                    return name[len("libggml-cpu-"):-3]
    except OSError:
        pass
    return None


def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask, and a cgroup CPU quota if set
    (a container with --cpus 2 on a 64-core host)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        try:  # cgroup v1 (CentOS 7, RHEL 8, older Docker)
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                quota = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if quota > 0 and period > 0:
                n = min(n, max(1, -(-quota // period)))
        except (OSError, ValueError):
            pass
    return max(1, n)


def _cpu_sample():
    """(wall clock, busy CPU-seconds of the whole machine, this process's CPU-seconds)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    t = os.times()
    return time.monotonic(), (sum(fields) - idle) / hz, t.user + t.system


class BusyMeter:
    """How many CPUs other programs keep busy, measured from a start (made early in a launch)
    to the moment a thread count is chosen: the machine's busy time less this process's own,
    over the wall time between (at least MIN_SECONDS; the launch's own work fills most of it)."""

    MIN_SECONDS = 0.05

    def __init__(self):
        self.start = _cpu_sample()

    def busy_cpus(self) -> int:
        if self.start is None:
            return 0
        left = self.MIN_SECONDS - (time.monotonic() - self.start[0])
        if left > 0:
            time.sleep(left)
        end = _cpu_sample()
        if end is None:
            return 0
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0, round(others / wall)) if wall > 0 else 0


def physical_cores() -> int:
    """Physical cores this process may use (threads beyond them slow llama.cpp down)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    cores = set()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            cpu = phys = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, phys = int(value), "0"
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except (OSError, ValueError):
        pass
    return max(1, min(len(cores) or len(allowed), usable_cpus()))
