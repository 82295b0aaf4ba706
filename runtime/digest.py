"""The hashes a bundle's parts are checked with: BLAKE3 for bundles built now, SHA-256 for those
built before (still read and verified).

BLAKE3 (the `blake3` package: the reference Rust implementation, its SIMD kernels and its own
threads) hashes at memory speed, so the first launch of a big model checks it in a fraction of
the time SHA-256 took (about 0.34 s per GiB here against 0.93, 2 cores). SHA-256 stays for what
other tools check (the universal file's launcher uses sha256sum) and for small things.

A digest is one string, "blake3:<64 hex>" or "sha256:<64 hex>": in the table of contents and the
manifest it is written under its algorithm's name ({"blake3": hex} or {"sha256": hex}), so a
bundle from before reads as it always did.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re

ALGORITHMS = ("blake3", "sha256")
NEW = "blake3"  # what bundles are built with now
CHUNK = 64 << 20  # hashed a piece at a time (progress; blake3 spreads each piece over the cores)
_HEX = re.compile(r"[0-9a-f]{64}\Z")


def is_hex(value) -> bool:
    return isinstance(value, str) and bool(_HEX.match(value))


def make(algorithm: str, hex_digest: str) -> str:
    return f"{algorithm}:{hex_digest}"


def split(digest: str) -> tuple[str, str]:
    """(algorithm, hex) of a digest string."""
    algorithm, _, hex_digest = digest.partition(":")
    return algorithm, hex_digest


def is_digest(value) -> bool:
    if not isinstance(value, str):
        return False
    algorithm, hex_digest = split(value)
    return algorithm in ALGORITHMS and is_hex(hex_digest)


def hex_of(digest: str) -> str:
    return split(digest)[1]


def algorithm_of(digest: str) -> str:
    return split(digest)[0]


def short(digest: str) -> str:
    """'blake3 0123456789ab…' for messages."""
    algorithm, hex_digest = split(digest)
    return f"{algorithm} {hex_digest[:12]}…"


def to_json(digest: str) -> dict:
    algorithm, hex_digest = split(digest)
    return {algorithm: hex_digest}


def hasher(algorithm: str = NEW):
    """An object with update() and hexdigest(). BLAKE3 uses every core for large updates (its
    update releases the GIL, so a writer thread can run beside it)."""
    if algorithm == "blake3":
        import blake3

        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown hash {algorithm!r}")


def of_bytes(data, algorithm: str = NEW) -> str:
    h = hasher(algorithm)
    h.update(data)
    return make(algorithm, h.hexdigest())


def of_span(f, offset: int, size: int, algorithm: str, progress=None) -> str:
    """The digest of size bytes at offset in the open file f, read through a memory map (no copy
    into Python; the pages come from the page cache), a CHUNK at a time. Raises EOFError when
    the file is shorter than the span."""
    h = hasher(algorithm)
    if size == 0:
        return make(algorithm, h.hexdigest())
    fd = f.fileno() if hasattr(f, "fileno") else f
    if os.fstat(fd).st_size < offset + size:
        raise EOFError("the file is shorter than the part")
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mapped = mmap.mmap(fd, offset + size - start, access=mmap.ACCESS_READ, offset=start)
    except (OSError, ValueError):  # a file that cannot be mapped: read it
        return _read_span(fd, offset, size, h, algorithm, progress)
    try:
        view = memoryview(mapped)
        try:
            pos = offset - start
            end = pos + size
            while pos < end:
                n = min(CHUNK, end - pos)
                h.update(view[pos:pos + n])
                pos += n
                if progress:
                    progress(n)
        finally:
            view.release()
    finally:
        mapped.close()
    return make(algorithm, h.hexdigest())


def _read_span(fd: int, offset: int, size: int, h, algorithm: str, progress) -> str:
    os.lseek(fd, offset, os.SEEK_SET)
    left = size
    while left:
        chunk = os.read(fd, min(1 << 22, left))
        if not chunk:
            raise EOFError("the file is shorter than the part")
        h.update(chunk)
        left -= len(chunk)
        if progress:
            progress(len(chunk))
    return make(algorithm, h.hexdigest())
