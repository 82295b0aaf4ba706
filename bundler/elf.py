"""Keeping a stub a well-formed ELF file after the payload is inserted before its archive.

PyInstaller's archive lives in a non-loaded section (`pydata`) near the end of the file, and
the section header table follows it. Inserting the payload at the archive start moves both
by `delta` bytes: e_shoff and the sh_offset of every section at or after the insertion point
must move too, or readelf complains (DESIGN.md #3). Loaded segments are all before the
insertion point, so program headers never change.

    Elf64_Ehdr: e_shoff at 0x28 (uint64), e_shentsize at 0x3A, e_shnum at 0x3C (uint16)
    Elf64_Shdr (64 bytes): sh_type at +4 (uint32), sh_offset at +24 (uint64)
"""

from __future__ import annotations

import struct

from .errors import BundleError

SHT_NOBITS = 8


def check_elf64(head: bytes) -> str:
    """'<' or '>' for a 64-bit ELF; raises otherwise."""
    if head[:4] != b"\x7fELF":
        raise BundleError("the stub is not an ELF executable; rebuild it with python build.py")
    if head[4] != 2:
        raise BundleError("the stub is a 32-bit ELF; only 64-bit stubs are supported")
    return "<" if head[5] == 1 else ">"


def patch_for_insert(head: bytes, tail: bytes, insert_at: int, delta: int) -> tuple[bytes, bytes]:
    """Return (head, tail) with section offsets moved by delta.

    head is the file up to insert_at, tail the rest; the section header table must be in the
    tail (it is, in every PyInstaller one-file stub) or in the head.
    """
    e = check_elf64(head)
    e_shoff, = struct.unpack_from(e + "Q", head, 0x28)
    e_shentsize, e_shnum = struct.unpack_from(e + "HH", head, 0x3A)
    head = bytearray(head)
    tail = bytearray(tail)
    if e_shoff == 0 or e_shnum == 0:
        return bytes(head), bytes(tail)
    if e_shoff >= insert_at:
        table, base = tail, e_shoff - insert_at
        struct.pack_into(e + "Q", head, 0x28, e_shoff + delta)
    else:
        table, base = head, e_shoff
    for i in range(e_shnum):
        at = base + i * e_shentsize
        if at + 32 > len(table):
            raise BundleError("the stub's ELF section table is cut short; rebuild it with python build.py")
        sh_type, = struct.unpack_from(e + "I", table, at + 4)
        sh_offset, = struct.unpack_from(e + "Q", table, at + 24)
        if sh_type != SHT_NOBITS and sh_offset >= insert_at:
            struct.pack_into(e + "Q", table, at + 24, sh_offset + delta)
    return bytes(head), bytes(tail)
