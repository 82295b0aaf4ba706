"""Finding the prebuilt runtime stub for a target: stubs/<target>/ (or --stub PATH)."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from runtime.backends import GPU_BACKENDS, GpuBackend

from .errors import BundleError

TARGETS = ("linux-x86_64", "linux-aarch64", "windows-x86_64", "macos-arm64")
STUB_NAMES = {"windows-x86_64": "bundle-runtime.exe"}
NATIVE_CPU = "native-cpu.tar.zst"


def host_target() -> str:
    system = {"Linux": "linux", "Windows": "windows", "Darwin": "macos"}.get(platform.system(), platform.system().lower())
    machine = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "arm64", "aarch64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    return f"{system}-{machine}"


def stubs_root() -> Path:
    env = os.environ.get("BUNDLE_STUBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "stubs"


@dataclass
class Stub:
    target: str
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
                "python", "pyinstaller", "stub_sha256", "build_flags", "cuda_version_min", "cuda_architectures")
        return {k: self.meta.get(k) for k in keys if k in self.meta}


def find_stub(target: str | None = None, stub_path: str | None = None) -> Stub:
    target = target or host_target()
    if target not in TARGETS:
        raise BundleError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")
    if stub_path:
        exe = Path(stub_path)
        if not exe.is_file():
            raise BundleError(f"--stub {stub_path} is not a file; pass the bundle-runtime executable built by build.py")
        folder = exe.parent
    else:
        folder = stubs_root() / target
        exe = folder / STUB_NAMES.get(target, "bundle-runtime")
        if not exe.is_file():
            if target == host_target():
                how = "run `python build.py` (or `make stub`) to build it"
            elif target == "windows-x86_64" and host_target() == "linux-x86_64":
                how = "build it here with `python build.py --target windows-x86_64` (or `make stub-windows`)"
            else:
                how = (f"build it with build.py on a {target} machine (PyInstaller does not cross-compile) "
                       f"or download it from the project's CI artifacts, and put it in {folder}/")
            raise BundleError(f"no runtime stub for {target} in {folder}/; {how}")
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
    gpu = {}
    for b in GPU_BACKENDS:  # each listed in stub.json and present beside the stub
        record = meta.get("native", {}).get(b.key)
        path = folder / (record or {}).get("file", b.stub_file)
        if record and path.is_file():
            gpu[b.key] = path
    return Stub(target, folder, exe, native, meta, gpu)
