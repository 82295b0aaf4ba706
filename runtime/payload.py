"""The bundle payload format: the one module that both the writer (bundler) and the reader
(runtime) use.

A Linux bundle is the stub, unchanged, followed by the payload and a tail::

    0                PyInstaller bootloader (ELF program)
    archive_start    PyInstaller's CArchive, ending in its cookie ("MEI\\014\\013\\012\\013\\016")
    ...              ELF section header table: the stub ends here, a complete ELF file
    payload_start    payload, on the next 64 KiB boundary
    ...              tail: a copy of the cookie, with pkg_len stretched to reach back to the
                     archive (TAIL_COOKIE); or, when that distance does not fit the cookie's
                     32-bit pkg_len (payloads over ~4 GiB), a copy of the whole archive and
                     cookie (TAIL_ARCHIVE).

Why this layout (DESIGN.md facts 1-3): PyInstaller's bootloader finds its archive by scanning
backwards from the end of the file for the cookie. The tail puts a cookie in the last bytes, so
launching costs no scan however large the model (appending 200 MB with no cookie after it cost
2.5 s per launch). A copy cut short (an interrupted USB copy) loses the tail: the bootloader
then scans back to the stub's own cookie, still runs, and the runtime says "this file is
incomplete: N of M bytes" instead of the bootloader failing with no explanation. The ELF
headers are never touched (readelf reads a bundle like the stub).

The payload itself::

    +0               HEADER (64 bytes, magic HEADER_MAGIC)
    +ENTRY_ALIGN...  entry data; every entry starts on a 64 KiB boundary, so the GGUF's tensor
                     data lands on a 32-byte aligned file offset and can be memory-mapped
    +toc_offset      table of contents: UTF-8 JSON {"format", "entries": [...], "manifest": {...}}
    +size-64         TRAILER (64 bytes, same layout as HEADER, magic TRAILER_MAGIC)

The trailer is found from the end of the file (just before the tail); the header from the
front (right after the stub's ELF), so a damaged file can still tell how big it should be.
Offsets inside the payload are relative to payload_start and 64-bit.

    struct header {             // little-endian, 64 bytes
        char     magic[8];      // "BNDLHEAD" or "BNDLTAIL"
        uint32_t version;       // FORMAT_VERSION; readers refuse a newer one
        uint32_t flags;         // reserved, 0
        uint64_t payload_size;  // header start to trailer end
        uint64_t file_size;     // size of the complete bundle file
        uint64_t toc_offset;    // relative to payload start
        uint64_t toc_size;
        uint8_t  toc_sha256[16];// first 16 bytes of sha256(toc)
    };
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

FORMAT_VERSION = 1
HEADER_MAGIC = b"BNDLHEAD"
TRAILER_MAGIC = b"BNDLTAIL"
HEADER_FORMAT = "<8sIIQQQQ16s"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
assert HEADER_SIZE == 64

ENTRY_ALIGN = 64 * 1024
CHUNK = 4 * 1024 * 1024

# PyInstaller's CArchive cookie: magic, pkg_len, toc_offset, toc_len, pyver, pylib (DESIGN.md #1).
PYI_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
PYI_COOKIE_FORMAT = "!8sIIii64s"
PYI_COOKIE_SIZE = struct.calcsize(PYI_COOKIE_FORMAT)
# The cookie (copy) ends a bundle; in a bare stub it sits before the ELF section headers.
COOKIE_SEARCH = 64 * 1024
# How far from the front the header of a damaged file is looked for, when the ELF headers do
# not say where the stub ends.
HEADER_SEARCH = 1024 * 1024 * 1024

MODEL_ENTRY = "model.gguf"
# zstd tars of native libraries, unpacked once per machine (runtime/native.py)
NATIVE_CPU_ENTRY = "native/cpu.tar.zst"
NATIVE_CUDA_ENTRY = "native/cuda.tar.zst"


class PayloadError(Exception):
    """The file is not a bundle, or its payload is damaged. The message says what to do."""


class NotABundleError(PayloadError):
    pass


class IncompleteError(PayloadError):
    pass


class NewerFormatError(PayloadError):
    pass


def align_up(value: int, alignment: int = ENTRY_ALIGN) -> int:
    return (value + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class Entry:
    name: str
    offset: int  # relative to payload start
    size: int  # stored bytes
    compression: str  # "none" or "zstd"
    sha256: str  # of the stored bytes
    unpacked_size: int | None = None

    def to_json(self) -> dict:
        data = {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "compression": self.compression,
            "sha256": self.sha256,
        }
        if self.unpacked_size is not None:
            data["unpacked_size"] = self.unpacked_size
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Entry":
        return cls(
            name=str(data["name"]),
            offset=int(data["offset"]),
            size=int(data["size"]),
            compression=str(data.get("compression", "none")),
            sha256=str(data["sha256"]),
            unpacked_size=data.get("unpacked_size"),
        )


@dataclass
class Payload:
    """A payload as read from a file: where it is and what it holds."""

    path: str
    payload_start: int
    payload_size: int
    file_size: int
    version: int
    entries: dict[str, Entry]
    manifest: dict = field(default_factory=dict)

    def absolute_offset(self, name: str) -> int:
        return self.payload_start + self.entries[name].offset

    def open_entry(self, name: str) -> Iterator[bytes]:
        """Stream an entry's stored bytes in chunks."""
        entry = self.entries[name]
        with open(self.path, "rb") as f:
            f.seek(self.payload_start + entry.offset)
            left = entry.size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise IncompleteError(
                        f"{self.path}: entry {name} ends early; this file is incomplete, copy it again"
                    )
                left -= len(chunk)
                yield chunk

    def read_entry(self, name: str) -> bytes:
        return b"".join(self.open_entry(name))

    def verify(self, progress=None) -> list[str]:
        """Recompute every hash. Returns a list of problems (empty when intact)."""
        problems = []
        actual = os.path.getsize(self.path)
        if actual != self.file_size:
            problems.append(incomplete_message(self.path, actual, self.file_size))
        for entry in self.entries.values():
            digest = hashlib.sha256()
            try:
                for chunk in self.open_entry(entry.name):
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))
            except IncompleteError:
                problems.append(f"{entry.name}: cut short (expected {entry.size} bytes)")
                continue
            if digest.hexdigest() != entry.sha256:
                problems.append(
                    f"{entry.name}: damaged (sha256 {digest.hexdigest()[:16]}…, "
                    f"expected {entry.sha256[:16]}…)"
                )
        return problems


