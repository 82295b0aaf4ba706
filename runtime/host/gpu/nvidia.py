"""Finding an NVIDIA GPU without crashing on machines that have none, and deciding how much of
the model it can hold.

The probe uses NVML (libnvidia-ml.so.1, installed with every NVIDIA driver): it answers about
the driver and devices without creating a CUDA context, and a machine without a driver simply
has no such library. Every failure becomes a reason the user is shown, never a crash.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field

NVML_LIBRARY = "libnvidia-ml.so.1"
MIB = 1024 * 1024
# What llama.cpp needs on the GPU beyond weights and KV cache (compute buffers, CUDA context):
# a fixed reserve plus a share of the total; partial offloads keep the same margin.
RESERVE_BYTES = 512 * MIB
RESERVE_FRACTION = 0.05


@dataclass
class Device:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int]


@dataclass
class Probe:
    driver_version: str | None = None
    cuda_version: tuple[int, int] | None = None  # the newest CUDA the driver supports
    devices: list[Device] = field(default_factory=list)
    problem: str | None = None

    def to_json(self) -> dict:
        return {
            "driver_version": self.driver_version,
            "cuda_version": ".".join(map(str, self.cuda_version)) if self.cuda_version else None,
            "devices": [
                {"index": d.index, "name": d.name, "total_mib": d.total_bytes // MIB, "free_mib": d.free_bytes // MIB,
                 "compute_capability": ".".join(map(str, d.compute_capability))}
                for d in self.devices
            ],
            "problem": self.problem,
        }


class _Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def probe_nvidia(library: str | None = None) -> Probe:
    """Ask the NVIDIA driver what it has. Never raises."""
    library = library or os.environ.get("BUNDLE_NVML_LIBRARY") or NVML_LIBRARY
    try:
        nvml = ctypes.CDLL(library)
    except OSError:
        return Probe(problem="no NVIDIA driver on this machine (libnvidia-ml.so.1 not found)")
    try:
        rc = nvml.nvmlInit_v2()
        if rc != 0:
            return Probe(problem=f"the NVIDIA driver does not answer (NVML error {rc}); is the driver loaded?")
        try:
            probe = Probe()
            buf = ctypes.create_string_buffer(96)
            if nvml.nvmlSystemGetDriverVersion(buf, 96) == 0:
                probe.driver_version = buf.value.decode(errors="replace")
            version = ctypes.c_int(0)
            if nvml.nvmlSystemGetCudaDriverVersion_v2(ctypes.byref(version)) == 0 and version.value:
                probe.cuda_version = (version.value // 1000, version.value % 1000 // 10)
            count = ctypes.c_uint(0)
            if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
                probe.problem = "the NVIDIA driver reports no GPU"
                return probe
            for i in range(count.value):
                handle = ctypes.c_void_p()
                if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                    continue
                name = ctypes.create_string_buffer(96)
                nvml.nvmlDeviceGetName(handle, name, 96)
                mem = _Memory()
                if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(mem)) != 0:
                    continue
                major, minor = ctypes.c_int(0), ctypes.c_int(0)
                nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor))
                probe.devices.append(Device(i, name.value.decode(errors="replace"), mem.total, mem.free,
                                            (major.value, minor.value)))
            if not probe.devices:
                probe.problem = "the NVIDIA driver reports GPUs but none answered"
            return probe
        finally:
            nvml.nvmlShutdown()
    except (AttributeError, OSError) as exc:  # a library without the calls we need
        return Probe(problem=f"the NVIDIA driver's NVML library is unusable ({exc})")


@dataclass
class Plan:
    gpu_layers: int  # for llama.cpp's n_gpu_layers: n_layer + 1 offloads the output layer too
    n_layer: int
    needed_bytes: int  # everything on the GPU (full offload)
    fits_fully: bool

    @property
    def partial(self) -> bool:
        return 0 < self.gpu_layers < self.n_layer + 1


def kv_bytes_per_layer(layout: dict, n_ctx: int) -> int:
    """f16 K and V for n_ctx tokens in one layer."""
    return n_ctx * (layout["n_embd_k_gqa"] + layout["n_embd_v_gqa"]) * 2


def plan_offload(layout: dict, n_ctx: int, free_bytes: int) -> Plan:
    """How many layers fit in free_bytes of VRAM, keeping a margin for llama.cpp's buffers."""
    layers = layout["layer_bytes"]
    n_layer = len(layers)
    kv = kv_bytes_per_layer(layout, n_ctx)
    output = layout.get("output_bytes", 0)
    needed = sum(layers) + n_layer * kv + output
    budget = free_bytes - RESERVE_BYTES - int(RESERVE_FRACTION * free_bytes)
    if needed <= budget:
        return Plan(n_layer + 1, n_layer, needed + RESERVE_BYTES, True)
    used, fit = 0, 0
    for size in layers:  # llama.cpp offloads the last layers first; sizes are alike, order is moot
        if used + size + kv > budget:
            break
        used += size + kv
        fit += 1
    return Plan(fit, n_layer, needed + RESERVE_BYTES, False)
