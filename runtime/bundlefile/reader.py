"""Reading a bundle: its payload found from the end (or, when the end is cut, from the front),
every field of its table of contents checked before use (fields.py, manifest.py), and its parts
hashed on request. The layout it reads is in layout.py and docs/format.md."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from .. import digest
from ..errors import DamagedError, IncompleteError, NewerFormatError, NotABundleError, PayloadError
from .exe import find_cookie, masked, pe_hash_mask, pe_signature, read_at, stub_end
from .fields import Invalid, as_object, take
from .layout import (CHUNK, ENTRY_ALIGN, FORMAT_VERSION, HEADER_MAGIC, HEADER_SEARCH, HEADER_SIZE, KNOWN_ENTRIES,
                     MAX_ADAPTERS, MAX_TOC_SIZE, PYI_COOKIE_SIZE, REGIONS, STORED_TARGETS, TRAILER_MAGIC, Entry, Region, align_up,
                     entry_kind, lora_entry, unpack_header)
from .manifest import Manifest

__all__ = ["DamagedError", "IncompleteError", "NewerFormatError", "NotABundleError", "PayloadError", "Payload",
           "read_payload"]


@dataclass
class Payload:
    """A payload as read from a file: where it is and what it holds (all of it checked)."""

    path: str
    payload_start: int
    payload_size: int
    file_size: int
    version: int
    entries: dict[str, Entry]
    manifest: Manifest = field(default_factory=Manifest)
    regions: dict[str, Region] = field(default_factory=dict)
    toc_sha256: str = ""
    signature: tuple[int, int] | None = None  # a Windows bundle's Authenticode table after it
    # Where its bytes are read from: the path, or /proc/self/fd/N of the descriptor the runtime
    # opened once at launch, so that what was checked is what runs (issue 22.3). `path` names
    # the file in messages.
    source: str = ""

    def __post_init__(self):
        self.source = self.source or self.path

    def for_runtime(self, target: str) -> "Payload":
        """This payload as the runtime of target sees it. In a universal file that is not the
        front runtime's, its own entries ("linux-aarch64/native/cpu.tar.zst") go by the plain
        names, the other runtimes' entries are left out, and manifest.stub is its own stub; the
        model and the regions are shared. Anything else is returned as it is."""
        stub = self.manifest.runtimes.get(target)
        if stub is None or target == self.manifest.stub.target:
            return self
        prefix = target + "/"
        entries = {}
        for name, e in self.entries.items():
            if name.startswith(prefix):
                plain = name[len(prefix):]
                entries[plain] = dataclasses.replace(e, name=plain)
            elif name.partition("/")[0] not in STORED_TARGETS and entry_kind(name).placement == "mapped":
                entries[name] = e
        return dataclasses.replace(self, entries=entries,
                                   manifest=dataclasses.replace(self.manifest, stub=stub, runtimes={}))

    def absolute_offset(self, name: str) -> int:
        return self.payload_start + self.entries[name].offset

    def _chunks(self, offset: int, size: int, what: str) -> Iterator[bytes]:
        with open(self.source, "rb") as f:
            f.seek(offset)
            left = size
            while left:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise IncompleteError(f"{self.path}: {what} ends early; this file is incomplete, copy it again")
                left -= len(chunk)
                yield chunk

    def open_entry(self, name: str) -> Iterator[bytes]:
        """Stream an entry's stored bytes in chunks."""
        entry = self.entries[name]
        return self._chunks(self.payload_start + entry.offset, entry.size, f"entry {name}")

    def read_entry(self, name: str) -> bytes:
        return b"".join(self.open_entry(name))

    def check_parts(self, names=None, progress=None) -> list[str]:
        """Hash the named entries and regions (all when None), each with its own algorithm
        (BLAKE3, or SHA-256 in bundles from before); a list of what does not match."""
        problems = []
        parts = [(e.name, self.payload_start + e.offset, e.size, e.digest, f"{e.name} ({entry_kind(e.name).what})")
                 for e in self.entries.values()]
        parts += [(r.name, r.offset, r.size, r.digest, REGIONS[r.name]) for r in self.regions.values()]
        mask = []
        if "bootloader" in self.regions:
            with open(self.source, "rb") as f:
                mask = pe_hash_mask(f)
        with open(self.source, "rb") as f:
            for name, offset, size, expected, label in parts:
                if names is not None and name not in names:
                    continue
                algorithm = digest.algorithm_of(expected)
                try:
                    if name == "bootloader" and mask:  # a signed Windows program: its signature is not hashed
                        h, at = digest.hasher(algorithm), offset
                        for chunk in self._chunks(offset, size, label):
                            h.update(masked(chunk, at, mask))
                            at += len(chunk)
                            if progress:
                                progress(len(chunk))
                        got = digest.make(algorithm, h.hexdigest())
                    else:
                        got = digest.of_span(f, offset, size, algorithm, progress)
                except (IncompleteError, EOFError):
                    problems.append(f"{label}: cut short (expected {size} bytes at {offset})")
                    continue
                if got != expected:
                    problems.append(f"{label}: damaged (bytes {offset}-{offset + size - 1}; {digest.short(got)}, "
                                    f"expected {digest.hex_of(expected)[:12]}…)")
        return problems

    def check_header(self) -> list[str]:
        """The payload header at the front must repeat the trailer."""
        with open(self.source, "rb") as f:
            data = read_at(f, self.payload_start, HEADER_SIZE)
        trailer = self._trailer_fields()
        if len(data) != HEADER_SIZE or data[:8] != HEADER_MAGIC or unpack_header(data)[1:] != trailer[1:]:
            return [f"the payload header: damaged (bytes {self.payload_start}-{self.payload_start + HEADER_SIZE - 1})"]
        return []

    def _trailer_fields(self) -> tuple:
        with open(self.source, "rb") as f:
            return unpack_header(read_at(f, self.payload_start + self.payload_size - HEADER_SIZE, HEADER_SIZE))

    def verify(self, progress=None) -> list[str]:
        """Recompute every hash: entries, the runtime's regions, the header, the model's parts
        beside the file. Every damaged region is listed (empty when intact)."""
        problems = []
        actual = os.path.getsize(self.source)
        if self.signature and actual == self.signature[0] + self.signature[1]:
            actual = self.file_size  # the signature after the bundle is not part of it
        if actual != self.file_size:
            problems.append(incomplete_message(self.path, actual, self.file_size))
        problems += self.check_header()
        problems += self.check_parts(progress=progress)
        problems += self.check_model_parts(progress=progress)
        return problems

    def checked_bytes(self, names) -> int:
        return sum(e.size for e in self.entries.values() if e.name in names) + sum(
            r.size for r in self.regions.values() if r.name in names)

    # -- a model split into parts beside the executable (bundle build --split) ---------------

    def model_part_paths(self) -> list[str]:
        folder = os.path.dirname(os.path.abspath(self.path))
        return [os.path.join(folder, p.file) for p in self.manifest.model.parts]

    def part_label(self, i: int) -> str:
        parts = self.manifest.model.parts
        return f"model part {i + 1} of {len(parts)} ({parts[i].file})"

    def find_model_parts(self) -> list[str]:
        """The parts' paths, each present with its recorded size; raises PayloadError naming
        the first that is missing or of the wrong size."""
        paths = self.model_part_paths()
        for i, (path, part) in enumerate(zip(paths, self.manifest.model.parts)):
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                raise PayloadError(f"{self.part_label(i)} is missing: it must be in the same folder as "
                                   f"{self.path}; copy it there") from None
            except OSError as exc:
                raise PayloadError(f"cannot read {self.part_label(i)} beside {self.path}: {exc.strerror}") from None
            if size != part.size:
                raise PayloadError(f"{self.part_label(i)} is {size} bytes, not {part.size}: it is incomplete or "
                                   "from another build; copy it again")
        return paths

    def check_model_parts(self, progress=None) -> list[str]:
        problems = []
        for i, (path, part) in enumerate(zip(self.model_part_paths(), self.manifest.model.parts)):
            try:
                with open(path, "rb") as f:
                    got = digest.of_span(f, 0, os.fstat(f.fileno()).st_size, digest.algorithm_of(part.digest),
                                         progress)
            except OSError as exc:
                problems.append(f"{self.part_label(i)}: cannot be read ({exc.strerror})")
                continue
            if got != part.digest:
                problems.append(f"{self.part_label(i)}: damaged ({digest.short(got)}, "
                                f"expected {digest.hex_of(part.digest)[:12]}…)")
        return problems

    def model_parts_identity(self) -> str:
        """Device, inode, size, mtime and ctime of every part: what a remembered check is keyed on."""
        out = []
        for path in self.model_part_paths():
            try:
                st = os.stat(path)
                out.append(f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}")
            except OSError:
                out.append("missing")
        return ";".join(out)


