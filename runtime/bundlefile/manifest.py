"""The manifest: one typed definition for the writer (bundler) and the reader (runtime) of what
`bundle build` stores beside the model. Every field is checked before use (fields.py)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .. import digest
from .fields import Invalid, as_object, digest_field, sha256_field, take
from .layout import LORA_NAME, MAX_ADAPTERS, MAX_BYTES, STORED_TARGETS

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
        data = as_object(data, where)
        n_layer = take(data, "n_layer", int, where, required=True, lo=1, hi=MAX_LAYERS)
        layers = data.get("layer_bytes")
        if not isinstance(layers, list) or len(layers) != n_layer or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_BYTES for x in layers):
            raise Invalid(f"{where}.layer_bytes", f"expected {n_layer} byte counts")
        return cls(
            n_layer=n_layer,
            layer_bytes=tuple(layers),
            output_bytes=take(data, "output_bytes", int, where, default=0, lo=0, hi=MAX_BYTES),
            n_embd_k_gqa=take(data, "n_embd_k_gqa", int, where, required=True, lo=0, hi=1 << 24),
            n_embd_v_gqa=take(data, "n_embd_v_gqa", int, where, required=True, lo=0, hi=1 << 24),
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
    digest: str

    def to_json(self) -> dict:
        return {"file": self.file, "size": self.size, **digest.to_json(self.digest)}

    @classmethod
    def from_json(cls, data, where: str) -> "ModelPart":
        data = as_object(data, where)
        name = take(data, "file", str, where, required=True, max_len=251)
        if not _PART_NAME.match(name) or ".." in name:
            raise Invalid(f"{where}.file", "not a plain file name")
        return cls(name, take(data, "size", int, where, required=True, lo=1, hi=MAX_BYTES),
                   digest_field(data, where))


@dataclass(frozen=True)
class BaseRef:
    """The model an adapter-only bundle runs on: the file it was built against (a name to show;
    it is found by its content), the model's size and digest."""

    file: str
    size: int
    digest: str

    def to_json(self) -> dict:
        return {"file": self.file, "size": self.size, **digest.to_json(self.digest)}

    @classmethod
    def from_json(cls, data, where: str) -> "BaseRef":
        data = as_object(data, where)
        name = take(data, "file", str, where, required=True, max_len=255)
        if "/" in name or "\\" in name or "\0" in name:
            raise Invalid(f"{where}.file", "not a plain file name")
        return cls(name, take(data, "size", int, where, required=True, lo=1, hi=MAX_BYTES),
                   digest_field(data, where))


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
    digest: str | None = None  # of the model inside the file ("blake3:hex"; "sha256:hex" before)
    layout: Layout | None = None
    parts: tuple[ModelPart, ...] = ()  # empty: the model is inside the executable

    def to_json(self) -> dict:
        data = {k: getattr(self, k) for k in ("name", "architecture", "parameters", "size_label", "quantization",
                                              "context_length", "gguf_version", "tensors", "has_chat_template",
                                              "file_size", "file")}
        if self.digest:
            data.update(digest.to_json(self.digest))
        data["layout"] = self.layout.to_json() if self.layout else None
        if self.parts:
            data["parts"] = [p.to_json() for p in self.parts]
        return data

    @classmethod
    def from_json(cls, data, where: str = "manifest.model") -> "ModelInfo":
        data = as_object(data, where)
        layout = data.get("layout")
        return cls(
            name=take(data, "name", str, where, default="model", max_len=1024),
            architecture=take(data, "architecture", str, where, default="unknown", max_len=256),
            parameters=take(data, "parameters", int, where, default=0, lo=0, hi=MAX_BYTES),
            size_label=take(data, "size_label", str, where, default="", max_len=64),
            quantization=take(data, "quantization", str, where, default="", max_len=64),
            context_length=take(data, "context_length", int, where, lo=0, hi=1 << 32),
            gguf_version=take(data, "gguf_version", int, where, default=3, lo=0, hi=1 << 16),
            tensors=take(data, "tensors", int, where, default=0, lo=0, hi=1 << 32),
            has_chat_template=take(data, "has_chat_template", bool, where, default=False),
            file_size=take(data, "file_size", int, where, default=0, lo=0, hi=MAX_BYTES),
            file=take(data, "file", str, where, max_len=4096),
            digest=digest_field(data, where, required=False),
            layout=Layout.from_json(layout, f"{where}.layout") if layout is not None else None,
            parts=_parts(data.get("parts"), f"{where}.parts"),
        )


