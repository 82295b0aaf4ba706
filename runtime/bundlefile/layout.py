"""The bundle file's layout: the constants both the writer (bundler) and the reader (runtime)
use, the kinds of packed entries, and the two records of the table of contents. docs/format.md
describes the format byte by byte; in short:

A Linux bundle is the stub, unchanged, followed by the payload and a tail::

    0                PyInstaller bootloader (ELF program)
    archive_start    PyInstaller's CArchive, ending in its cookie ("MEI\\014\\013\\012\\013\\016")
    ...              ELF section header table: the stub ends here, a complete ELF file
    payload_start    payload, on the next 64 KiB boundary
    ...              tail: a copy of the cookie, with pkg_len stretched to reach back to the
                     archive (TAIL_COOKIE); or, when that distance does not fit the cookie's
                     32-bit pkg_len (payloads over ~4 GiB), a copy of the whole archive and
                     cookie (TAIL_ARCHIVE); then TAIL_PAD zero bytes (a copy cut in its last
                     32 KiB still has a whole cookie, so it starts and says it is cut).

Why this layout (docs/facts.md #1-2): PyInstaller's bootloader finds its archive by scanning
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
    +toc_offset      table of contents: UTF-8 JSON {"format", "entries": [...], "manifest": {...},
                     "regions": [...]}: regions are SHA-256s of the runtime's own parts (the
                     bootloader, its archive, the ELF end, the tail), so verify covers every byte
                     that matters. Every field is checked (types, bounds, names, offsets inside
                     the payload, no overlaps) before any is used.
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

import hashlib
import re
import struct
from dataclasses import dataclass

from ..host.gpu.registry import GPU_BACKENDS
from .. import digest
from .fields import Invalid, as_object, digest_field, take

FORMAT_VERSION = 2  # 2: parts hashed with BLAKE3 (1: SHA-256, still read)
HEADER_MAGIC = b"BNDLHEAD"
TRAILER_MAGIC = b"BNDLTAIL"
HEADER_FORMAT = "<8sIIQQQQ16s"
HEADER_SIZE = struct.calcsize(HEADER_FORMAT)
assert HEADER_SIZE == 64

ENTRY_ALIGN = 64 * 1024
CHUNK = 4 * 1024 * 1024

# PyInstaller's CArchive cookie: magic, pkg_len, toc_offset, toc_len, pyver, pylib (docs/facts.md #1).
PYI_COOKIE_MAGIC = b"MEI\014\013\012\013\016"
PYI_COOKIE_FORMAT = "!8sIIii64s"
PYI_COOKIE_SIZE = struct.calcsize(PYI_COOKIE_FORMAT)
# The cookie (copy) ends a bundle; in a bare stub it sits before the ELF section headers.
COOKIE_SEARCH = 128 * 1024
# How far from the front the header of a damaged file is looked for, when the ELF headers do
# not say where the stub ends.
HEADER_SEARCH = 1024 * 1024 * 1024


# -- what a payload may hold ----------------------------------------------------------------------
# One row per kind of packed entry: a new kind (LoRA adapters, say) is one row here and its
# reader. `placement`: "mapped" is read in place from the bundle file, never copied; "unpacked"
# goes into the per-user cache once per machine (runtime.host.libraries), "unpacked if used" only
# where its device answers.


@dataclass(frozen=True)
class EntryKind:
    name: str  # the entry's name in the table of contents
    what: str  # in messages
    compressions: tuple[str, ...]  # how it may be stored
    placement: str  # "mapped", "unpacked", "unpacked if used"
    reader: str  # the module that reads it


MODEL_ENTRY = "model.gguf"
NATIVE_CPU_ENTRY = "native/cpu.tar.zst"
RUNTIME_ENTRY = "runtime"
# LoRA adapters (bundle build --lora): one entry each, "lora/<name>.gguf", read in place through
# a FILE* (llama_adapter_lora_init_from_file_ptr); manifest.adapters names them in order.
LORA_KIND = "lora/<name>.gguf"
LORA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_ADAPTERS = 64
ENTRY_KINDS: dict[str, EntryKind] = {k.name: k for k in (
    EntryKind(MODEL_ENTRY, "the model", ("none",), "mapped", "runtime.inference.engine"),
    EntryKind(NATIVE_CPU_ENTRY, "the runtime libraries", ("zstd",), "unpacked", "runtime.host.libraries"),
    *(EntryKind(b.entry, b.what, ("zstd",), "unpacked if used", "runtime.host.gpu.choice") for b in GPU_BACKENDS),
    # A universal file's other runtimes (below): the program itself, unpacked by the file's shell
    # launcher (bundler/universal.py writes it) into the cache and run on the file.
    EntryKind(RUNTIME_ENTRY, "the runtime program", ("none",), "unpacked by the launcher", "bundler.universal"),
    EntryKind(LORA_KIND, "a LoRA adapter", ("none",), "mapped", "runtime.inference.engine"),
)}

# -- a universal file (bundle build --target universal) -------------------------------------------
# Its front runtime is the Windows one (the file is a PE image whose DOS header starts a shell
# script); the runtimes of these targets ride in its payload, each with its own libraries, under
# names prefixed with the target ("linux-aarch64/runtime", "linux-aarch64/native/cpu.tar.zst").
# The model is stored once and mapped by whichever runtime runs. A runtime reads such a file
# through Payload.for_runtime(), which shows it its own entries under the plain names.
STORED_TARGETS = ("linux-x86_64", "linux-aarch64")
KNOWN_ENTRIES = tuple(k for k in ENTRY_KINDS if k not in (RUNTIME_ENTRY, LORA_KIND)) + tuple(
    f"{t}/{k}" for t in STORED_TARGETS for k in ENTRY_KINDS if ENTRY_KINDS[k].placement != "mapped")


def lora_entry(name: str) -> str:
    """The entry an adapter named so is stored under."""
    return f"lora/{name}.gguf"


def is_lora_entry(name: str) -> bool:
    return name.startswith("lora/") and name.endswith(".gguf") and bool(LORA_NAME.fullmatch(name[5:-5]))


def is_known_entry(name: str) -> bool:
    return name in KNOWN_ENTRIES or is_lora_entry(name)


def entry_kind(name: str) -> EntryKind:
    """The kind of an entry named as in a table of contents (a stored runtime's prefix aside)."""
    if is_lora_entry(name):
        return ENTRY_KINDS[LORA_KIND]
    target, _, rest = name.partition("/")
    return ENTRY_KINDS[rest] if target in STORED_TARGETS else ENTRY_KINDS[name]


def stored_name(target: str, kind: str) -> str:
    """The name a universal file stores target's entry of this kind under."""
    return f"{target}/{kind}"


COMPRESSIONS = ("none", "zstd")
# Parts of the file outside the payload whose hashes the TOC records, so that damage to the
# runtime itself is found too (issue 8.3). Offsets are absolute.
REGIONS = {
    "bootloader": "the runtime's program (ELF header and PyInstaller bootloader)",
    "archive": "the runtime's Python archive",
    "stub-end": "the end of the runtime (ELF section table and padding)",
    "tail": "the archive locator at the end of the file",
}
# Bytes of zeros after the tail's cookie copy. PyInstaller's bootloader reads the cookie where
# it finds the magic; a copy cut inside the cookie itself makes it fail before any of our code
# runs ("Failed to read cookie!"). With the cookie this far from the end, a cut anywhere in the
# last TAIL_PAD bytes leaves it whole, so the runtime starts and names the cut (issue 8.4).
TAIL_PAD = 32 * 1024
MAX_TOC_SIZE = 16 * 1024 * 1024
MAX_BYTES = 1 << 52  # no offset or size in a bundle is larger (4 PiB)


def align_up(value: int, alignment: int = ENTRY_ALIGN) -> int:
    return (value + alignment - 1) // alignment * alignment



@dataclass(frozen=True)
class Entry:
    name: str
    offset: int  # relative to payload start
    size: int  # stored bytes
    compression: str  # "none" or "zstd"
    digest: str  # of the stored bytes, "blake3:hex" or "sha256:hex" (runtime/digest.py)
    unpacked_size: int | None = None

    def to_json(self) -> dict:
        data = {
            "name": self.name,
            "offset": self.offset,
            "size": self.size,
            "compression": self.compression,
            **digest.to_json(self.digest),
        }
        if self.unpacked_size is not None:
            data["unpacked_size"] = self.unpacked_size
        return data

    @classmethod
    def from_json(cls, data, where: str = "entry") -> "Entry":
        data = as_object(data, where)
        return cls(
            name=_entry_name(take(data, "name", str, where, required=True, max_len=128), where),
            offset=take(data, "offset", int, where, required=True, lo=ENTRY_ALIGN, hi=MAX_BYTES),
            size=take(data, "size", int, where, required=True, lo=0, hi=MAX_BYTES),
            compression=take(data, "compression", str, where, default="none", choices=COMPRESSIONS),
            digest=digest_field(data, where),
            unpacked_size=take(data, "unpacked_size", int, where, lo=0, hi=MAX_BYTES),
        )


def _entry_name(name: str, where: str) -> str:
    if not is_known_entry(name):
        raise Invalid(f"{where}.name", f"{name[:40]!r} is not an entry this reader knows")
    return name


@dataclass(frozen=True)
class Region:
    """A hashed span of the file outside the payload (absolute offsets)."""

    name: str
    offset: int
    size: int
    digest: str

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "size": self.size, **digest.to_json(self.digest)}

    @classmethod
    def from_json(cls, data, where: str = "region") -> "Region":
        data = as_object(data, where)
        return cls(
            name=take(data, "name", str, where, required=True, choices=tuple(REGIONS)),
            offset=take(data, "offset", int, where, required=True, lo=0, hi=MAX_BYTES),
            size=take(data, "size", int, where, required=True, lo=0, hi=MAX_BYTES),
            digest=digest_field(data, where),
        )


# -- the manifest: one typed definition for the writer and the reader -----------------------------



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
    if len(data) != HEADER_SIZE:
        raise Invalid("header", "cut short")
    return struct.unpack(HEADER_FORMAT, data)