def _file_chunks(path):
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield data


def incomplete_message(path: str, actual: int, expected: int) -> str:
    return (
        f"this file is incomplete: {actual} of {expected} bytes ({path}); copy it again"
    )


def pack_header(magic: bytes, payload_size: int, file_size: int, toc_offset: int, toc: bytes) -> bytes:
    return struct.pack(
        HEADER_FORMAT,
        magic,
        FORMAT_VERSION,
        0,
        payload_size,
        file_size,
        toc_offset,
        len(toc),
        hashlib.sha256(toc).digest()[:16],
    )


def unpack_header(data: bytes) -> tuple:
    return struct.unpack(HEADER_FORMAT, data)


def find_cookie(f: BinaryIO, file_size: int) -> tuple[int, int] | None:
    """(cookie offset, pkg_len) of the last PyInstaller cookie near the end, or None."""
    start = max(0, file_size - COOKIE_SEARCH)
    f.seek(start)
    tail = f.read(file_size - start)
    pos = tail.rfind(PYI_COOKIE_MAGIC)
    if pos < 0 or pos + PYI_COOKIE_SIZE > len(tail):
        return None
    _, pkg_len, *_ = struct.unpack(PYI_COOKIE_FORMAT, tail[pos : pos + PYI_COOKIE_SIZE])
    return start + pos, pkg_len


def find_archive_start(f: BinaryIO, file_size: int) -> int | None:
    """Offset of the PyInstaller archive the bootloader would use; None if there is none."""
    found = find_cookie(f, file_size)
    if found is None:
        return None
    archive_start = found[0] + PYI_COOKIE_SIZE - found[1]
    return archive_start if archive_start >= 0 else None


def elf_end(f: BinaryIO) -> int | None:
    """Where an ELF file's section header table ends (the end of a PyInstaller stub)."""
    f.seek(0)
    head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return None
    e = "<" if head[5] == 1 else ">"
    (e_shoff,) = struct.unpack_from(e + "Q", head, 0x28)
    e_shentsize, e_shnum = struct.unpack_from(e + "HH", head, 0x3A)
    return e_shoff + e_shentsize * e_shnum


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    if offset < 0:
        return b""
    f.seek(offset)
    return f.read(n)


