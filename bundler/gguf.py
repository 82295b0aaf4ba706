"""Reading and checking GGUF files (metadata only; tensor data is never read).

GGUF layout (little-endian): magic "GGUF", uint32 version, uint64 tensor_count, uint64 kv_count,
then kv_count key/value pairs, then tensor_count tensor infos (name, n_dims, dims, type, offset),
then padding to `general.alignment` (default 32), then the tensor data.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from dataclasses import dataclass, field

from runtime.text import printable

from .errors import BundleError

GGUF_MAGIC = b"GGUF"

# value types
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9

# ggml type id -> (name, elements per block, bytes per block); from ggml.h / ggml.c type_traits.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# llama_ftype (general.file_type) -> name
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}

_U64 = struct.Struct("<Q")
# Arrays longer than this (token lists, merges) are counted, not kept.
_KEEP_ARRAY = 64


class GGUFError(BundleError):
    pass


@dataclass
class TensorInfo:
    name: str
    shape: tuple
    type_id: int
    offset: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int | None:
        t = GGML_TYPES.get(self.type_id)
        if t is None:
            return None
        return self.n_elements // t[1] * t[2]


@dataclass
class GGUFInfo:
    path: str
    version: int
    metadata: dict
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0
    kv_end: int = 0  # where the metadata ends and the tensor infos begin

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", "unknown"))

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def size_label(self) -> str:
        label = self.get("general.size_label")
        if label:
            return str(label)
        n = self.n_params
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= div:
                return f"{n / div:.1f}{unit}".replace(".0", "")
        return str(n)

    @property
    def quantization(self) -> str:
        ft = self.get("general.file_type")
        if isinstance(ft, int) and ft in FILE_TYPES:
            return FILE_TYPES[ft]
        counts: dict[str, int] = {}
        for t in self.tensors:
            name = GGML_TYPES.get(t.type_id, (f"type{t.type_id}",))[0]
            counts[name] = counts.get(name, 0) + t.n_elements
        return max(counts, key=counts.get) if counts else "unknown"

    @property
    def context_length(self) -> int | None:
        value = self.get(f"{self.architecture}.context_length")
        return int(value) if isinstance(value, int) else None

    @property
    def chat_template(self) -> str | None:
        value = self.get("tokenizer.chat_template")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str:
        return str(self.get("general.name") or os.path.splitext(os.path.basename(self.path))[0])

    def layout(self) -> dict | None:
        """What the runtime needs to plan a GPU offload: bytes per layer, KV widths, output."""
        arch = self.architecture
        n_layer = self.get(f"{arch}.block_count")
        n_embd = self.get(f"{arch}.embedding_length")
        n_head = self.get(f"{arch}.attention.head_count")
        if not all(isinstance(v, int) and v > 0 for v in (n_layer, n_embd)):
            return None
        if isinstance(n_head, list):
            n_head = max(n_head)
        n_head = n_head if isinstance(n_head, int) and n_head > 0 else 1
        n_head_kv = self.get(f"{arch}.attention.head_count_kv", n_head)
        if isinstance(n_head_kv, list):  # per-layer counts (some hybrid models)
            n_head_kv = max(n_head_kv)
        key_len = self.get(f"{arch}.attention.key_length", n_embd // n_head)
        value_len = self.get(f"{arch}.attention.value_length", key_len)
        layer_bytes = [0] * n_layer
        by_name = {}
        for t in self.tensors:
            size = t.n_bytes or 0
            by_name[t.name] = size
            parts = t.name.split(".")
            if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < n_layer:
                layer_bytes[int(parts[1])] += size
        # Tied embeddings: llama.cpp puts a copy of token_embd on the GPU as the output layer.
        output = by_name.get("output.weight", by_name.get("token_embd.weight", 0)) + by_name.get("output_norm.weight", 0)
        return {
            "n_layer": n_layer,
            "layer_bytes": layer_bytes,
            "output_bytes": output,
            "n_embd_k_gqa": int(n_head_kv) * int(key_len),
            "n_embd_v_gqa": int(n_head_kv) * int(value_len),
        }

    def summary(self) -> dict:
        return {
            "name": _clip(self.name, MAX_NAME),
            "architecture": self.architecture,
            "parameters": self.n_params,
            "size_label": self.size_label,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "gguf_version": self.version,
            "tensors": len(self.tensors),
            "has_chat_template": self.chat_template is not None,
            "file_size": self.file_size,
            "layout": self.layout(),
        }


MAX_NAME = 200  # characters of general.name kept in a bundle's manifest (which takes 1024)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


class _Reader:
    """Sequential reads over a buffer filled in large blocks: a GGUF's metadata holds ~100k
    tokenizer strings, and a file read per field made parsing the slowest part of a build."""

    BLOCK = 8 * 1024 * 1024

    def __init__(self, f, path, file_size):
        self.f, self.path, self.file_size = f, path, file_size
        self.buf = b""
        self.pos = 0
        self.base = f.tell()  # file offset of buf[0] (the magic was read before)

    def tell(self) -> int:
        return self.base + self.pos

    def _need(self, n: int) -> None:
        if self.pos + n <= len(self.buf):
            return
        rest = self.buf[self.pos:]
        self.base += self.pos
        more = self.f.read(max(n - len(rest), self.BLOCK))
        self.buf, self.pos = rest + more, 0
        if len(self.buf) < n:
            raise GGUFError(
                f"{self.path} is truncated: its GGUF header ends early at byte {self.file_size} of "
                f"the {self.base + n} it needs; download or copy the model again"
            )

    def read(self, n: int) -> bytes:
        self._need(n)
        data = self.buf[self.pos : self.pos + n]
        self.pos += n
        return data

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        self._need(size)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def remaining(self) -> int:
        return self.file_size - self.tell()

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > self.remaining():
            raise GGUFError(
                f"{self.path} is truncated or damaged: a metadata string claims {n} bytes; download the model again"
            )
        return self.read(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # The hot loop of parsing (tokenizer vocabularies): locals, no method calls, and the
        # careful path only near the end of the buffer.
        unpack, buf, pos, left = _U64.unpack_from, self.buf, self.pos, count
        end = len(buf) - 8
        while left and pos <= end:
            n = unpack(buf, pos)[0]
            if pos + 8 + n > len(buf):
                break
            pos += 8 + n
            left -= 1
        self.pos = pos
        for _ in range(left):
            self._need(8)
            (n,) = struct.unpack_from("<Q", self.buf, self.pos)
            if n > self.remaining():
                raise GGUFError(
                    f"{self.path} is truncated or damaged: a metadata string claims {n} bytes; download the model again"
                )
            self._need(8 + n)
            self.pos += 8 + n

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype = self.unpack("<I")
            count = self.unpack("<Q")
            if count > self.remaining():
                raise GGUFError(
                    f"{self.path} is truncated or damaged: an array claims {count} items but only "
                    f"{self.remaining()} bytes follow; download or copy the model again"
                )
            if count > _KEEP_ARRAY and itype in _SCALARS:
                self.read(struct.calcsize(_SCALARS[itype]) * count)  # skipped, not decoded
            elif count > _KEEP_ARRAY and itype == _STRING:
                self.skip_strings(count)
            elif itype == _ARRAY:
                # llama.cpp's GGUF reader refuses arrays of arrays; so do we, before recursing.
                raise GGUFError(f"{self.path} holds a nested metadata array, which llama.cpp cannot read; "
                                "re-convert the model")
            elif itype not in _SCALARS and itype != _STRING:
                raise GGUFError(f"{self.path} is damaged: unknown metadata array type {itype}; download the model again")
            else:
                items = [self.value(itype) for _ in range(count)]
                return items if count <= _KEEP_ARRAY else {"array_of": itype, "count": count}
            return {"array_of": itype, "count": count}
        raise GGUFError(f"{self.path} is damaged: unknown metadata value type {vtype}; download the model again")


class _Window:
    """A file seen from offset on, size bytes long (a model inside a bundle)."""

    def __init__(self, f, offset: int, size: int):
        self.f, self.offset, self.size = f, offset, size
        f.seek(offset)

    def read(self, n: int = -1) -> bytes:
        left = self.offset + self.size - self.f.tell()
        return self.f.read(left if n < 0 else min(n, left))

    def tell(self) -> int:
        return self.f.tell() - self.offset

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_gguf(path: str, offset: int = 0, size: int | None = None) -> GGUFInfo:
    """Read a GGUF's metadata and tensor table, and check the file holds all its tensor data.
    offset, size: a GGUF inside another file (the model in a bundle)."""
    if os.path.isdir(path):
        raise GGUFError(f"{path} is a directory; pass the .gguf file inside it")
    try:
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block for ever
            raise GGUFError(f"{path} is not a regular file (a pipe or a device); pass the .gguf file itself")
        f = open(path, "rb")
    except FileNotFoundError:
        raise GGUFError(f"{path} does not exist; check the path") from None
    except PermissionError:
        raise GGUFError(f"{path} is not readable (permission denied); fix its permissions or copy it") from None
    except OSError as exc:
        raise GGUFError(f"cannot open {path}: {exc.strerror}") from None
    if size is not None:
        f = _Window(f, offset, size)
    with f:
        file_size = size if size is not None else os.fstat(f.fileno()).st_size
        if file_size == 0:
            raise GGUFError(f"{path} is empty (0 bytes); download or copy the model again")
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            hint = ""
            if magic[:2] == b"PK":
                hint = "; it is a zip archive: unzip it and pass the .gguf inside"
            elif magic[:4] == b"\x89HDF" or magic[:2] == b"\x80\x02" or path.endswith((".bin", ".safetensors", ".pt")):
                hint = "; convert it to GGUF first (llama.cpp's convert_hf_to_gguf.py)"
            elif len(magic) < 4:
                hint = "; it is too short to be a model"
            raise GGUFError(f"{path} is not a GGUF file (it starts with {magic!r}){hint or '; pass a .gguf model'}")
        r = _Reader(f, path, file_size)
        version = r.unpack("<I")
        if version not in (2, 3):
            raise GGUFError(f"{path} is GGUF version {version}, which is not supported (2 or 3); re-convert the model")
        n_tensors = r.unpack("<Q")
        n_kv = r.unpack("<Q")
        # Every key/value takes at least 12 bytes and every tensor info 24: counts beyond that
        # are damage, refused before any memory is set aside for them.
        if n_tensors * 24 > file_size or n_kv * 12 > file_size:
            raise GGUFError(f"{path} is truncated or damaged: its header counts {n_tensors} tensors and {n_kv} "
                            f"keys, more than its {file_size} bytes can hold; download or copy the model again")
        metadata = {}
        for _ in range(n_kv):
            key = r.string()
            if key in metadata:
                raise GGUFError(f"{path} is damaged: metadata key {printable(key[:80])} appears twice; "
                                "re-convert the model")
            metadata[key] = r.value(r.unpack("<I"))
        kv_end = r.tell()
        tensors = []
        names = set()
        for _ in range(n_tensors):
            name = r.string()
            if len(name.encode()) >= GGML_MAX_NAME:
                raise GGUFError(f"{path}: tensor name {printable(name[:80])}… is longer than llama.cpp allows "
                                f"({GGML_MAX_NAME - 1} bytes); re-convert the model")
            if name in names:
                raise GGUFError(f"{path} is damaged: tensor {printable(name)} appears twice; re-convert the model")
            names.add(name)
            n_dims = r.unpack("<I")
            if n_dims > 4:
                raise GGUFError(f"{path} is damaged: tensor {printable(name)} has {n_dims} dimensions (llama.cpp "
                                "allows 4); download the model again")
            shape = tuple(r.unpack("<Q") for _ in range(n_dims))
            type_id = r.unpack("<I")
            offset = r.unpack("<Q")
            tensors.append(TensorInfo(name, shape, type_id, offset))
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or \
                alignment & (alignment - 1) or alignment > 1 << 20:
            raise GGUFError(f"{path}: general.alignment is {printable(alignment)!s}, not a power of two that "
                            "llama.cpp can use; re-convert the model")
        data_offset = (r.tell() + alignment - 1) // alignment * alignment
    if not tensors:
        raise GGUFError(f"{path} holds no tensors; it is not a usable model")
    info = GGUFInfo(path, version, metadata, tensors, data_offset, file_size, kv_end)
    needed = check_tensors(info, alignment)
    if needed > file_size:
        raise GGUFError(
            f"{path} is truncated: it holds {file_size} of the {needed} bytes its tensors need; "
            "download or copy the model again"
        )
    if info.get("general.type") != "adapter":  # an adapter's are its base's, checked against it
        check_hyperparameters(info)
    return info


def check_adapter(adapter: GGUFInfo, base: GGUFInfo) -> dict:
    """What llama.cpp's adapter loader checks, at build time, with one line each: a LoRA adapter
    (general.type adapter, adapter.type lora) for the base's architecture, whose every tensor is
    the A or B half of a pair for a tensor the base has, shaped to fit it ([n_in, r] and
    [r, n_out] as ggml counts), with a finite alpha. Returns alpha, rank and the pairs' count."""
    path = adapter.path
    kind, lora = adapter.get("general.type"), adapter.get("adapter.type")
    if kind != "adapter" or lora != "lora":
        raise GGUFError(f"{path} is not a LoRA adapter (general.type {printable(kind)}, adapter.type "
                        f"{printable(lora)}); pass a LoRA GGUF (llama.cpp's convert_lora_to_gguf.py writes one)")
    if adapter.architecture != base.architecture:
        raise GGUFError(f"{path} is an adapter for {printable(adapter.architecture)} models, and the base is "
                        f"{printable(base.architecture)}; pass an adapter made for this base")
    alpha = adapter.get("adapter.lora.alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha)):
        raise GGUFError(f"{path}: adapter.lora.alpha is {printable(alpha)}, not a finite number; re-convert the adapter")
    base_shapes = {t.name: t.shape for t in base.tensors}
    halves: dict[str, dict[str, tuple]] = {}
    for t in adapter.tensors:
        stem, dot, half = t.name.rpartition(".")
        if not dot or half not in ("lora_a", "lora_b"):
            raise GGUFError(f"{path}: tensor {printable(t.name)} is neither a lora_a nor a lora_b; "
                            "re-convert the adapter")
        halves.setdefault(stem, {})[half] = t.shape
    ranks = set()
    for stem, pair in halves.items():
        if len(pair) != 2:
            raise GGUFError(f"{path}: tensor {printable(stem)} has a {'lora_a' if 'lora_a' in pair else 'lora_b'} "
                            "and no other half; re-convert the adapter")
        shape = base_shapes.get(stem)
        if shape is None:
            raise GGUFError(f"{path} adapts {printable(stem)}, which the base model does not have; pass an adapter "
                            "made for this base")
        a, b = pair["lora_a"], pair["lora_b"]
        if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[0] != shape[0] or b[1] != shape[1] or a[1] != b[0]:
            raise GGUFError(f"{path}: the adapter of {printable(stem)} has shapes {list(a)} and {list(b)}, which do "
                            f"not fit its base tensor {list(shape)} ([n_in, r] and [r, n_out]); pass an adapter "
                            "made for this base")
        ranks.add(a[1])
    if not halves:
        raise GGUFError(f"{path} adapts no tensor; it is not a usable adapter")
    return {"alpha": float(alpha) if alpha is not None else None,
            "rank": ranks.pop() if len(ranks) == 1 else None, "tensors": len(halves)}


GGML_MAX_NAME = 64
MAX_LAYERS = 4096


def check_tensors(info: GGUFInfo, alignment: int) -> int:
    """What llama.cpp's loader checks of each tensor, at build time: a known type, a shape its
    blocks divide, offsets in order and aligned. Returns the bytes the tensor data needs."""
    expected = 0
    for t in info.tensors:
        kind = GGML_TYPES.get(t.type_id)
        if kind is None:
            raise GGUFError(f"{info.path}: tensor {printable(t.name)} has type {t.type_id}, unknown to this "
                            "llama.cpp; re-quantize the model with a supported type")
        n = 1
        for d in t.shape:
            if d == 0 or d >= 1 << 62:
                raise GGUFError(f"{info.path} is damaged: tensor {printable(t.name)} has a dimension of {d}; "
                                "download the model again")
            n *= d
            if n >= 1 << 62:
                raise GGUFError(f"{info.path} is damaged: tensor {printable(t.name)} is impossibly large; "
                                "download the model again")
        if t.shape and t.shape[0] % kind[1]:
            raise GGUFError(f"{info.path}: tensor {printable(t.name)} has a row of {t.shape[0]} values, not a "
                            f"multiple of {kind[0]}'s block of {kind[1]}; re-convert the model")
        if t.offset != expected:
            raise GGUFError(f"{info.path} is damaged: tensor {printable(t.name)} starts at {t.offset}, expected "
                            f"{expected}; download the model again")
        expected += (t.n_bytes + alignment - 1) // alignment * alignment
    return info.data_offset + max(
        (t.offset + t.n_bytes for t in info.tensors), default=0)


def _count(info: GGUFInfo, key: str):
    value = info.get(key)
    if isinstance(value, list):  # per-layer counts (hybrid models)
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        return max(ints) if ints and len(ints) == len(value) else "bad"
    if value is None:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else "bad"


def check_hyperparameters(info: GGUFInfo) -> None:
    """The metadata llama.cpp needs before it loads anything, with a reason when it is wrong."""
    arch = info.get("general.architecture")
    if not isinstance(arch, str) or not arch or len(arch) > 64 or not arch.replace("-", "").replace("_", "").isalnum():
        raise GGUFError(f"{info.path} has no usable general.architecture (llama.cpp needs it to load the "
                        "model); re-convert the model")
    n_layer = _count(info, f"{arch}.block_count")
    if n_layer is not None and (n_layer == "bad" or not 1 <= n_layer <= MAX_LAYERS):
        raise GGUFError(f"{info.path}: {arch}.block_count is {printable(info.get(arch + '.block_count'))}, "
                        f"not a layer count llama.cpp can load (1 to {MAX_LAYERS}); re-convert the model")
    if isinstance(n_layer, int):
        for t in info.tensors:
            parts = t.name.split(".")
            if parts[0] == "blk" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= n_layer:
                raise GGUFError(f"{info.path}: tensor {printable(t.name)} belongs to a layer beyond "
                                f"{arch}.block_count ({n_layer}); re-convert the model")
    for key in ("embedding_length", "context_length", "attention.key_length", "attention.value_length"):
        value = _count(info, f"{arch}.{key}")
        if value is not None and (value == "bad" or not 1 <= value <= 1 << 24):
            raise GGUFError(f"{info.path}: {arch}.{key} is {printable(info.get(f'{arch}.{key}'))}, out of range; "
                            "re-convert the model")
    n_head = _count(info, f"{arch}.attention.head_count")
    n_head_kv = _count(info, f"{arch}.attention.head_count_kv")
    if n_head == "bad" or n_head_kv == "bad" or (isinstance(n_head, int) and not 0 <= n_head <= 1 << 16):
        raise GGUFError(f"{info.path}: {arch}.attention.head_count(_kv) is not a count; re-convert the model")
    if isinstance(n_head, int) and n_head > 0 and isinstance(n_head_kv, int) and not isinstance(
            info.get(f"{arch}.attention.head_count_kv"), list):
        if not 1 <= n_head_kv <= n_head or n_head % n_head_kv:
            raise GGUFError(f"{info.path}: {arch}.attention.head_count_kv ({n_head_kv}) must divide head_count "
                            f"({n_head}); llama.cpp cannot load it; re-convert the model")
    check_vocabulary(info)


def _array_len(value) -> int | None:
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict) and isinstance(value.get("count"), int):
        return value["count"]
    return None


def check_vocabulary(info: GGUFInfo) -> None:
    """The token list must cover every row of the embedding table: llama.cpp refuses a model
    whose vocabulary is shorter than its token_embd (a list cut short, a damaged conversion)."""
    n_tokens = _array_len(info.get("tokenizer.ggml.tokens"))
    embd = next((t for t in info.tensors if t.name == "token_embd.weight"), None)
    if n_tokens is None or embd is None or len(embd.shape) < 2:
        return
    if n_tokens != embd.shape[1]:
        raise GGUFError(f"{info.path}: its token list (tokenizer.ggml.tokens) has {n_tokens} tokens but its "
                        f"embedding table has {embd.shape[1]} rows; llama.cpp cannot load it; re-convert the model")


def check_architecture(info: GGUFInfo, known: list[str] | None, llama_version: str) -> None:
    """An architecture the stub's llama.cpp does not know would build and then fail to load."""
    if known and info.architecture not in known:
        raise GGUFError(f"{info.path}: its architecture {printable(info.architecture)!r} is not one this "
                        f"runtime's llama.cpp (llama-cpp-python {llama_version}) can load; use a model of a "
                        "supported architecture (bundle inspect shows it), or a stub built from a newer llama.cpp")