def file_chunks(path):
    with open(path, "rb") as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return
            yield data


def incomplete_message(path: str, actual: int, expected: int) -> str:
    if actual > expected:  # something was appended after it was built
        return (f"this file has {actual - expected} byte(s) more than it was built with ({actual} instead of "
                f"{expected}: something was appended to {path}); copy it again, or cut them off: "
                f"truncate -s {expected} {path}")
    return (
        f"this file is incomplete: {actual} of {expected} bytes ({path}); copy it again"
    )




def _find_trailer(f: BinaryIO, file_size: int) -> tuple[int, tuple] | None:
    """(payload end, trailer fields) from the tail; None when the tail is missing."""
    found = find_cookie(f, file_size)
    if found is None:
        return None
    cookie_pos, pkg_len = found
    # TAIL_COOKIE: the trailer is right before the cookie copy.
    # TAIL_ARCHIVE: the trailer is right before the archive copy.
    for end in (cookie_pos, cookie_pos + PYI_COOKIE_SIZE - pkg_len):
        data = read_at(f, end - HEADER_SIZE, HEADER_SIZE)
        if len(data) == HEADER_SIZE and data[:8] == TRAILER_MAGIC:
            return end, unpack_header(data)
    return None


def _find_header_from_front(f: BinaryIO, file_size: int) -> tuple | None:
    """The payload header of a file whose tail is gone: right after the stub's ELF data, or
    failing that on a 64 KiB boundary near the front."""
    end = stub_end(f, file_size)
    candidates = [align_up(end)] if end else []
    candidates += range(ENTRY_ALIGN, min(file_size, HEADER_SEARCH), ENTRY_ALIGN)
    for offset in candidates:
        data = read_at(f, offset, HEADER_SIZE)
        if len(data) == HEADER_SIZE and data[:8] == HEADER_MAGIC:
            return offset, unpack_header(data)
    return None


