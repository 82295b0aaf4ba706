"""The first launch of a bundle on a machine checks its hashes; later launches pay nothing.

Issue 8.2: single-byte flips inside a model's weights make llama.cpp answer garbage with exit 0.
So before the model or the libraries are used for the first time, the runtime hashes them and
its own parts (bootloader, archive, tail) and remembers the verdict in the cache, keyed by the
identity of the file the runtime opened (payload.source, one descriptor for the whole launch):
device, inode, size, modification time, change time and the table of contents' hash. A copy (new
inode), an edit (new mtime) or a rebuilt bundle (new TOC) is checked again, and so is damage
whose mtime was put back (`touch -r`): the change time cannot be set back (issue 22.3). A
verdict is kept only in the private cache (runtime/host/cachedir.py) and carries a MAC under a key
kept there too: one written by anything but the runtime is not believed, the file is checked
again. A mismatch is never remembered: every launch of a damaged file stops and names the
damaged part.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sys
import time
from pathlib import Path

from .. import digest
from ..host import cachedir
from ..errors import DamagedError
from .layout import MODEL_ENTRY, NATIVE_CPU_ENTRY, RUNTIME_ENTRY, is_lora_entry
from .reader import Payload

PROGRESS_AFTER = 1.0  # seconds: quick checks say nothing


KEY_FILE = ".key"


def verdict_key(payload: Payload) -> str:
    st = os.stat(payload.source)  # the open descriptor's file (/proc/self/fd/N), not the name
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{payload.toc_sha256}"
    if payload.manifest.model.parts:
        ident += "|" + payload.model_parts_identity()
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def parts_to_check(payload: Payload) -> list[str]:
    """The model, the CPU libraries, the runtime's own regions and, in a universal file, the
    runtime program the launcher ran, and the LoRA adapters. (The GPU back ends' libraries are hashed when they are
    unpacked, which happens only on machines with a driver.)"""
    return ([n for n in (MODEL_ENTRY, NATIVE_CPU_ENTRY, RUNTIME_ENTRY) if n in payload.entries]
            + [n for n in payload.entries if is_lora_entry(n)] + list(payload.regions))


class _Progress:
    def __init__(self, total: int, say, tty: bool):
        self.total, self.done, self.say, self.tty = max(1, total), 0, say, tty
        self.start = time.monotonic()
        self.shown = False
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.start < PROGRESS_AFTER or now - self.last < 0.25:
            return
        pct = 100 * self.done // self.total
        if self.tty:
            sys.stderr.write(f"\rchecking this bundle (first launch on this machine): {pct}%")
            sys.stderr.flush()
        elif not self.shown:
            self.say(f"checking this bundle ({self.total / 2**20:.0f} MiB; first launch on this machine)…")
        self.shown, self.last = True, now

    def end(self) -> None:
        if self.shown and self.tty:
            sys.stderr.write("\rchecking this bundle (first launch on this machine): done\n")
            sys.stderr.flush()


def _mac_key(folder: cachedir.Folder) -> bytes:
    """The key verdicts are signed with: 32 random bytes in the private cache, made once."""
    key = folder.read_own(KEY_FILE, 64)
    if key and len(key) == 32:
        return key
    key = secrets.token_bytes(32)
    folder.write_atomic(KEY_FILE, key)
    return key


def _mac(key: bytes, name: str) -> str:
    return hmac.new(key, f"bundle verdict {name}".encode(), hashlib.sha256).hexdigest()


def _remembered(folder: cachedir.Folder, name: str) -> bool:
    data = folder.read_own(name, 4096)
    key = folder.read_own(KEY_FILE, 64)
    if not data or not key or len(key) != 32:
        return False
    try:
        mac = json.loads(data).get("mac", "")
    except (ValueError, AttributeError):
        return False
    return isinstance(mac, str) and hmac.compare_digest(mac, _mac(key, name))


def check_once(payload: Payload, cache_root: Path, say=lambda msg: None) -> dict:
    """Hash what the runtime is about to use, unless this very file was checked before.
    Returns figures (checked: bool, seconds, bytes); raises DamagedError naming the part."""
    name = verdict_key(payload)
    try:
        with cachedir.Folder.open_root(cache_root) as root, root.sub("verified") as folder:
            if _remembered(folder, name):
                return {"checked": False, "seconds": 0.0, "bytes": 0}
    except OSError:
        pass  # a cache we cannot read: check
    names = parts_to_check(payload)
    total = payload.checked_bytes(names) + sum(p.size for p in payload.manifest.model.parts)
    t0 = time.perf_counter()
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    progress = _Progress(total, say, tty)
    problems = (payload.check_header() + payload.check_parts(names, progress=progress)
                + payload.check_model_parts(progress=progress))
    progress.end()
    seconds = time.perf_counter() - t0
    if problems:
        more = f" ({len(problems) - 1} more damaged part(s): run --verify to list them)" if len(problems) > 1 else ""
        if problems[0].startswith("model part"):
            raise DamagedError(f"{problems[0]}{more}; copy that file again (it belongs beside {payload.path})")
        raise DamagedError(f"{payload.path}: {problems[0]}{more}; copy the file again")
    try:
        with cachedir.Folder.open_root(cache_root) as root, root.sub("verified") as folder:
            record = {"path": os.fsdecode(payload.path), "checked": time.time(), "bytes": total,
                      "seconds": seconds, "mac": _mac(_mac_key(folder), name)}
            folder.write_atomic(name, json.dumps(record, ensure_ascii=True).encode())
    except OSError:
        pass  # a cache we cannot write: the next launch checks again
    return {"checked": True, "seconds": seconds, "bytes": total}


def model_checked_once(path: str, offset: int, size: int, expected: str, cache_root: Path, say=lambda msg: None) -> bool:
    """Whether the model at offset in path (size bytes) has this digest (runtime/digest.py): hashed
    the first time, remembered (under the cache's MAC) per identity of that file, as check_once
    does. An adapter-only bundle checks the base it found so."""
    st = os.stat(path)
    ident = f"base:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{offset}:{size}:{expected}"
    name = hashlib.sha256(ident.encode()).hexdigest()[:32]
    try:
        with cachedir.Folder.open_root(cache_root) as root, root.sub("verified") as folder:
            if _remembered(folder, name):
                return True
    except OSError:
        pass
    progress = _Progress(size, say, bool(getattr(sys.stderr, "isatty", lambda: False)()))
    try:
        with open(path, "rb") as f:
            got = digest.of_span(f, offset, size, digest.algorithm_of(expected), progress)
    except EOFError:
        return False
    progress.end()
    if got != expected:
        return False
    try:
        with cachedir.Folder.open_root(cache_root) as root, root.sub("verified") as folder:
            record = {"path": os.fsdecode(path), "checked": time.time(), "bytes": size,
                      "mac": _mac(_mac_key(folder), name)}
            folder.write_atomic(name, json.dumps(record, ensure_ascii=True).encode())
    except OSError:
        pass
    return True
