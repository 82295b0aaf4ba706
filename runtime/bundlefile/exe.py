"""The executable a bundle is built on: where its PyInstaller archive and its cookie are, where an
ELF or a PE image ends, a Windows file's Authenticode signature. Read-only, from the front or the
end of an open file; nothing here trusts what it reads beyond the bytes it checks."""

from __future__ import annotations

import struct
from typing import BinaryIO

from .layout import COOKIE_SEARCH, HEADER_SEARCH, PYI_COOKIE_FORMAT, PYI_COOKIE_MAGIC, PYI_COOKIE_SIZE

def find_cookie(f: BinaryIO, file_size: int) -> tuple[int, int] | None:
    """(cookie offset, pkg_len) of the last whole PyInstaller cookie near the end, or None."""
    start = max(0, file_size - COOKIE_SEARCH)
    f.seek(start)
    tail = f.read(file_size - start)
    end = len(tail)
    while True:
        pos = tail.rfind(PYI_COOKIE_MAGIC, 0, end)
        if pos < 0:
            return None
        if pos + PYI_COOKIE_SIZE <= len(tail):
            _, pkg_len, *_ = struct.unpack(PYI_COOKIE_FORMAT, tail[pos : pos + PYI_COOKIE_SIZE])
            return start + pos, pkg_len
        end = pos  # a cookie cut short by the end of the file: look further back


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


def _pe_coff(f: BinaryIO) -> tuple[int, bytes] | None:
    """(file offset, 24 bytes) of a PE file's signature and COFF header; None when f is no PE
    file (a Windows .exe). f is left just after them: at the optional header."""
    f.seek(0)
    head = f.read(64)
    if len(head) < 64 or head[:2] != b"MZ":
        return None
    (e_lfanew,) = struct.unpack_from("<I", head, 0x3C)
    f.seek(e_lfanew)
    coff = f.read(24)
    return (e_lfanew, coff) if len(coff) == 24 and coff[:4] == b"PE\0\0" else None


def pe_image_end(f: BinaryIO) -> int | None:
    """Where a PE file's (Windows .exe) last section ends: PyInstaller's archive follows."""
    found = _pe_coff(f)
    if found is None:
        return None
    e_lfanew, coff = found
    (n_sections,) = struct.unpack_from("<H", coff, 6)
    (opt_size,) = struct.unpack_from("<H", coff, 20)
    f.seek(e_lfanew + 24 + opt_size)
    table = f.read(40 * n_sections)
    if len(table) < 40 * n_sections:
        return None
    end = 0
    for i in range(n_sections):
        raw_size, raw_ptr = struct.unpack_from("<II", table, 40 * i + 16)
        end = max(end, raw_ptr + raw_size)
    return end


def _pe_optional_header(f: BinaryIO) -> tuple[int, bytes] | None:
    """(file offset, bytes) of a PE file's optional header; None when f is no PE file."""
    found = _pe_coff(f)
    if found is None:
        return None
    e_lfanew, coff = found
    (opt_size,) = struct.unpack_from("<H", coff, 20)
    opt = f.read(opt_size)
    return (e_lfanew + 24, opt) if len(opt) == opt_size and opt_size >= 96 else None


def _pe_signature_fields(opt: bytes) -> tuple[int, int] | None:
    """Offsets, inside the optional header, of the checksum and of the certificate-table entry
    (data directory 4): the two fields Authenticode signing rewrites."""
    magic = struct.unpack_from("<H", opt, 0)[0]
    dirs = {0x20B: 112, 0x10B: 96}.get(magic)  # PE32+, PE32
    if dirs is None or len(opt) < dirs + 5 * 8 or struct.unpack_from("<I", opt, dirs - 4)[0] < 5:
        return None
    return 64, dirs + 4 * 8


def pe_signature(f: BinaryIO, file_size: int) -> tuple[int, int] | None:
    """(offset, size) of a Windows bundle's Authenticode certificate table when one ends the
    file (a bundle signed with signtool or osslsigncode after it was built), else None."""
    found = _pe_optional_header(f)
    fields = found and _pe_signature_fields(found[1])
    if not fields:
        return None
    offset, size = struct.unpack_from("<II", found[1], fields[1])
    if offset and size and offset + size == file_size:
        return offset, size
    return None


def pe_hash_mask(f: BinaryIO) -> list[tuple[int, int]]:
    """The (offset, length) spans a hash of a PE stub leaves out (hashed as zeros): its checksum
    and its certificate-table entry, which signing the bundle rewrites. Empty for ELF files."""
    found = _pe_optional_header(f)
    fields = found and _pe_signature_fields(found[1])
    if not fields:
        return []
    return [(found[0] + fields[0], 4), (found[0] + fields[1], 8)]


def masked(chunk: bytes, at: int, mask: list[tuple[int, int]]) -> bytes:
    """chunk (read at file offset at) with the mask's spans zeroed."""
    for offset, length in mask:
        lo, hi = max(offset, at), min(offset + length, at + len(chunk))
        if lo < hi:
            chunk = chunk[:lo - at] + bytes(hi - lo) + chunk[hi - at:]
    return chunk


def stub_end(f: BinaryIO, file_size: int) -> int | None:
    """Where the stub (the runtime) ends in a bundle, read from its front: the ELF section
    headers' end on Linux; on Windows the end of the cookie of the archive that starts right
    after the PE image (found scanning forward; file_size + 1 when the file ends before it:
    cut inside the runtime). None when this is neither."""
    end = elf_end(f)
    if end is not None:
        return end
    image_end = pe_image_end(f)
    if image_end is None:
        return None
    step, at, limit = 1 << 20, image_end, min(file_size, image_end + HEADER_SEARCH)
    while at < limit:
        chunk = read_at(f, at, step + PYI_COOKIE_SIZE)
        pos = chunk.find(PYI_COOKIE_MAGIC)
        while 0 <= pos < step:
            cookie = chunk[pos:pos + PYI_COOKIE_SIZE]
            if len(cookie) == PYI_COOKIE_SIZE:
                _, pkg_len, *_ = struct.unpack(PYI_COOKIE_FORMAT, cookie)
                if at + pos + PYI_COOKIE_SIZE - pkg_len == image_end:
                    return at + pos + PYI_COOKIE_SIZE
            pos = chunk.find(PYI_COOKIE_MAGIC, pos + 1)
        at += step
    return file_size + 1


def read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    if offset < 0:
        return b""
    f.seek(offset)
    return f.read(n)


