"""The first launch of a bundle on a machine checks its hashes; later launches pay nothing.

Issue 8.2: single-byte flips inside a model's weights make llama.cpp answer garbage with exit 0.
So before the model or the libraries are used for the first time, the runtime hashes them and
its own parts (bootloader, archive, tail) and remembers the verdict in the cache, keyed by the
file's identity: device, inode, size, modification time and the table of contents' hash. A copy
(new inode), an edit (new mtime) or a rebuilt bundle (new TOC) is checked again. A mismatch is
never remembered: every launch of a damaged file stops and names the damaged part.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from .errors import DamagedError
from .payload import MODEL_ENTRY, NATIVE_CPU_ENTRY, Payload

PROGRESS_AFTER = 1.0  # seconds: quick checks say nothing


def verdict_key(payload: Payload) -> str:
    st = os.stat(payload.path)
    ident = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{payload.toc_sha256}"
    if payload.manifest.model.parts:
        ident += "|" + payload.model_parts_identity()
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def parts_to_check(payload: Payload) -> list[str]:
    """The model, the CPU libraries and the runtime's own regions. (The CUDA libraries are
    hashed when they are unpacked, which happens only on machines with an NVIDIA driver.)"""
    return [n for n in (MODEL_ENTRY, NATIVE_CPU_ENTRY) if n in payload.entries] + list(payload.regions)


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


def check_once(payload: Payload, cache_root: Path, say=lambda msg: None) -> dict:
    """Hash what the runtime is about to use, unless this very file was checked before.
    Returns figures (checked: bool, seconds, bytes); raises DamagedError naming the part."""
    folder = cache_root / "verified"
    marker = folder / verdict_key(payload)
    if marker.exists():
        return {"checked": False, "seconds": 0.0, "bytes": 0}
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
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{marker.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"path": os.fsdecode(payload.path), "checked": time.time(),
                                   "bytes": total, "seconds": seconds}, ensure_ascii=True))
        os.replace(tmp, marker)
    except OSError:
        pass  # a cache we cannot write: the next launch checks again
    return {"checked": True, "seconds": seconds, "bytes": total}