def _no_payload(path: str, f: BinaryIO, file_size: int) -> PayloadError:
    """Why a file with no payload table at either end has none: cut short right after (or
    inside) its runtime, or not a bundle at all."""
    end = stub_end(f, file_size)
    if end and file_size < end:
        return IncompleteError(f"this file is incomplete: it ends after {file_size} bytes, inside its "
                               f"runtime ({path}); copy it again")
    if end and file_size > end:
        header_at = align_up(end)
        if file_size < header_at + HEADER_SIZE:
            piece = read_at(f, header_at, HEADER_SIZE)
            if HEADER_MAGIC.startswith(piece[:8]) and not any(read_at(f, end, max(0, header_at - end))):
                return IncompleteError(f"this file is incomplete: it ends after {file_size} bytes, before its "
                                       f"model ({path}); copy it again")
    return NotABundleError(f"{path} is not a bundle (no bundle payload found)")


def read_payload(path: str, source: str | None = None) -> Payload:
    """Read and check a bundle's payload table. Raises a PayloadError subclass. source: where to
    read it from when not from path (an open descriptor's /proc/self/fd/N)."""
    try:
        st = os.stat(source or path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block, or never end
            raise NotABundleError(f"{path} is not a regular file, so not a bundle")
        file_size = st.st_size
        f = open(source or path, "rb")
    except IsADirectoryError:
        raise NotABundleError(f"{path} is a directory, not a bundle") from None
    except OSError as exc:
        raise PayloadError(f"cannot read {path}: {exc.strerror}") from None
    damaged = f"{path}: the bundle's table of contents is damaged"
    with f:
        try:
            signature = pe_signature(f, file_size)
            if signature:  # signed after it was built: the bundle ends where the signature starts
                payload = _read_payload(path, f, signature[0], damaged, signed=True, source=source)
                payload.signature = signature
                return payload
            return _read_payload(path, f, file_size, damaged, source=source)
        except Invalid as exc:
            raise PayloadError(f"{damaged} ({exc}); copy the file again") from None
        except (struct.error, OverflowError, ValueError):
            raise PayloadError(f"{damaged}; copy the file again") from None


def _read_payload(path: str, f: BinaryIO, file_size: int, damaged: str, signed: bool = False,
                  source: str | None = None) -> Payload:
    found = _find_trailer(f, file_size)
    if found is None:
        # No trailer: not a bundle, or its end was cut off.
        front = _find_header_from_front(f, file_size)
        if front is None:
            raise _no_payload(path, f, file_size)
        _check_version(path, front[1][1])
        if file_size < front[1][4]:
            raise IncompleteError(incomplete_message(path, file_size, front[1][4]))
        raise PayloadError(f"{path}: the end of this bundle is damaged; copy the file again")
    payload_end, trailer = found
    _, version, flags, payload_size, expected_size, toc_offset, toc_size, toc_digest = trailer
    _check_version(path, version)
    # (a signature starts on an 8-byte boundary: up to 7 zero bytes of padding before it)
    if file_size != expected_size and not (signed and 0 < file_size - expected_size < 8
                                           and not any(read_at(f, expected_size, file_size - expected_size))):
        raise IncompleteError(incomplete_message(path, file_size, expected_size))
    file_size = expected_size
    payload_start = payload_end - payload_size
    # The header's numbers, before any is used: the layout the writer makes, exactly.
    if (flags != 0 or payload_start < 0 or payload_start % ENTRY_ALIGN or payload_size % ENTRY_ALIGN
            or toc_size > MAX_TOC_SIZE or toc_offset < ENTRY_ALIGN
            or toc_offset + toc_size + HEADER_SIZE != payload_size):
        raise Invalid("trailer", "its offsets do not describe a payload")
    toc = read_at(f, payload_start + toc_offset, toc_size)
    if len(toc) != toc_size or hashlib.sha256(toc).digest()[:16] != toc_digest:
        raise PayloadError(f"{damaged}; copy the file again")
    try:
        data = json.loads(toc.decode("utf-8"))
    except (ValueError, RecursionError):
        raise Invalid("toc", "not JSON") from None
    data = as_object(data, "toc")
    if take(data, "format", int, "toc", required=True, lo=0, hi=1 << 16) != version:
        raise Invalid("toc.format", "differs from the trailer's version")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or len(raw_entries) > len(KNOWN_ENTRIES) + MAX_ADAPTERS:
        raise Invalid("toc.entries", "expected a short list")
    entries: dict[str, Entry] = {}
    for i, raw in enumerate(raw_entries):
        entry = Entry.from_json(raw, f"toc.entries[{i}]")
        if entry.name in entries:
            raise Invalid(f"toc.entries[{i}]", f"{entry.name} appears twice")
        if entry.offset % ENTRY_ALIGN:
            raise Invalid(f"toc.entries[{i}].offset", "not on a 64 KiB boundary")
        if entry.offset + entry.size > toc_offset:
            raise PayloadError(f"{path}: entry {entry.name} lies outside the payload; copy the file again")
        entries[entry.name] = entry
    spans = sorted((e.offset, e.offset + e.size, e.name) for e in entries.values())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise Invalid("toc.entries", f"{a} and {b} overlap")
    regions: dict[str, Region] = {}
    raw_regions = data.get("regions") or []
    if not isinstance(raw_regions, list) or len(raw_regions) > len(REGIONS):
        raise Invalid("toc.regions", "expected a short list")
    for i, raw in enumerate(raw_regions):
        region = Region.from_json(raw, f"toc.regions[{i}]")
        end = region.offset + region.size
        inside_payload = region.offset < payload_end and end > payload_start
        if region.name in regions or end > file_size or inside_payload:
            raise Invalid(f"toc.regions[{i}]", "outside the file, inside the payload, or twice")
        regions[region.name] = region
    manifest = Manifest.from_json(data.get("manifest") or {}, "manifest")
    for adapter in manifest.adapters:
        if lora_entry(adapter.name) not in entries:
            raise Invalid("manifest.adapters", f"adapter {adapter.name} has no entry")
    return Payload(
        path=path,
        payload_start=payload_start,
        payload_size=payload_size,
        file_size=expected_size,
        version=version,
        entries=entries,
        manifest=manifest,
        regions=regions,
        toc_sha256=hashlib.sha256(toc).hexdigest(),
        source=source,
    )




def _check_version(path: str, version: int) -> None:
    if version > FORMAT_VERSION:
        raise NewerFormatError(
            f"{path} uses bundle format {version}, newer than this program understands "
            f"({FORMAT_VERSION}); use a newer bundle/runtime to read it"
        )

