"""Writing a payload (the bundler's side): entries copied in at 64 KiB boundaries while a second
thread hashes them, then the table of contents, the trailer and, last, the header at the front;
and the tail that ends a bundle."""

from __future__ import annotations

import errno
import json
import os
import struct
from typing import BinaryIO

from .. import digest
from .layout import (CHUNK, ENTRY_ALIGN, FORMAT_VERSION, HEADER_MAGIC, HEADER_SIZE, PYI_COOKIE_SIZE, TAIL_PAD,
                     TRAILER_MAGIC, Entry, align_up, pack_header)
from .manifest import Manifest
from .reader import file_chunks

def make_tail(stub_archive: bytes, cookie_end_in_bundle: int, archive_start: int) -> bytes:
    """The bytes that end a bundle (see the layout above).

    stub_archive is the stub's archive from its start to the end of its cookie; the tail goes
    at cookie_end_in_bundle - PYI_COOKIE_SIZE (TAIL_COOKIE) if the stretched pkg_len fits in
    32 bits, else it is the archive copied whole (TAIL_ARCHIVE)."""
    cookie = bytearray(stub_archive[-PYI_COOKIE_SIZE:])
    stretched = cookie_end_in_bundle - archive_start
    pad = bytes(TAIL_PAD)
    if stretched < 2**32:
        struct.pack_into("!I", cookie, 8, stretched)
        return bytes(cookie) + pad
    return stub_archive + pad




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
        (BLAKE3 and file writes both release the GIL), so a build runs at copy speed."""
        return self._add_stream_at(name, self._seek_next(), chunks, compression, unpacked_size, progress)

    def _add_stream_at(self, name, offset, chunks, compression, unpacked_size, progress) -> Entry:
        from concurrent.futures import ThreadPoolExecutor

        h = digest.hasher(digest.NEW)
        size = 0
        with ThreadPoolExecutor(1) as hasher:
            hashed = None
            for chunk in chunks:
                if hashed is not None:
                    hashed.result()
                hashed = hasher.submit(h.update, chunk)
                self.f.write(chunk)
                size += len(chunk)
                if progress:
                    progress(len(chunk))
            if hashed is not None:
                hashed.result()
        entry = Entry(name, offset, size, compression, digest.make(digest.NEW, h.hexdigest()), unpacked_size)
        self.entries.append(entry)
        self.pos = offset + size
        return entry

    def add_file(self, name: str, path, compression: str = "none", unpacked_size=None, progress=None) -> Entry:
        """Copy a file in as one entry: the kernel copies (copy_file_range, no trip through
        Python; a reflink where the filesystem can) while a second thread hashes the source.
        Falls back to add_stream where the kernel cannot."""
        import threading

        if not hasattr(os, "copy_file_range"):
            return self.add_stream(name, file_chunks(path), compression, unpacked_size, progress)
        offset = self._seek_next()
        self.f.flush()
        before = os.stat(path)
        hashed: list = []
        failed: list = []

        def hash_source():  # mapped, not read: blake3 takes the pages straight from the page cache
            try:
                with open(path, "rb") as src_file:
                    hashed.append(digest.of_span(src_file, 0, before.st_size, digest.NEW))
            except (OSError, EOFError) as exc:
                failed.append(exc if isinstance(exc, OSError) else OSError(errno.EIO, f"{path} shrank while read"))

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
                return self._add_stream_at(name, offset, file_chunks(path), compression, unpacked_size, progress)
            raise
        finally:
            os.close(src)
            hasher.join()
        if failed:
            raise failed[0]
        after = os.stat(path)
        if copied != before.st_size or (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise OSError(errno.EIO, f"{path} changed while it was being copied")
        entry = Entry(name, offset, copied, compression, hashed[0], unpacked_size)
        self.entries.append(entry)
        self.pos = offset + copied
        return entry

    def add_bytes(self, name: str, data: bytes, compression: str = "none", unpacked_size=None) -> Entry:
        return self.add_stream(name, [data], compression, unpacked_size)

    def toc_bytes(self, manifest: "Manifest | dict", regions=()) -> bytes:
        body = manifest.to_json() if isinstance(manifest, Manifest) else manifest
        return json.dumps(
            {"format": FORMAT_VERSION, "entries": [e.to_json() for e in self.entries], "manifest": body,
             "regions": [r.to_json() for r in regions]},
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
