"""The bundle file: its layout and the kinds of entries it packs (layout), the checked manifest
(manifest, fields), the executable it is built on (exe: ELF, PE, PyInstaller's cookie), the
reader (reader), the writer the bundler uses (writer), and the first-launch check (checks).
docs/format.md describes the format byte by byte.

May import: runtime.host (the cache folder for the check, the GPU registry for entry names),
runtime.errors, runtime.text. Never the inference, prompts, serving or launch layers.

The names below are the package's interface for its users (the launch, the bundler, the tests).
"""

from ..errors import DamagedError, IncompleteError, NewerFormatError, NotABundleError, PayloadError
from ..text import is_sha256_hex
from .exe import elf_end, find_archive_start, find_cookie, masked, pe_hash_mask, pe_image_end, pe_signature, stub_end
from .layout import (ENTRY_ALIGN, ENTRY_KINDS, FORMAT_VERSION, HEADER_FORMAT, HEADER_MAGIC, HEADER_SIZE,
                     KNOWN_ENTRIES, MODEL_ENTRY, NATIVE_CPU_ENTRY, PYI_COOKIE_FORMAT, PYI_COOKIE_MAGIC, PYI_COOKIE_SIZE,
                     REGIONS, TAIL_PAD, TRAILER_MAGIC, Entry, EntryKind, Region, align_up)
from .manifest import Layout, Manifest, ModelInfo, ModelPart, StubInfo
from .reader import Payload, incomplete_message, read_payload
from .writer import PayloadWriter, make_tail

__all__ = ["DamagedError", "ENTRY_ALIGN", "ENTRY_KINDS", "FORMAT_VERSION", "HEADER_FORMAT", "HEADER_MAGIC",
           "HEADER_SIZE", "IncompleteError", "KNOWN_ENTRIES", "MODEL_ENTRY", "NATIVE_CPU_ENTRY", "NewerFormatError",
           "NotABundleError", "PYI_COOKIE_FORMAT", "PYI_COOKIE_MAGIC", "PYI_COOKIE_SIZE", "PayloadError", "REGIONS",
           "TAIL_PAD", "TRAILER_MAGIC", "elf_end", "masked", "pe_hash_mask", "pe_image_end", "pe_signature", "Entry", "EntryKind", "Layout", "Manifest", "ModelInfo", "ModelPart", "Payload",
           "PayloadWriter", "Region", "StubInfo", "align_up", "find_archive_start", "find_cookie", "incomplete_message",
           "is_sha256_hex", "make_tail", "read_payload", "stub_end"]
