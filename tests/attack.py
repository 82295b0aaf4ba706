"""What an adversary does to a bundle, for the tests: rewrite its table of contents with a valid
hash (so only the runtime's own checks stand in the way), flip bytes, cut it short."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

from runtime import bundlefile as P


def locate(path: Path):
    """(payload_start, payload_size, toc_offset, toc_size, file_size) read straight from the trailer."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        cookie_pos, _ = P.find_cookie(f, size)
        f.seek(cookie_pos - P.HEADER_SIZE)
        fields = struct.unpack(P.HEADER_FORMAT, f.read(P.HEADER_SIZE))
    _, _, _, payload_size, file_size, toc_offset, toc_size, _ = fields
    payload_start = cookie_pos - payload_size
    return payload_start, payload_size, toc_offset, toc_size, file_size


def read_toc(path: Path) -> dict:
    start, _, toc_offset, toc_size, _ = locate(path)
    with open(path, "rb") as f:
        f.seek(start + toc_offset)
        return json.loads(f.read(toc_size))


def write_toc(path: Path, toc, raw: bytes | None = None, version: int = P.FORMAT_VERSION) -> None:
    """Replace the TOC with toc (any JSON-able value, or raw bytes) and fix the header and the
    trailer so that their hash of it matches: the attack a hash alone does not stop."""
    start, payload_size, old_offset, _, file_size = locate(path)
    data = raw if raw is not None else json.dumps(toc).encode()
    toc_offset = payload_size - P.HEADER_SIZE - len(data)
    assert toc_offset > 0
    digest = hashlib.sha256(data).digest()[:16]
    with open(path, "r+b") as f:
        f.seek(start + toc_offset)
        f.write(data)
        for magic, at in ((P.TRAILER_MAGIC, start + payload_size - P.HEADER_SIZE), (P.HEADER_MAGIC, start)):
            f.seek(at)
            f.write(struct.pack(P.HEADER_FORMAT, magic, version, 0, payload_size, file_size,
                                toc_offset, len(data), digest))


def flip(path: Path, offset: int, xor: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


def cut_copy(src: Path, dest: Path, keep: int) -> Path:
    """dest = the first keep bytes of src (an interrupted copy)."""
    with open(src, "rb") as a, open(dest, "wb") as b:
        left, pos = keep, 0
        while left:
            n = os.copy_file_range(a.fileno(), b.fileno(), left, pos, pos)
            if n == 0:
                break
            left -= n
            pos += n
    dest.chmod(0o755)
    return dest


def copy(src: Path, dest: Path) -> Path:
    shutil.copy2(src, dest)
    return dest


def as_sha256_bundle(path: Path) -> None:
    """Rewrite a bundle as bundle build wrote it before BLAKE3 (format 1): every part's digest
    SHA-256, under the key "sha256"."""
    p = P.read_payload(str(path))
    toc = read_toc(path)

    def sha(offset: int, size: int) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            f.seek(offset)
            left = size
            while left:
                chunk = f.read(min(1 << 22, left))
                h.update(chunk)
                left -= len(chunk)
        return h.hexdigest()

    for e in toc["entries"]:
        del e["blake3"]
        e["sha256"] = sha(p.payload_start + e["offset"], e["size"])
    for r in toc["regions"]:
        del r["blake3"]
        r["sha256"] = sha(r["offset"], r["size"])
    model = toc["manifest"]["model"]
    if model.pop("blake3", None):
        model["sha256"] = next(e["sha256"] for e in toc["entries"] if e["name"] == "model.gguf")
    toc["format"] = 1
    write_toc(path, toc, version=1)
