"""Finding the prebuilt runtime stub for a target: stubs/<target>/ (or --stub PATH)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import targets
from runtime.host.gpu.registry import GPU_BACKENDS, GpuBackend
from targets import Target

from .errors import BundleError

NATIVE_CPU = "native-cpu.tar.zst"


def stubs_root() -> Path:
    env = os.environ.get("BUNDLE_STUBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "stubs"


@dataclass
class Stub:
    target: str
    spec: Target
    folder: Path
    exe: Path
    native_cpu: Path
    meta: dict
    gpu: dict[str, Path] = field(default_factory=dict)  # back end key -> its tar in the stub folder

    def gpu_backends(self) -> list[GpuBackend]:
        """The GPU back ends this stub folder holds, in the order of choice."""
        return [b for b in GPU_BACKENDS if b.key in self.gpu]

    def manifest_info(self) -> dict:
        keys = ("target", "runtime_version", "format_version", "llama_cpp_python", "glibc_min", "windows_min",
                "python", "pyinstaller", "stub_sha256", "build_flags", "backends")
        return {k: self.meta.get(k) for k in keys if k in self.meta}


def find_stub(target: str | None = None, stub_path: str | None = None) -> Stub:
    try:
        spec = targets.by_name(target or targets.host_name())
    except KeyError as exc:
        raise BundleError(exc.args[0]) from None
    target = spec.name
    if stub_path:
        exe = Path(stub_path)
        if not exe.is_file():
            raise BundleError(f"--stub {stub_path} is not a file; pass the bundle-runtime executable built by build.py")
        folder = exe.parent
    else:
        folder = stubs_root() / target
        exe = folder / spec.stub_name
        if not exe.is_file():
            raise BundleError(f"no runtime stub for {target} in {folder}/; {spec.missing_stub_hint(folder)}")
    meta_file = folder / "stub.json"
    native = folder / NATIVE_CPU
    if not meta_file.is_file() or not native.is_file():
        raise BundleError(
            f"the stub folder {folder}/ lacks stub.json or {NATIVE_CPU}; rebuild it with `python build.py`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        raise BundleError(f"{meta_file} is not valid JSON; rebuild the stub with `python build.py`") from None
    built_for = meta.get("target")
    if built_for and built_for != target:
        raise BundleError(f"the stub in {folder}/ is built for {built_for}, not {target}; build the {target} stub "
                          f"({spec.build_hint}) or choose --target {built_for}")
    gpu = {}
    for b in GPU_BACKENDS:  # each listed in stub.json and present beside the stub
        record = meta.get("native", {}).get(b.key)
        path = folder / (record or {}).get("file", b.stub_file)
        if record and path.is_file():
            gpu[b.key] = path
    return Stub(target, spec, folder, exe, native, meta, gpu)


def find_universal_stubs() -> tuple[Stub, list[Stub]]:
    """The stubs a universal file is made of: Windows x86-64's (its front: the PE image) and
    every stored target's whose stub is built (runtime.bundlefile.layout.STORED_TARGETS)."""
    from runtime.bundlefile.layout import STORED_TARGETS

    front = targets.by_name("windows-x86_64")
    if not (stubs_root() / front.name / front.stub_name).is_file():
        raise BundleError(f"a universal file starts as the Windows program: no stub for {front.name} in "
                          f"{stubs_root() / front.name}/; {front.missing_stub_hint(stubs_root() / front.name)}")
    stored = []
    for name in STORED_TARGETS:
        spec = targets.by_name(name)
        if (stubs_root() / name / spec.stub_name).is_file():
            stored.append(find_stub(name))
    if not stored:
        hints = "; ".join(f"{t}: {targets.by_name(t).build_hint}" for t in STORED_TARGETS)
        raise BundleError(f"a universal file carries Linux runtimes, and no Linux stub is built in {stubs_root()}/ "
                          f"({hints})")
    return find_stub(front.name), stored
