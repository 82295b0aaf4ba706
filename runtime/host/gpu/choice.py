"""Choosing the back end at launch: the best CPU variant always; a GPU back end on top when one
works, tried in the order of the registry (registry.py: CUDA, then Vulkan).

The order of each try is built so that nothing on the GPU path can take the process down: the
driver is asked first, without side effects (NVML for CUDA; for Vulkan a forked child that lists
and creates the devices); the back end's libraries are unpacked only when a device answers and
the model fits; ggml loads its back end through dlopen, which fails softly; and a model that
cannot be placed on the GPU is loaded again on the CPU (load()). Each step that fails leaves a
reason to show; a back end asked for by name (--gpu cuda, --gpu vulkan) fails cleanly instead.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ModelLoadError, RuntimeFailure
from .. import bindings, libraries
from . import nvidia
from .registry import GPU_BACKENDS, GpuBackend, by_key

MODES = ("auto", "off", *(b.key for b in GPU_BACKENDS))


@dataclass
class Backend:
    name: str = "CPU"  # or a GpuBackend's label
    cpu_variant: str | None = None
    device: str | None = None
    gpu_layers: int = 0
    n_layer: int | None = None
    reason: str | None = None  # why the CPU runs although a GPU path exists (or was asked for)
    note: str | None = None  # e.g. a partial offload is much slower
    probes: dict = field(default_factory=dict)  # what each GPU back end's probe found
    skipped: dict = field(default_factory=dict)  # back end key -> why it was not used
    key: str | None = None  # the GpuBackend in use
    devices: list[int] | None = None  # ggml devices to load onto: [] pins the CPU

    def to_json(self) -> dict:
        return {"name": self.name, "cpu_variant": self.cpu_variant, "device": self.device,
                "gpu_layers": self.gpu_layers, "n_layer": self.n_layer, "cpu_reason": self.reason,
                "note": self.note, "skipped": self.skipped, "nvidia": self.probes.get("cuda"),
                "vulkan": self.probes.get("vulkan")}

    def describe(self) -> str:
        if self.key:
            layers = "all layers" if self.n_layer is not None and self.gpu_layers > self.n_layer else \
                f"{self.gpu_layers} of {self.n_layer} layers"
            return f"{self.name} ({self.device}, {layers}; CPU {self.cpu_variant})"
        return f"CPU ({self.cpu_variant or 'unknown variant'})"

    def fall_back(self, reason: str) -> None:
        if self.key:
            self.skipped[self.key] = reason
        self.name, self.key, self.device, self.gpu_layers, self.note, self.devices = "CPU", None, None, 0, None, []
        self.reason = reason


def _ggml(libdir: Path):
    ggml = ctypes.CDLL(str(libdir / bindings.GGML_LIB))
    ggml.ggml_backend_load.restype = ctypes.c_void_p
    ggml.ggml_backend_load.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    return ggml


@dataclass
class _Try:
    gpu_layers: int = 0
    n_layer: int | None = None
    note: str | None = None
    device: str | None = None
    devices: list[int] = field(default_factory=list)


def _try(d: GpuBackend, b: Backend, payload, settings, libdir: Path, layout: dict | None, say,
         last_log) -> tuple[_Try, str | None]:
    """One back end: probe, plan, unpack, load. (plan, None) when it can run, else (_, the reason)."""
    t = _Try()
    probe = d.probe()
    b.probes[d.key] = probe.to_json()
    problem = probe.problem or d.check(probe, payload.manifest.stub)
    if problem:
        return t, problem
    free = sum(dev.free_bytes for dev in d.usable_devices(probe))
    # Plan before unpacking: a model that cannot use the GPU costs no GPU libraries on disk.
    if settings.gpu_layers >= 0:
        t.gpu_layers, t.n_layer = settings.gpu_layers, layout["n_layer"] if layout else None
        if t.gpu_layers == 0:
            return t, "no layers offloaded (-ngl 0)"
    elif layout:
        plan = nvidia.plan_offload(layout, settings.ctx, free)
        t.gpu_layers, t.n_layer = plan.gpu_layers, plan.n_layer
        if plan.gpu_layers == 0:
            return t, (f"the model does not fit in {free // nvidia.MIB} MiB of free GPU memory "
                       f"(it needs ~{plan.needed_bytes // nvidia.MIB} MiB)")
        if plan.partial:
            t.note = (f"only {plan.gpu_layers} of {plan.n_layer} layers fit in {free // nvidia.MIB} MiB of free "
                      f"GPU memory (all need ~{plan.needed_bytes // nvidia.MIB} MiB): a partial offload is much slower "
                      "than a full one; a smaller --ctx or model fits more")
    else:
        t.gpu_layers = 999  # no layout to plan with: try everything, fall back if it fails
    try:
        folder = libraries.extract_entry(payload, d.entry, say=say)
        # The back end's own runtime libraries, loaded by path first: its library then finds
        # them by soname wherever the cache is (it carries no RPATH to them).
        for name in d.preload:
            if (folder / name).exists():
                ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
        ggml = _ggml(libdir)
        reg = ggml.ggml_backend_load(str(folder / d.library).encode())
    except RuntimeFailure as exc:
        return t, f"{d.what} could not be unpacked ({exc})"
    except OSError as exc:
        return t, f"the {d.label} back end failed to load ({exc})"
    detail = last_log().strip()
    if not reg:
        return t, f"the {d.label} back end failed to load" + (f" ({detail})" if detail else "")
    count = ggml.ggml_backend_reg_dev_count(reg)
    if count == 0:
        return t, f"the {d.label} back end found no usable GPU" + (f" ({detail})" if detail else "")
    t.devices = [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(count)]
    t.device = (ggml.ggml_backend_dev_description(t.devices[0]) or b"GPU").decode(errors="replace")
    return t, None


def choose(payload, settings, libdir: Path, layout: dict | None, say=lambda m: None,
           last_log=lambda: "") -> Backend:
    """Decide the back end (and how many layers). Raises only when --gpu NAME cannot be met."""
    b = Backend(cpu_variant=bindings.loaded_cpu_variant(), devices=[])
    mode = settings.gpu
    if mode == "off":
        b.reason = "the GPU is turned off (--gpu off)"
        return b
    carried = [d for d in GPU_BACKENDS if d.entry in payload.entries]
    if mode != "auto" and by_key(mode) not in carried:
        d = by_key(mode)
        raise RuntimeFailure(f"--gpu {mode}: this bundle carries no {d.label} back end; rebuild it with a stub "
                             f"built by python build.py {d.build_flag}, and bundle build --gpu {mode}")
    if not carried:
        b.reason = "this bundle carries no GPU back end"
        return b
    for d in carried:
        if mode not in ("auto", d.key):
            continue
        t, problem = _try(d, b, payload, settings, libdir, layout, say, last_log)
        if problem is None:
            b.name, b.key, b.device, b.devices = d.label, d.key, t.device, t.devices
            b.gpu_layers, b.n_layer, b.note = t.gpu_layers, t.n_layer, t.note
            return b
        if mode == d.key:
            raise RuntimeFailure(f"--gpu {mode}: {problem}")
        b.skipped[d.key] = problem
    if len(b.skipped) == 1:
        b.reason = next(iter(b.skipped.values()))
    else:
        b.reason = "; ".join(f"{by_key(k).label}: {r}" for k, r in b.skipped.items())
    return b


def load(b: Backend, settings, open_engine, say=lambda m: None):
    """open_engine(gpu_layers, devices) on the chosen back end; when the GPU cannot take the
    model (out of memory at load time, a driver fault), on the CPU with the reason, unless the
    back end was asked for by name."""
    try:
        return open_engine(b.gpu_layers, b.devices)
    except ModelLoadError as exc:
        if not b.key:
            raise
        if settings.gpu == b.key:
            raise RuntimeFailure(f"--gpu {b.key}: loading the model onto the GPU failed ({exc})") from None
        b.fall_back(f"loading the model onto the {b.name} GPU failed ({exc})")
        say(f"running on the CPU: {b.reason}")
        return open_engine(0, [])