def _find_trailer(f: BinaryIO, file_size: int) -> tuple[int, tuple] | None:
    """(payload end, trailer fields) from the tail; None when the tail is missing."""
    found = find_cookie(f, file_size)
    if found is None:
        return None
    cookie_pos, pkg_len = found
    # TAIL_COOKIE: the trailer is right before the cookie copy.
    # TAIL_ARCHIVE: the trailer is right before the archive copy.
    for end in (cookie_pos, cookie_pos + PYI_COOKIE_SIZE - pkg_len):
        data = _read_at(f, end - HEADER_SIZE, HEADER_SIZE)
        if data[:8] == TRAILER_MAGIC:
            return end, unpack_header(data)
    return None


def _find_header_from_front(f: BinaryIO, file_size: int) -> tuple | None:
    """The payload header of a file whose tail is gone: right after the stub's ELF data, or
    failing that on a 64 KiB boundary near the front."""
    end = elf_end(f)
    candidates = [align_up(end)] if end else []
    candidates += range(ENTRY_ALIGN, min(file_size, HEADER_SEARCH), ENTRY_ALIGN)
    for offset in candidates:
        data = _read_at(f, offset, HEADER_SIZE)
        if data[:8] == HEADER_MAGIC:
            return offset, unpack_header(data)
    return None


def read_payload(path: str) -> Payload:
    """Read and check a bundle's payload table. Raises a PayloadError subclass."""
    try:
        file_size = os.path.getsize(path)
        f = open(path, "rb")
    except IsADirectoryError:
        raise NotABundleError(f"{path} is a directory, not a bundle") from None
    except OSError as exc:
        raise PayloadError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        found = _find_trailer(f, file_size)
        if found is None:
            # No trailer: not a bundle, or its end was cut off.
            front = _find_header_from_front(f, file_size)
            if front is None:
                raise NotABundleError(f"{path} is not a bundle (no bundle payload found)")
            _check_version(path, front[1][1])
            if file_size < front[1][4]:
                raise IncompleteError(incomplete_message(path, file_size, front[1][4]))
            raise PayloadError(f"{path}: the end of this bundle is damaged; copy the file again")
        payload_end, trailer = found
        _, version, _, payload_size, expected_size, toc_offset, toc_size, toc_digest = trailer
        _check_version(path, version)
        if file_size != expected_size:
            raise IncompleteError(incomplete_message(path, file_size, expected_size))
        payload_start = payload_end - payload_size
        damaged = f"{path}: the bundle's table of contents is damaged; copy the file again"
        if payload_start < 0 or toc_offset + toc_size > payload_size:
            raise PayloadError(damaged)
        toc = _read_at(f, payload_start + toc_offset, toc_size)
        if hashlib.sha256(toc).digest()[:16] != toc_digest:
            raise PayloadError(damaged)
        try:
            data = json.loads(toc.decode("utf-8"))
            entries = {e["name"]: Entry.from_json(e) for e in data["entries"]}
        except (ValueError, KeyError, TypeError):
            raise PayloadError(damaged) from None
        for entry in entries.values():
            if entry.offset + entry.size > toc_offset:
                raise PayloadError(f"{path}: entry {entry.name} lies outside the payload; copy the file again")
        return Payload(
            path=path,
            payload_start=payload_start,
            payload_size=payload_size,
            file_size=expected_size,
            version=version,
            entries=entries,
            manifest=data.get("manifest", {}),
        )


def make_tail(stub_archive: bytes, cookie_end_in_bundle: int, archive_start: int) -> bytes:
    """The bytes that end a bundle (see the layout above).

    stub_archive is the stub's archive from its start to the end of its cookie; the tail goes
    at cookie_end_in_bundle - PYI_COOKIE_SIZE (TAIL_COOKIE) if the stretched pkg_len fits in
    32 bits, else it is the archive copied whole (TAIL_ARCHIVE)."""
    cookie = bytearray(stub_archive[-PYI_COOKIE_SIZE:])
    stretched = cookie_end_in_bundle - archive_start
    if stretched < 2**32:
        struct.pack_into("!I", cookie, 8, stretched)
        return bytes(cookie)
    return stub_archive


def _check_version(path: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{path} uses bundle format {version}, newer than this program understands "
            f"({FORMAT_VERSION}); use a newer bundle/runtime to read it"
        )


