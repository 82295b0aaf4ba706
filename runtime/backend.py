"""Choosing the back end at launch: the best CPU variant always; CUDA on top when it works.

The order is built so that nothing on the GPU path can take the process down: the driver is
asked first (NVML, no CUDA context); the CUDA libraries are unpacked only when a driver answers;
ggml loads its CUDA back end through dlopen, which fails softly; and a model that cannot be
placed on the GPU is loaded again on the CPU. Each step that fails leaves a reason to show.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from . import gpu, native
from .errors import RuntimeFailure
from .payload import NATIVE_CUDA_ENTRY as CUDA_ENTRY

CUDA_PRELOAD = ["libcudart.so.13", "libcublasLt.so.13", "libcublas.so.13"]


@dataclass
class Backend:
    name: str = "CPU"
    cpu_variant: str | None = None
    device: str | None = None
    gpu_layers: int = 0
    n_layer: int | None = None
    reason: str | None = None  # why the CPU runs although a GPU path exists (or was asked for)
    note: str | None = None  # e.g. a partial offload is much slower
    probe: dict | None = field(default=None)

    def to_json(self) -> dict:
        return {"name": self.name, "cpu_variant": self.cpu_variant, "device": self.device,
                "gpu_layers": self.gpu_layers, "n_layer": self.n_layer, "cpu_reason": self.reason,
                "note": self.note, "nvidia": self.probe}

    def describe(self) -> str:
        if self.name == "CUDA":
            layers = "all layers" if self.n_layer is not None and self.gpu_layers > self.n_layer else \
                f"{self.gpu_layers} of {self.n_layer} layers"
            return f"CUDA ({self.device}, {layers}; CPU {self.cpu_variant})"
        return f"CPU ({self.cpu_variant or 'unknown variant'})"


def _ggml(libdir: Path):
    ggml = ctypes.CDLL(str(libdir / native.GGML_LIB))
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    return ggml


def choose(payload, settings, libdir: Path, layout: dict | None, say=lambda m: None,
           last_log=lambda: "") -> Backend:
    """Decide CPU or CUDA (and how many layers). Raises only when --gpu cuda cannot be met."""
    b = Backend(cpu_variant=native.loaded_cpu_variant())
    mode = settings.gpu
    if mode == "off":
        b.reason = "the GPU is turned off (--gpu off)"
        return b
    if CUDA_ENTRY not in payload.entries:
        if mode == "cuda":
            raise RuntimeFailure("--gpu cuda: this bundle carries no CUDA back end; rebuild it with a CUDA-enabled "
                                 "stub (python build.py --cuda) and bundle build --gpu cuda")
        b.reason = "this bundle carries no CUDA back end"
        return b
    probe = gpu.probe_nvidia()
    b.probe = probe.to_json()
    need = tuple(payload.manifest.stub.cuda_version_min or (0, 0))
    problem = probe.problem
    if not problem and probe.cuda_version and tuple(probe.cuda_version) < tuple(need):
        problem = (f"the NVIDIA driver {probe.driver_version} supports CUDA {'.'.join(map(str, probe.cuda_version))}, "
                   f"this bundle needs CUDA {'.'.join(map(str, need))}: update the NVIDIA driver")
    free = sum(d.free_bytes for d in probe.devices)
    if not problem:
        # Plan before unpacking: a model that cannot use the GPU costs no CUDA libraries on disk.
        if settings.gpu_layers >= 0:
            b.gpu_layers = settings.gpu_layers
            b.n_layer = layout["n_layer"] if layout else None
            if b.gpu_layers == 0:
                problem = "no layers offloaded (-ngl 0)"
        elif layout:
            plan = gpu.plan_offload(layout, settings.ctx, free)
            b.gpu_layers, b.n_layer = plan.gpu_layers, plan.n_layer
            if plan.gpu_layers == 0:
                problem = (f"the model does not fit in {free // gpu.MIB} MiB of free VRAM "
                           f"(it needs ~{plan.needed_bytes // gpu.MIB} MiB)")
            elif plan.partial:
                b.note = (f"only {plan.gpu_layers} of {plan.n_layer} layers fit in {free // gpu.MIB} MiB of free "
                          f"VRAM (all need ~{plan.needed_bytes // gpu.MIB} MiB): a partial offload is much slower "
                          "than a full one; a smaller --ctx or model fits more")
        else:
            b.gpu_layers = 999  # no layout to plan with: try everything, fall back if it fails
    if not problem:
        try:
            cuda_dir = native.extract_entry(payload, CUDA_ENTRY, say=say)
            # The CUDA runtime libraries, loaded by path first: libggml-cuda.so then finds them
            # by soname wherever the cache is (it carries no RPATH to them).
            for name in CUDA_PRELOAD:
                if (cuda_dir / name).exists():
                    ctypes.CDLL(str(cuda_dir / name), mode=ctypes.RTLD_GLOBAL)
            ggml = _ggml(libdir)
            reg = ggml.ggml_backend_load(str(cuda_dir / "libggml-cuda.so").encode())
            if not reg:
                detail = last_log().strip()
                problem = "the CUDA back end failed to load" + (f" ({detail})" if detail else "")
            elif ggml.ggml_backend_reg_dev_count(reg) == 0:
                detail = last_log().strip()
                problem = "the CUDA back end found no usable GPU" + (f" ({detail})" if detail else "")
            else:
                dev = ggml.ggml_backend_reg_dev_get(reg, 0)
                b.device = (ggml.ggml_backend_dev_description(dev) or b"GPU").decode(errors="replace")
        except RuntimeFailure as exc:
            problem = f"the CUDA libraries could not be unpacked ({exc})"
        except OSError as exc:
            problem = f"the CUDA back end failed to load ({exc})"
    if problem:
        if mode == "cuda":
            raise RuntimeFailure(f"--gpu cuda: {problem}")
        b.reason, b.gpu_layers, b.note = problem, 0, None
        return b
    b.name = "CUDA"
    return b
