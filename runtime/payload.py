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

import errno
import hashlib
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator

from .backends import GPU_BACKENDS
from .errors import DamagedError, IncompleteError, NewerFormatError, NotABundleError, PayloadError

__all__ = ["DamagedError", "IncompleteError", "NewerFormatError", "NotABundleError", "PayloadError"]

FORMAT_VERSION = 1
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

MODEL_ENTRY = "model.gguf"
# zstd tars of native libraries, unpacked once per machine (runtime/native.py)
NATIVE_CPU_ENTRY = "native/cpu.tar.zst"
# ... and one per GPU back end (runtime/backends.py): unpacked only where its device answers
KNOWN_ENTRIES = (MODEL_ENTRY, NATIVE_CPU_ENTRY, *(b.entry for b in GPU_BACKENDS))
ENTRY_LABELS = {MODEL_ENTRY: "the model", NATIVE_CPU_ENTRY: "the runtime libraries",
                **{b.entry: b.what for b in GPU_BACKENDS}}
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


# -- reading untrusted JSON ----------------------------------------------------------------------
# Every field read from a bundle is untrusted (issue 8.1): the TOC and manifest are checked
# whole, against these rules, before anything uses them. A failure names the field.


class _Invalid(Exception):
    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")


_HEX_DIGITS = frozenset("0123456789abcdef")


def is_sha256_hex(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX_DIGITS


def _take(data: dict, key: str, kind, where: str, *, default=None, required=False, lo=None, hi=None,
          max_len=None, choices=None):
    """data[key] checked: its type (bool is never an int here), bounds, length, choices."""
    if key not in data or data[key] is None:
        if required:
            raise _Invalid(f"{where}.{key}", "missing")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise _Invalid(f"{where}.{key}", f"expected {kinds[0].__name__}, got a boolean")
    if not isinstance(value, kinds):
        raise _Invalid(f"{where}.{key}", f"expected {kinds[0].__name__}, got {type(value).__name__}")
    if isinstance(value, float) and value != value:
        raise _Invalid(f"{where}.{key}", "not a number")
    if lo is not None and value < lo or hi is not None and value > hi:
        raise _Invalid(f"{where}.{key}", f"{value} is out of range [{lo}, {hi}]")
    if max_len is not None and len(value) > max_len:
        raise _Invalid(f"{where}.{key}", f"longer than {max_len}")
    if choices is not None and value not in choices:
        raise _Invalid(f"{where}.{key}", f"{str(value)[:40]!r} is not one of {', '.join(map(str, choices))}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise _Invalid(where, f"expected an object, got {type(value).__name__}")
    return value


def _hex(data: dict, key: str, where: str, required=True):
    value = _take(data, key, str, where, required=required)
    if value is not None and not is_sha256_hex(value):
        raise _Invalid(f"{where}.{key}", "not a SHA-256 hex digest")
    return value


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
    def from_json(cls, data, where: str = "entry") -> "Entry":
        data = _object(data, where)
        return cls(
            name=_take(data, "name", str, where, required=True, choices=KNOWN_ENTRIES),
            offset=_take(data, "offset", int, where, required=True, lo=ENTRY_ALIGN, hi=MAX_BYTES),
            size=_take(data, "size", int, where, required=True, lo=0, hi=MAX_BYTES),
            compression=_take(data, "compression", str, where, default="none", choices=COMPRESSIONS),
            sha256=_hex(data, "sha256", where),
            unpacked_size=_take(data, "unpacked_size", int, where, lo=0, hi=MAX_BYTES),
        )


@dataclass(frozen=True)
class Region:
    """A hashed span of the file outside the payload (absolute offsets)."""

    name: str
    offset: int
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"name": self.name, "offset": self.offset, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data, where: str = "region") -> "Region":
        data = _object(data, where)
        return cls(
            name=_take(data, "name", str, where, required=True, choices=tuple(REGIONS)),
            offset=_take(data, "offset", int, where, required=True, lo=0, hi=MAX_BYTES),
            size=_take(data, "size", int, where, required=True, lo=0, hi=MAX_BYTES),
            sha256=_hex(data, "sha256", where),
        )


# -- the manifest: one typed definition for the writer and the reader -----------------------------

MAX_LAYERS = 4096


@dataclass(frozen=True)
class Layout:
    """What the runtime needs to plan a GPU offload (bytes per layer, KV widths, output)."""

    n_layer: int
    layer_bytes: tuple[int, ...]
    output_bytes: int
    n_embd_k_gqa: int
    n_embd_v_gqa: int

    def to_json(self) -> dict:
        return {"n_layer": self.n_layer, "layer_bytes": list(self.layer_bytes), "output_bytes": self.output_bytes,
                "n_embd_k_gqa": self.n_embd_k_gqa, "n_embd_v_gqa": self.n_embd_v_gqa}

    @classmethod
    def from_json(cls, data, where: str = "layout") -> "Layout":
        data = _object(data, where)
        n_layer = _take(data, "n_layer", int, where, required=True, lo=1, hi=MAX_LAYERS)
        layers = data.get("layer_bytes")
        if not isinstance(layers, list) or len(layers) != n_layer or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_BYTES for x in layers):
            raise _Invalid(f"{where}.layer_bytes", f"expected {n_layer} byte counts")
        return cls(
            n_layer=n_layer,
            layer_bytes=tuple(layers),
            output_bytes=_take(data, "output_bytes", int, where, default=0, lo=0, hi=MAX_BYTES),
            n_embd_k_gqa=_take(data, "n_embd_k_gqa", int, where, required=True, lo=0, hi=1 << 24),
            n_embd_v_gqa=_take(data, "n_embd_v_gqa", int, where, required=True, lo=0, hi=1 << 24),
        )


