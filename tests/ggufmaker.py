"""Writes small GGUF files with chosen metadata and tensors (the attacks of issue 8.10 need
files no converter would make). Layout as in bundler/gguf.py's docstring."""

from __future__ import annotations

import struct
from pathlib import Path

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    fmt = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
           U64: "<Q", I64: "<q", F64: "<d"}
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        itype, items = value
        return struct.pack("<IQ", itype, len(items)) + b"".join(_value(itype, v) for v in items)
    return struct.pack(fmt[vtype], value)


def write_gguf(path: Path, kv: list[tuple[str, int, object]], tensors=None, alignment: int = 32,
               version: int = 3) -> Path:
    """kv: (key, type, value); tensors: (name, shape, ggml type, n_bytes) laid out in order."""
    tensors = tensors if tensors is not None else [("token_embd.weight", (32, 4), 0, 32 * 4 * 4)]
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv))
    for key, vtype, value in kv:
        head += _string(key) + struct.pack("<I", vtype) + _value(vtype, value)
    offset = 0
    infos = b""
    for name, shape, ttype, n_bytes in tensors:
        infos += _string(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        infos += struct.pack("<IQ", ttype, offset)
        offset += (n_bytes + 31) // 32 * 32
    data = head + infos
    align = alignment if alignment > 0 and not alignment & (alignment - 1) else 32
    data += b"\0" * (-len(data) % align)
    data += b"\0" * offset
    path.write_bytes(data)
    return path


def llama_kv(**overrides) -> list[tuple[str, int, object]]:
    base = {
        "general.architecture": (STRING, "llama"),
        "general.name": (STRING, "tiny"),
        "llama.block_count": (U32, 1),
        "llama.context_length": (U32, 256),
        "llama.embedding_length": (U32, 32),
        "llama.attention.head_count": (U32, 4),
        "llama.attention.head_count_kv": (U32, 2),
    }
    for k, v in overrides.items():
        key = k.replace("__", ".")
        if v is None:
            base.pop(key, None)
        else:
            base[key] = v
    return [(k, t, v) for k, (t, v) in base.items()]
