"""The GPU back ends a bundle can carry, described as data: build.py, `bundle build --gpu`, the
writer, the stub reader, backend.choose and the fallback all read these descriptors, so a back
end is added here (plus its probe module and its build step), not threaded through each.

The order of GPU_BACKENDS is the order of choice at launch: CUDA when an NVIDIA driver answers
and the model fits, else Vulkan when a non-CPU Vulkan device answers and it fits, else the CPU.
This module imports nothing heavy: the builder and the runtime's start both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class GpuBackend:
    key: str  # the --gpu word, the stub.json "native" key, the --info "probes" key
    label: str  # in messages
    entry: str  # the payload entry (a zstd tar)
    stub_file: str  # beside the stub in stubs/<target>/
    library: str  # ggml's back end inside the entry, loaded with ggml_backend_load
    preload: tuple[str, ...]  # libraries of the entry loaded by path first (they carry no RPATH)
    probe: Callable  # () -> a probe with .problem, .devices (each .free_bytes, .name), .to_json()
    check: Callable  # (probe, StubInfo) -> a problem, or None: what the probe alone cannot judge
    build_flag: str  # what python build.py needs to build it
    what: str  # the entry in words
    driver: str  # what the user would install or update

    def usable_devices(self, probe) -> list:
        return list(getattr(probe, "usable", probe.devices))


def _probe_cuda():
    from . import nvidia

    return nvidia.probe_nvidia()


def _check_cuda(probe, stub) -> str | None:
    need = tuple(stub.needs("cuda").get("version_min") or (0, 0))
    if probe.cuda_version and tuple(probe.cuda_version) < need:
        return (f"the NVIDIA driver {probe.driver_version} supports CUDA {'.'.join(map(str, probe.cuda_version))}, "
                f"this bundle needs CUDA {'.'.join(map(str, need))}: update the NVIDIA driver")
    return None


def _probe_vulkan():
    from . import vulkan

    return vulkan.probe()


def _check_nothing(probe, stub) -> str | None:
    return None


CUDA = GpuBackend(
    key="cuda", label="CUDA", entry="native/cuda.tar.zst", stub_file="native-cuda.tar.zst",
    library="libggml-cuda.so", preload=("libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"),
    probe=_probe_cuda, check=_check_cuda, build_flag="--cuda", what="the CUDA libraries",
    driver="the NVIDIA driver")
VULKAN = GpuBackend(
    key="vulkan", label="Vulkan", entry="native/vulkan.tar.zst", stub_file="native-vulkan.tar.zst",
    library="libggml-vulkan.so", preload=(), probe=_probe_vulkan, check=_check_nothing, build_flag="--vulkan",
    what="the Vulkan back end", driver="the GPU's driver (it brings the Vulkan loader, libvulkan.so.1)")

GPU_BACKENDS: tuple[GpuBackend, ...] = (CUDA, VULKAN)
KEYS = tuple(b.key for b in GPU_BACKENDS)


def by_key(key: str) -> GpuBackend:
    for b in GPU_BACKENDS:
        if b.key == key:
            return b
    raise KeyError(key)