# A model too large for one file on a FAT32 stick (4 GiB) travels as llama.cpp split GGUF parts
# beside the executable (bundle build --split); the manifest names each, plainly: a file name in
# the executable's own folder, never a path.
_PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,250}\Z")
MAX_PARTS = 9999


@dataclass(frozen=True)
class ModelPart:
    file: str
    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"file": self.file, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data, where: str) -> "ModelPart":
        data = _object(data, where)
        name = _take(data, "file", str, where, required=True, max_len=251)
        if not _PART_NAME.match(name) or ".." in name:
            raise _Invalid(f"{where}.file", "not a plain file name")
        return cls(name, _take(data, "size", int, where, required=True, lo=1, hi=MAX_BYTES),
                   _hex(data, "sha256", where))


@dataclass(frozen=True)
class ModelInfo:
    name: str = "model"
    architecture: str = "unknown"
    parameters: int = 0
    size_label: str = ""
    quantization: str = ""
    context_length: int | None = None
    gguf_version: int = 3
    tensors: int = 0
    has_chat_template: bool = False
    file_size: int = 0
    file: str | None = None
    sha256: str | None = None
    layout: Layout | None = None
    parts: tuple[ModelPart, ...] = ()  # empty: the model is inside the executable

    def to_json(self) -> dict:
        data = {k: getattr(self, k) for k in ("name", "architecture", "parameters", "size_label", "quantization",
                                              "context_length", "gguf_version", "tensors", "has_chat_template",
                                              "file_size", "file", "sha256")}
        data["layout"] = self.layout.to_json() if self.layout else None
        if self.parts:
            data["parts"] = [p.to_json() for p in self.parts]
        return data

    @classmethod
    def from_json(cls, data, where: str = "manifest.model") -> "ModelInfo":
        data = _object(data, where)
        layout = data.get("layout")
        return cls(
            name=_take(data, "name", str, where, default="model", max_len=1024),
            architecture=_take(data, "architecture", str, where, default="unknown", max_len=256),
            parameters=_take(data, "parameters", int, where, default=0, lo=0, hi=MAX_BYTES),
            size_label=_take(data, "size_label", str, where, default="", max_len=64),
            quantization=_take(data, "quantization", str, where, default="", max_len=64),
            context_length=_take(data, "context_length", int, where, lo=0, hi=1 << 32),
            gguf_version=_take(data, "gguf_version", int, where, default=3, lo=0, hi=1 << 16),
            tensors=_take(data, "tensors", int, where, default=0, lo=0, hi=1 << 32),
            has_chat_template=_take(data, "has_chat_template", bool, where, default=False),
            file_size=_take(data, "file_size", int, where, default=0, lo=0, hi=MAX_BYTES),
            file=_take(data, "file", str, where, max_len=4096),
            sha256=_hex(data, "sha256", where, required=False),
            layout=Layout.from_json(layout, f"{where}.layout") if layout is not None else None,
            parts=_parts(data.get("parts"), f"{where}.parts"),
        )


