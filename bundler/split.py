"""A model as llama.cpp split GGUF parts, each under a size limit (FAT32 holds no file over
4 GiB; issue 9.3).

The format is llama.cpp's own (what its gguf-split tool writes and its loader reads with
llama_model_load_from_splits): every part is a complete GGUF file holding some of the tensors;
the first also holds all of the model's metadata. Each part carries `split.no` (0-based),
`split.count` and `split.tensors.count`. Tensors keep their order and their data is copied byte
for byte in one run per part: a part's data is the original's data from its first tensor to its
last, so every offset only shifts by the part's start and stays aligned.

The parts are named `<bundle>-00001-of-00003.gguf`, llama.cpp's own pattern, so they also load
with llama.cpp's tools directly.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from runtime import digest

from .errors import BundleError
from .gguf import GGUFInfo, TensorInfo

FAT32_MAX = (4 << 30) - 1  # the largest file FAT32 can hold
GGUF_TYPE_UINT16, GGUF_TYPE_INT32, GGUF_TYPE_UINT32 = 2, 5, 4
COPY_CHUNK = 8 << 20


def part_name(stem: str, index: int, count: int) -> str:
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def parse_size(text: str) -> int:
    """'4G', '4GiB', '3900M', '4000000000' -> bytes (K/M/G/T are powers of 1024). '4G' means
    FAT32's limit, 4 GiB less one byte."""
    t = text.strip().upper().replace("IB", "").rstrip("B")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if t and t[-1] in units:
            n = int(float(t[:-1]) * units[t[-1]])
        else:
            n = int(t)
    except ValueError:
        raise BundleError(f"--max-file-size {text!r} is not a size; write it like 4G, 3900M or 2000000000") from None
    if n == 4 << 30:
        n = FAT32_MAX
    if n < 1 << 20:
        raise BundleError(f"--max-file-size {text!r} is below 1 MiB; give a larger size")
    return n


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, fmt: str, value) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + struct.pack(fmt, value)


def _tensor_info(t: TensorInfo, offset: int) -> bytes:
    return (_string(t.name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d) for d in t.shape)
            + struct.pack("<IQ", t.type_id, offset))


@dataclass
class PlannedPart:
    tensors: list[TensorInfo]
    start: int  # offset of its first tensor in the original's data section
    end: int  # end of its last tensor's bytes

    @property
    def data_size(self) -> int:
        return self.end - self.start


def _header(info: GGUFInfo, raw_kv: bytes, n_kv: int, part: PlannedPart, index: int, count: int,
            alignment: int) -> bytes:
    kvs = [_kv("split.no", GGUF_TYPE_UINT16, "<H", index), _kv("split.count", GGUF_TYPE_UINT16, "<H", count),
           _kv("split.tensors.count", GGUF_TYPE_INT32, "<i", len(info.tensors))]
    if index == 0:
        body, n = b"".join(kvs) + raw_kv, n_kv + len(kvs)  # split keys first: is_part_file() sees them
    else:
        if "general.alignment" in info.metadata:  # each part is read on its own
            kvs.append(_kv("general.alignment", GGUF_TYPE_UINT32, "<I", alignment))
        body, n = b"".join(kvs), len(kvs)
    infos = b"".join(_tensor_info(t, t.offset - part.start) for t in part.tensors)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(part.tensors), n) + body + infos
    return head + bytes(-len(head) % alignment)


def plan(info: GGUFInfo, raw_kv: bytes, limit: int) -> list[PlannedPart]:
    """Tensors in order, as many per part as fit under limit with the part's header."""
    alignment = info.metadata.get("general.alignment", 32)
    # A generous bound on a part's header: all the metadata, every split key, its tensor infos.
    fixed = 24 + len(raw_kv) + 256 + alignment
    parts: list[PlannedPart] = []
    current: list[TensorInfo] = []
    infos = 0
    for t in info.tensors:
        info_len = len(_tensor_info(t, 0))
        if current and fixed + infos + info_len + (t.offset + t.n_bytes - current[0].offset) > limit:
            parts.append(PlannedPart(current, current[0].offset, current[-1].offset + current[-1].n_bytes))
            current, infos = [], 0
        if not current and fixed + info_len + t.n_bytes > limit:
            raise BundleError(f"tensor {t.name} alone is {t.n_bytes / 2**30:.2f} GiB, more than --max-file-size "
                              f"({limit / 2**30:.2f} GiB); give a larger size")
        current.append(t)
        infos += info_len
    parts.append(PlannedPart(current, current[0].offset, current[-1].offset + current[-1].n_bytes))
    return parts


def read_raw_kv(path: Path, info: GGUFInfo) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        head = f.read(24)
        n_kv = struct.unpack_from("<Q", head, 16)[0]
        f.seek(24)
        return f.read(info.kv_end - 24), n_kv


def write_parts(model: Path, info: GGUFInfo, folder: Path, stem: str, limit: int,
                progress: Callable[[int], None] | None = None) -> list[tuple[Path, str, int, str]]:
    """Write the parts as temporary files in folder. Returns (temporary path, final name, size,
    digest) per part; the caller renames them into place once everything is written, and
    removes them on failure."""
    raw_kv, n_kv = read_raw_kv(model, info)
    alignment = info.metadata.get("general.alignment", 32)
    parts = plan(info, raw_kv, limit)
    written = []
    try:
        with open(model, "rb") as src:
            for i, part in enumerate(parts):
                name = part_name(stem, i, len(parts))
                tmp = folder / f".{name}.{os.getpid()}.tmp"
                written.append((tmp, name, 0, ""))
                h = digest.hasher(digest.NEW)
                with open(tmp, "wb") as out:
                    head = _header(info, raw_kv, n_kv, part, i, len(parts), alignment)
                    out.write(head)
                    h.update(head)
                    src.seek(info.data_offset + part.start)
                    left = part.data_size
                    while left:
                        chunk = src.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise BundleError(f"{model} ended early while splitting it; copy the model again")
                        out.write(chunk)
                        h.update(chunk)
                        left -= len(chunk)
                        if progress:
                            progress(len(chunk))
                    size = out.tell()  # no fsync: see write_bundle
                if size > limit:  # the plan's bound is generous; this would be a bug
                    raise BundleError(f"part {name} came out at {size} bytes, over the limit {limit}; report it")
                written[-1] = (tmp, name, size, digest.make(digest.NEW, h.hexdigest()))
    except BaseException:
        for tmp, *_ in written:
            tmp.unlink(missing_ok=True)
        raise
    return written


def is_part_file(path: Path) -> bool:
    """A file that a previous split build wrote (replacing one loses nothing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head[:4] == b"GGUF" and b"split.count" in head