def _parts(value, where: str) -> tuple[ModelPart, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_PARTS:
        raise Invalid(where, f"expected a list of 1 to {MAX_PARTS} parts")
    parts = tuple(ModelPart.from_json(v, f"{where}[{i}]") for i, v in enumerate(value))
    if len({p.file for p in parts}) != len(parts):
        raise Invalid(where, "a part is named twice")
    return parts


MAX_BACKEND_FACTS = 16
_VERSION_KEYS = ("version_min", "protocol")  # a back end's facts that are versions: [13, 0]; RPC's [7, 0, 0]


def _backend_facts(value, where: str) -> dict[str, dict]:
    """{back end key: {fact: value}}: what a GPU back end's libraries need of the machine (its
    registry row reads them: CUDA's `version_min` is the driver's CUDA version). Short strings,
    or small version lists."""
    value = as_object(value, where)
    if len(value) > MAX_BACKEND_FACTS:
        raise Invalid(where, "too many back ends")
    out: dict[str, dict] = {}
    for key, facts in value.items():
        facts = as_object(facts, f"{where}.{key}")
        if not isinstance(key, str) or len(key) > 32 or len(facts) > MAX_BACKEND_FACTS:
            raise Invalid(where, "a back end key is not a short string")
        checked = {}
        for name, fact in facts.items():
            if name in _VERSION_KEYS:
                if not isinstance(fact, list) or len(fact) > 3 or not all(
                        isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1000 for x in fact):
                    raise Invalid(f"{where}.{key}.{name}", "expected a version like [13, 0]")
                checked[name] = tuple(fact)
            else:
                checked[name] = take(facts, name, str, f"{where}.{key}", max_len=256)
        out[key] = checked
    return out


@dataclass(frozen=True)
class StubInfo:
    """The stub a bundle was built on: its target, versions and build flags, and what each GPU
    back end it carries needs of the machine (`backends`, keyed as runtime.host.gpu.registry)."""

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
    backends: dict = field(default_factory=dict)

    _TEXT = ("target", "runtime_version", "llama_cpp_python", "glibc_min", "windows_min", "python", "pyinstaller")
    # Bundles written before back ends were named generically carried CUDA's facts flat.
    _LEGACY = {"cuda_version_min": ("cuda", "version_min"), "cuda_architectures": ("cuda", "architectures")}

    def needs(self, backend_key: str) -> dict:
        """What the back end's libraries need of the machine ({} when nothing is recorded)."""
        return self.backends.get(backend_key, {})

    def to_json(self) -> dict:
        data: dict[str, Any] = {k: getattr(self, k) for k in self._TEXT if getattr(self, k) is not None}
        if self.format_version is not None:
            data["format_version"] = self.format_version
        if self.stub_sha256:
            data["stub_sha256"] = self.stub_sha256
        if self.build_flags:
            data["build_flags"] = list(self.build_flags)
        if self.backends:
            data["backends"] = {k: {n: list(v) if isinstance(v, tuple) else v for n, v in facts.items()}
                                for k, facts in self.backends.items()}
        return data

    @classmethod
    def from_json(cls, data, where: str = "manifest.stub") -> "StubInfo":
        data = as_object(data, where)
        values = {k: take(data, k, str, where, max_len=256) for k in cls._TEXT}
        flags = data.get("build_flags") or []
        if not isinstance(flags, list) or len(flags) > 256 or not all(isinstance(x, str) and len(x) < 1024
                                                                        for x in flags):
            raise Invalid(f"{where}.build_flags", "expected a list of strings")
        raw = dict(as_object(data.get("backends") or {}, f"{where}.backends"))
        for old, (key, name) in cls._LEGACY.items():
            if data.get(old) is not None:
                raw.setdefault(key, {}).setdefault(name, data[old])
        return cls(**values, format_version=take(data, "format_version", int, where, lo=0, hi=1 << 16),
                   stub_sha256=sha256_field(data, "stub_sha256", where, required=False), build_flags=tuple(flags),
                   backends=_backend_facts(raw, f"{where}.backends"))


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter packed by `bundle build --lora`: its name (the entry is lora/<name>.gguf),
    the scale it applies at by default, and what the build read of it."""

    name: str
    scale: float = 1.0
    alpha: float | None = None
    rank: int | None = None
    tensors: int | None = None  # adapted base tensors
    size: int | None = None

    def to_json(self) -> dict:
        data = {"name": self.name, "scale": self.scale}
        for k in ("alpha", "rank", "tensors", "size"):
            if getattr(self, k) is not None:
                data[k] = getattr(self, k)
        return data

    @classmethod
    def from_json(cls, data, where: str) -> "Adapter":
        data = as_object(data, where)
        name = take(data, "name", str, where, required=True, max_len=64)
        if not LORA_NAME.fullmatch(name):
            raise Invalid(f"{where}.name", "not an adapter name ([A-Za-z0-9_.-], 64 at most)")
        return cls(name=name, scale=_finite(data, "scale", where, 1.0), alpha=_finite(data, "alpha", where, None),
                   rank=take(data, "rank", int, where, lo=1, hi=1 << 20),
                   tensors=take(data, "tensors", int, where, lo=0, hi=1 << 20),
                   size=take(data, "size", int, where, lo=0, hi=MAX_BYTES))


MAX_SCALE = 1000.0


def _finite(data, key, where, default):
    value = take(data, key, (int, float), where)
    if value is None:
        return default
    if not math.isfinite(value) or abs(value) > MAX_SCALE:
        raise Invalid(f"{where}.{key}", f"not a finite number of at most {MAX_SCALE:g}")
    return float(value)


def _adapters(value, where: str) -> tuple[Adapter, ...]:
    if not isinstance(value, list) or len(value) > MAX_ADAPTERS:
        raise Invalid(where, f"expected a list of at most {MAX_ADAPTERS}")
    out = tuple(Adapter.from_json(a, f"{where}[{i}]") for i, a in enumerate(value))
    if len({a.name for a in out}) != len(out):
        raise Invalid(where, "an adapter name appears twice")
    return out


MAX_TEMPLATE = 1024 * 1024
SETTING_TYPES = (str, int, float, bool)


@dataclass(frozen=True)
class Manifest:
    """What `bundle build` stores beside the model: names, template, default settings, and the
    facts the runtime needs (model summary and layout, stub). Written by bundler, read by the
    runtime; settings values are checked and converted by runtime.launch.settings when applied."""

    name: str = "model"
    built: str | None = None
    bundler_version: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    template_name: str = "auto"
    template: str | None = None
    settings: dict = field(default_factory=dict)
    stub: StubInfo = field(default_factory=StubInfo)
    # A universal file's other runtimes (layout.STORED_TARGETS), by target: the stub each was
    # built from. `stub` is the front (Windows) one.
    runtimes: dict = field(default_factory=dict)
    adapters: tuple = ()  # LoRA adapters (Adapter), in the order their ids count
    # An adapter-only bundle (bundle build --lora A --base B): no model of its own; the base's
    # model, named by its file, size and SHA-256, is found beside it at launch (or --base PATH).
    base: BaseRef | None = None

    def to_json(self) -> dict:
        data = {"name": self.name, "built": self.built, "bundler_version": self.bundler_version,
                "model": self.model.to_json(), "template_name": self.template_name, "template": self.template,
                "settings": dict(self.settings), "stub": self.stub.to_json()}
        if self.runtimes:
            data["runtimes"] = {t: stub.to_json() for t, stub in self.runtimes.items()}
        if self.adapters:
            data["adapters"] = [a.to_json() for a in self.adapters]
        if self.base:
            data["base"] = self.base.to_json()
        return data

    def targets(self) -> list[str]:
        """Every platform the file runs on: its front runtime's and the stored ones'."""
        return [t for t in (self.stub.target, *self.runtimes) if t]

    @classmethod
    def from_json(cls, data, where: str = "manifest") -> "Manifest":
        data = as_object(data, where)
        settings = as_object(data.get("settings") or {}, f"{where}.settings")
        for key, value in settings.items():
            if not isinstance(key, str) or len(key) > 64:
                raise Invalid(f"{where}.settings", "a key is not a short string")
            if value is not None and not isinstance(value, SETTING_TYPES):
                raise Invalid(f"{where}.settings.{key}", f"expected a plain value, got {type(value).__name__}")
            if isinstance(value, str) and len(value) > MAX_TEMPLATE:
                raise Invalid(f"{where}.settings.{key}", "too long")
        return cls(
            name=take(data, "name", str, where, default="model", max_len=1024),
            built=take(data, "built", str, where, max_len=64),
            bundler_version=take(data, "bundler_version", str, where, max_len=64),
            model=ModelInfo.from_json(data.get("model") or {}, f"{where}.model"),
            template_name=take(data, "template_name", str, where, default="auto", max_len=1024),
            template=take(data, "template", str, where, max_len=MAX_TEMPLATE),
            settings=dict(settings),
            stub=StubInfo.from_json(data.get("stub") or {}, f"{where}.stub"),
            runtimes=_runtimes(data.get("runtimes") or {}, f"{where}.runtimes"),
            adapters=_adapters(data.get("adapters") or [], f"{where}.adapters"),
            base=BaseRef.from_json(data["base"], f"{where}.base") if data.get("base") is not None else None,
        )


def _runtimes(value, where: str) -> dict:
    value = as_object(value, where)
    out = {}
    for target, raw in value.items():
        if target not in STORED_TARGETS:
            raise Invalid(where, f"{str(target)[:40]!r} is not a target a universal file carries")
        stub = StubInfo.from_json(raw, f"{where}.{target}")
        if stub.target != target:
            raise Invalid(f"{where}.{target}.target", "differs from its key")
        out[target] = stub
    return out