def _parts(value, where: str) -> tuple[ModelPart, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PARTS:
        raise _Invalid(where, f"expected a list of 1 to {MAX_PARTS} parts")
    parts = tuple(ModelPart.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len({p.file for p in parts}) != len(parts):
        raise _Invalid(where, "a part is named twice")
    return parts


@dataclass(frozen=True)
class StubInfo:
    target: str | None = None
    runtime_version: str | None = None
    format_version: int | None = None
    llama_cpp_python: str | None = None
    glibc_min: str | None = None
    windows_min: str | None = None
    python: str | None = None
    pyinstaller: str | None = None
    stub_sha256: str | None = None
    build_flags: tuple[str, ...] = ()
    cuda_version_min: tuple[int, ...] | None = None
    cuda_architectures: str | None = None

    _TEXT = ("target", "runtime_version", "llama_cpp_python", "glibc_min", "windows_min", "python", "pyinstaller",
             "cuda_architectures")

    def to_json(self) -> dict:
        data: dict[str, Any] = {k: getattr(self, k) for k in self._TEXT if getattr(self, k) is not None}
        if self.format_version is not None:
            data["format_version"] = self.format_version
        if self.stub_sha256:
            data["stub_sha256"] = self.stub_sha256
        if self.build_flags:
            data["build_flags"] = list(self.build_flags)
        if self.cuda_version_min is not None:
            data["cuda_version_min"] = list(self.cuda_version_min)
        return data

    @classmethod
    def from_json(cls, data, where: str = "manifest.stub") -> "StubInfo":
        data = _object(data, where)
        values = {k: _take(data, k, str, where, max_len=256) for k in cls._TEXT}
        flags = data.get("build_flags") or []
        if not isinstance(flags, list) or len(flags) > 256 or not all(isinstance(x, str) and len(x) < 1024
                                                                        for x in flags):
            raise _Invalid(f"{where}.build_flags", "expected a list of strings")
        cuda_min = data.get("cuda_version_min")
        if cuda_min is not None and (not isinstance(cuda_min, list) or len(cuda_min) > 3 or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1000 for x in cuda_min)):
            raise _Invalid(f"{where}.cuda_version_min", "expected a version like [13, 0]")
        return cls(**values, format_version=_take(data, "format_version", int, where, lo=0, hi=1 << 16),
                   stub_sha256=_hex(data, "stub_sha256", where, required=False), build_flags=tuple(flags),
                   cuda_version_min=tuple(cuda_min) if cuda_min is not None else None)


MAX_TEMPLATE = 1024 * 1024
SETTING_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class Manifest:
    """What `bundle build` stores beside the model: names, template, default settings, and the
    facts the runtime needs (model summary and layout, stub). Written by bundler, read by the
    runtime; settings values are checked and converted by runtime.settings when applied."""

    name: str = "model"
    built: str | None = None
    bundler_version: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    template_name: str = "auto"
    template: str | None = None
    settings: dict = field(default_factory=dict)
    stub: StubInfo = field(default_factory=StubInfo)

    def to_json(self) -> dict:
        return {"name": self.name, "built": self.built, "bundler_version": self.bundler_version,
                "model": self.model.to_json(), "template_name": self.template_name, "template": self.template,
                "settings": dict(self.settings), "stub": self.stub.to_json()}

    @classmethod
    def from_json(cls, data, where: str = "manifest") -> "Manifest":
        data = _object(data, where)
        settings = _object(data.get("settings") or {}, f"{where}.settings")
        for key, value in settings.items():
            if not isinstance(key, str) or len(key) > 64:
                raise _Invalid(f"{where}.settings", "a key is not a short string")
            if value is not None and not isinstance(value, SETTING_TYPES):
                raise _Invalid(f"{where}.settings.{key}", f"expected a plain value, got {type(value).__name__}")
            if isinstance(value, str) and len(value) > MAX_TEMPLATE:
                raise _Invalid(f"{where}.settings.{key}", "too long")
        return cls(
            name=_take(data, "name", str, where, default="model", max_len=1024),
            built=_take(data, "built", str, where, max_len=64),
            bundler_version=_take(data, "bundler_version", str, where, max_len=64),
            model=ModelInfo.from_json(data.get("model") or {}, f"{where}.model"),
            template_name=_take(data, "template_name", str, where, default="auto", max_len=1024),
            template=_take(data, "template", str, where, max_len=MAX_TEMPLATE),
            settings=dict(settings),
            stub=StubInfo.from_json(data.get("stub") or {}, f"{where}.stub"),
        )


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
        """Hash the named entries and regions (all when None); a list of what does not match."""
        problems = []
        parts = [(e.name, self.payload_start + e.offset, e.size, e.sha256, f"{e.name} ({ENTRY_LABELS[e.name]})")
                 for e in self.entries.values()]
        parts += [(r.name, r.offset, r.size, r.sha256, REGIONS[r.name]) for r in self.regions.values()]
        mask = []
        if "bootloader" in self.regions:
            with open(self.source, "rb") as f:
                mask = pe_hash_mask(f)
        for name, offset, size, expected, label in parts:
            if names is not None and name not in names:
                continue
            digest = hashlib.sha256()
            at = offset
            try:
                for chunk in self._chunks(offset, size, label):
                    if name == "bootloader" and mask:
                        chunk = masked(chunk, at, mask)
                    at += len(chunk)
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))
            except IncompleteError:
                problems.append(f"{label}: cut short (expected {size} bytes at {offset})")
                continue
            if digest.hexdigest() != expected:
                problems.append(f"{label}: damaged (bytes {offset}-{offset + size - 1}; sha256 "
                                f"{digest.hexdigest()[:16]}…, expected {expected[:16]}…)")
        return problems

    def check_header(self) -> list[str]:
        """The payload header at the front must repeat the trailer."""
        with open(self.source, "rb") as f:
            data = _read_at(f, self.payload_start, HEADER_SIZE)
        trailer = self._trailer_fields()
        if len(data) != HEADER_SIZE or data[:8] != HEADER_MAGIC or unpack_header(data)[1:] != trailer[1:]:
            return [f"the payload header: damaged (bytes {self.payload_start}-{self.payload_start + HEADER_SIZE - 1})"]
        return []

    def _trailer_fields(self) -> tuple:
        with open(self.source, "rb") as f:
            return unpack_header(_read_at(f, self.payload_start + self.payload_size - HEADER_SIZE, HEADER_SIZE))

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
            digest = hashlib.sha256()
            try:
                for chunk in _file_chunks(path):
                    digest.update(chunk)
                    if progress:
                        progress(len(chunk))
            except OSError as exc:
                problems.append(f"{self.part_label(i)}: cannot be read ({exc.strerror})")
                continue
            if digest.hexdigest() != part.sha256:
                problems.append(f"{self.part_label(i)}: damaged (sha256 {digest.hexdigest()[:16]}…, "
                                f"expected {part.sha256[:16]}…)")
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