class PayloadWriter:
    """Writes a payload into an open file at a 64 KiB-aligned offset.

    Usage: add_stream()/add_bytes() for each entry, then finish(manifest, file_size) which writes
    the TOC and trailer and, finally, the header at the front.
    """

    def __init__(self, f: BinaryIO, payload_start: int):
        if payload_start % ENTRY_ALIGN:
            raise ValueError("payload must start on a 64 KiB boundary")
        self.f = f
        self.start = payload_start
        self.pos = ENTRY_ALIGN  # the header occupies the first block
        self.entries: list[Entry] = []

    def _seek_next(self) -> int:
        offset = align_up(self.pos)
        self.f.seek(self.start + offset)
        return offset

    def add_stream(self, name: str, chunks, compression: str = "none", unpacked_size=None, progress=None) -> Entry:
        """Write chunks as one entry, hashing them on a second thread while they are written
        (hashlib and file writes both release the GIL), so a build runs at copy speed."""
        return self._add_stream_at(name, self._seek_next(), chunks, compression, unpacked_size, progress)

    def _add_stream_at(self, name, offset, chunks, compression, unpacked_size, progress) -> Entry:
        from concurrent.futures import ThreadPoolExecutor

        digest = hashlib.sha256()
        size = 0
        with ThreadPoolExecutor(1) as hasher:
            hashed = None
            for chunk in chunks:
                if hashed is not None:
                    hashed.result()
                hashed = hasher.submit(digest.update, chunk)
                self.f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
            if hashed is not None:
                hashed.result()
        entry = Entry(name, offset, size, compression, digest.hexdigest(), unpacked_size)
        self.entries.append(entry)
        self.pos = offset + size
        return entry

    def add_file(self, name: str, path, compression: str = "none", unpacked_size=None, progress=None) -> Entry:
        """Copy a file in as one entry: the kernel copies (copy_file_range, no trip through
        Python; a reflink where the filesystem can) while a second thread hashes the source.
        Falls back to add_stream where the kernel cannot."""
        import threading

        if not hasattr(os, "copy_file_range"):
            return self.add_stream(name, _file_chunks(path), compression, unpacked_size, progress)
        offset = self._seek_next()
        self.f.flush()
        before = os.stat(path)
        digest = hashlib.sha256()
        failed: list = []

        def hash_source():
            try:
                for chunk in _file_chunks(path):
                    digest.update(chunk)
            except OSError as exc:
                failed.append(exc)

        hasher = threading.Thread(target=hash_source, daemon=True)
        hasher.start()
        copied = 0
        src = os.open(path, os.O_RDONLY)
        try:
            dst, at = self.f.fileno(), self.start + offset
            while copied < before.st_size:
                n = os.copy_file_range(src, dst, min(64 * CHUNK, before.st_size - copied), copied, at + copied)
                if n == 0:
                    break
                copied += n
                if progress:
                    progress(n)
        except OSError as exc:
            if copied == 0 and exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                hasher.join()
                self.f.seek(self.start + offset)
                return self._add_stream_at(name, offset, _file_chunks(path), compression, unpacked_size, progress)
            raise
        finally:
            os.close(src)
            hasher.join()
        if failed:
            raise failed[0]
        after = os.stat(path)
        if copied != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise OSError(errno.EIO, f"{path} changed while it was being copied")
        entry = Entry(name, offset, copied, compression, digest.hexdigest(), unpacked_size)
        self.entries.append(entry)
        self.pos = offset + copied
        return entry

    def add_bytes(self, name: str, data: bytes, compression: str = "none", unpacked_size=None) -> Entry:
        return self.add_stream(name, [data], compression, unpacked_size)

    def toc_bytes(self, manifest: dict) -> bytes:
        return json.dumps(
            {"format": FORMAT_VERSION, "entries": [e.to_json() for e in self.entries], "manifest": manifest},
            indent=1,
            ensure_ascii=False,
        ).encode("utf-8")

    def size_with(self, toc: bytes) -> int:
        """Payload size once the TOC and trailer are written (ends on a 64 KiB boundary)."""
        return align_up(self.pos + len(toc) + HEADER_SIZE)

    def finish(self, toc: bytes, file_size: int) -> int:
        payload_size = self.size_with(toc)
        toc_offset = payload_size - HEADER_SIZE - len(toc)
        self.f.seek(self.start + toc_offset)
        self.f.write(toc)
        self.f.write(pack_header(TRAILER_MAGIC, payload_size, file_size, toc_offset, toc))
        self.f.seek(self.start)
        self.f.write(pack_header(HEADER_MAGIC, payload_size, file_size, toc_offset, toc))
        return payload_size