def _file_chunks(path):
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
        raise _Invalid("header", "cut short")
    return struct.unpack(HEADER_FORMAT, data)


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
        chunk = _read_at(f, at, step + PYI_COOKIE_SIZE)
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
        data = _read_at(f, offset, HEADER_SIZE)
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
            piece = _read_at(f, header_at, HEADER_SIZE)
            if HEADER_MAGIC.startswith(piece[:8]) and not any(_read_at(f, end, max(0, header_at - end))):
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
        except _Invalid as exc:
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
                                           and not any(_read_at(f, expected_size, file_size - expected_size))):
        raise IncompleteError(incomplete_message(path, file_size, expected_size))
    file_size = expected_size
    payload_start = payload_end - payload_size
    # The header's numbers, before any is used: the layout the writer makes, exactly.
    if (flags != 0 or payload_start < 0 or payload_start % ENTRY_ALIGN or payload_size % ENTRY_ALIGN
            or toc_size > MAX_TOC_SIZE or toc_offset < ENTRY_ALIGN
            or toc_offset + toc_size + HEADER_SIZE != payload_size):
        raise _Invalid("trailer", "its offsets do not describe a payload")
    toc = _read_at(f, payload_start + toc_offset, toc_size)
    if len(toc) != toc_size or hashlib.sha256(toc).digest()[:16] != toc_digest:
        raise PayloadError(f"{damaged}; copy the file again")
    try:
        data = json.loads(toc.decode("utf-8"))
    except (ValueError, RecursionError):
        raise _Invalid("toc", "not JSON") from None
    data = _object(data, "toc")
    if _take(data, "format", int, "toc", required=True, lo=0, hi=1 << 16) != version:
        raise _Invalid("toc.format", "differs from the trailer's version")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list) or len(raw_entries) > len(KNOWN_ENTRIES):
        raise _Invalid("toc.entries", "expected a short list")
    entries: dict[str, Entry] = {}
    for i, raw in enumerate(raw_entries):
        entry = Entry.from_json(raw, f"toc.entries[{i}]")
        if entry.name in entries:
            raise _Invalid(f"toc.entries[{i}]", f"{entry.name} appears twice")
        if entry.offset % ENTRY_ALIGN:
            raise _Invalid(f"toc.entries[{i}].offset", "not on a 64 KiB boundary")
        if entry.offset + entry.size > toc_offset:
            raise PayloadError(f"{path}: entry {entry.name} lies outside the payload; copy the file again")
        entries[entry.name] = entry
    spans = sorted((e.offset, e.offset + e.size, e.name) for e in entries.values())
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise _Invalid("toc.entries", f"{a} and {b} overlap")
    regions: dict[str, Region] = {}
    raw_regions = data.get("regions") or []
    if not isinstance(raw_regions, list) or len(raw_regions) > len(REGIONS):
        raise _Invalid("toc.regions", "expected a short list")
    for i, raw in enumerate(raw_regions):
        region = Region.from_json(raw, f"toc.regions[{i}]")
        end = region.offset + region.size
        inside_payload = region.offset < payload_end and end > payload_start
        if region.name in regions or end > file_size or inside_payload:
            raise _Invalid(f"toc.regions[{i}]", "outside the file, inside the payload, or twice")
        regions[region.name] = region
    manifest = Manifest.from_json(data.get("manifest") or {}, "manifest")
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
