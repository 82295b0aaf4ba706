"""Finding a Vulkan GPU without risking the process, before ggml's Vulkan back end is unpacked.

The Vulkan loader (libvulkan.so.1) comes with every GPU driver on Linux: AMD, Intel and NVIDIA
alike. The probe asks it for its devices the way ggml's back end will (same selection rules:
discrete and integrated GPUs, GGML_VK_VISIBLE_DEVICES to choose any device, a software device
of CPU type only when chosen so), and creates and destroys a logical device on each, the step
where a broken driver fails. Drivers are native code that can crash or hang: on Linux the probe
runs in a forked child, so a crash or a hang becomes a reason, never the end of the bundle.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import time
from dataclasses import dataclass, field

LOADER = "vulkan-1.dll" if sys.platform == "win32" else "libvulkan.so.1"
MIB = 1024 * 1024
TIMEOUT_S = 15.0
API_1_2 = (1 << 22) | (2 << 12)
TYPES = {0: "other", 1: "integrated GPU", 2: "discrete GPU", 3: "virtual GPU", 4: "CPU"}
TYPE_CPU = 4
HEAP_DEVICE_LOCAL = 1
QUEUE_COMPUTE = 2
MEMORY_BUDGET_EXT = b"VK_EXT_memory_budget"
# VkStructureType values used here
ST_APPLICATION_INFO, ST_INSTANCE_CREATE_INFO, ST_DEVICE_QUEUE_CREATE_INFO, ST_DEVICE_CREATE_INFO = 0, 1, 2, 3
ST_MEMORY_PROPERTIES_2 = 1000059006
ST_MEMORY_BUDGET = 1000237000
RESULTS = {-1: "VK_ERROR_OUT_OF_HOST_MEMORY", -2: "VK_ERROR_OUT_OF_DEVICE_MEMORY", -3: "VK_ERROR_INITIALIZATION_FAILED",
           -4: "VK_ERROR_DEVICE_LOST", -6: "VK_ERROR_LAYER_NOT_PRESENT", -7: "VK_ERROR_EXTENSION_NOT_PRESENT",
           -8: "VK_ERROR_FEATURE_NOT_PRESENT", -9: "VK_ERROR_INCOMPATIBLE_DRIVER"}


@dataclass
class Device:
    index: int  # in the loader's list: what GGML_VK_VISIBLE_DEVICES counts
    name: str
    type: str
    api_version: str
    total_bytes: int
    free_bytes: int
    problem: str | None = None  # set when the device failed to create


@dataclass
class Probe:
    loader: str | None = None
    devices: list[Device] = field(default_factory=list)  # every device the loader lists
    chosen: list[int] = field(default_factory=list)  # indices ggml will use
    problem: str | None = None

    @property
    def usable(self) -> list[Device]:
        return [d for d in self.devices if d.index in self.chosen]

    def to_json(self) -> dict:
        return {"loader": self.loader, "devices": [
            {"index": d.index, "name": d.name, "type": d.type, "api_version": d.api_version,
             "total_mib": d.total_bytes // MIB, "free_mib": d.free_bytes // MIB, "problem": d.problem}
            for d in self.devices], "chosen": self.chosen, "problem": self.problem}

    @classmethod
    def from_json(cls, data: dict) -> "Probe":
        devices = [Device(d["index"], d["name"], d["type"], d["api_version"], d["total_mib"] * MIB,
                          d["free_mib"] * MIB, d.get("problem")) for d in data.get("devices", [])]
        return cls(data.get("loader"), devices, list(data.get("chosen", [])), data.get("problem"))


class _AppInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("pApplicationName", ctypes.c_char_p),
                ("applicationVersion", ctypes.c_uint32), ("pEngineName", ctypes.c_char_p),
                ("engineVersion", ctypes.c_uint32), ("apiVersion", ctypes.c_uint32)]


class _InstanceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("pApplicationInfo", ctypes.POINTER(_AppInfo)), ("enabledLayerCount", ctypes.c_uint32),
                ("ppEnabledLayerNames", ctypes.c_void_p), ("enabledExtensionCount", ctypes.c_uint32),
                ("ppEnabledExtensionNames", ctypes.c_void_p)]


class _QueueInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("queueFamilyIndex", ctypes.c_uint32), ("queueCount", ctypes.c_uint32),
                ("pQueuePriorities", ctypes.POINTER(ctypes.c_float))]


class _DeviceInfo(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("flags", ctypes.c_uint32),
                ("queueCreateInfoCount", ctypes.c_uint32), ("pQueueCreateInfos", ctypes.POINTER(_QueueInfo)),
                ("enabledLayerCount", ctypes.c_uint32), ("ppEnabledLayerNames", ctypes.c_void_p),
                ("enabledExtensionCount", ctypes.c_uint32), ("ppEnabledExtensionNames", ctypes.c_void_p),
                ("pEnabledFeatures", ctypes.c_void_p)]


class _Properties(ctypes.Structure):  # the head of VkPhysicalDeviceProperties (the rest is room)
    _fields_ = [("apiVersion", ctypes.c_uint32), ("driverVersion", ctypes.c_uint32), ("vendorID", ctypes.c_uint32),
                ("deviceID", ctypes.c_uint32), ("deviceType", ctypes.c_int), ("deviceName", ctypes.c_char * 256),
                ("rest", ctypes.c_uint8 * 2048)]


class _Heap(ctypes.Structure):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint32)]


class _MemoryProperties(ctypes.Structure):
    _fields_ = [("memoryTypeCount", ctypes.c_uint32), ("memoryTypes", ctypes.c_uint32 * 64),
                ("memoryHeapCount", ctypes.c_uint32), ("memoryHeaps", _Heap * 16)]


class _MemoryProperties2(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("memoryProperties", _MemoryProperties)]


class _Budget(ctypes.Structure):
    _fields_ = [("sType", ctypes.c_int), ("pNext", ctypes.c_void_p), ("heapBudget", ctypes.c_uint64 * 16),
                ("heapUsage", ctypes.c_uint64 * 16)]


class _QueueFamily(ctypes.Structure):
    _fields_ = [("queueFlags", ctypes.c_uint32), ("queueCount", ctypes.c_uint32),
                ("timestampValidBits", ctypes.c_uint32), ("extent", ctypes.c_uint32 * 3)]


class _Extension(ctypes.Structure):
    _fields_ = [("extensionName", ctypes.c_char * 256), ("specVersion", ctypes.c_uint32)]


def _version(v: int) -> str:
    return f"{(v >> 22) & 0x7F}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def _result(rc: int) -> str:
    return RESULTS.get(rc, f"VkResult {rc}")


def visible_devices(environ=None) -> list[int] | None:
    """GGML_VK_VISIBLE_DEVICES as ggml reads it (indices separated by commas or spaces)."""
    value = (os.environ if environ is None else environ).get("GGML_VK_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return [int(x) for x in value.replace(",", " ").split()]
    except ValueError:
        return [-1]


def _memory(vk, pd, use_budget: bool) -> tuple[int, int]:
    """(total, free) of the device-local heaps: the budget left where VK_EXT_memory_budget
    answers (as ggml asks), the heap sizes otherwise."""
    props2 = _MemoryProperties2(ST_MEMORY_PROPERTIES_2, None)
    budget = _Budget(ST_MEMORY_BUDGET, None)
    if use_budget:
        props2.pNext = ctypes.cast(ctypes.pointer(budget), ctypes.c_void_p)
    vk.vkGetPhysicalDeviceMemoryProperties2(pd, ctypes.byref(props2))
    mem = props2.memoryProperties
    total = free = 0
    for i in range(min(mem.memoryHeapCount, 16)):
        heap = mem.memoryHeaps[i]
        if heap.flags & HEAP_DEVICE_LOCAL:
            total += heap.size
            free += max(0, budget.heapBudget[i] - budget.heapUsage[i]) if use_budget and budget.heapBudget[i] else heap.size
    return total, free


def _has_extension(vk, pd, name: bytes) -> bool:
    count = ctypes.c_uint32(0)
    if vk.vkEnumerateDeviceExtensionProperties(pd, None, ctypes.byref(count), None) != 0 or not count.value:
        return False
    exts = (_Extension * count.value)()
    vk.vkEnumerateDeviceExtensionProperties(pd, None, ctypes.byref(count), exts)
    return any(e.extensionName == name for e in exts[:count.value])


def _create_device(vk, pd) -> str | None:
    """Create and destroy a logical device with one compute queue: None, or what failed."""
    count = ctypes.c_uint32(0)
    vk.vkGetPhysicalDeviceQueueFamilyProperties(pd, ctypes.byref(count), None)
    families = (_QueueFamily * max(1, count.value))()
    vk.vkGetPhysicalDeviceQueueFamilyProperties(pd, ctypes.byref(count), families)
    compute = [i for i in range(count.value) if families[i].queueFlags & QUEUE_COMPUTE]
    if not compute:
        return "it has no compute queue"
    priority = ctypes.c_float(1.0)
    queue = _QueueInfo(ST_DEVICE_QUEUE_CREATE_INFO, None, 0, compute[0], 1, ctypes.pointer(priority))
    info = _DeviceInfo(ST_DEVICE_CREATE_INFO, None, 0, 1, ctypes.pointer(queue), 0, None, 0, None, None)
    device = ctypes.c_void_p()
    rc = vk.vkCreateDevice(pd, ctypes.byref(info), None, ctypes.byref(device))
    if rc != 0:
        return f"creating it failed ({_result(rc)})"
    vk.vkDestroyDevice(device, None)
    return None


def _bind(vk) -> None:
    """Argument types where a handle is passed (a bare int would be cut to 32 bits)."""
    P, V = ctypes.c_void_p, ctypes.c_void_p
    for name, args in {
        "vkEnumeratePhysicalDevices": [P, P, P], "vkGetPhysicalDeviceProperties": [P, P],
        "vkGetPhysicalDeviceMemoryProperties2": [P, P], "vkEnumerateDeviceExtensionProperties": [P, P, P, P],
        "vkGetPhysicalDeviceQueueFamilyProperties": [P, P, P], "vkCreateDevice": [P, P, P, P],
        "vkDestroyDevice": [V, P], "vkDestroyInstance": [V, P], "vkCreateInstance": [P, P, P],
    }.items():
        fn = getattr(vk, name)
        fn.argtypes = args
        fn.restype = None if name.startswith(("vkDestroy", "vkGetPhysicalDevice")) else ctypes.c_int


def probe_here(library: str | None = None, environ=None) -> Probe:
    """The probe itself, in this process (probe() runs it in a child). Never raises."""
    library = library or (os.environ if environ is None else environ).get("BUNDLE_VULKAN_LIBRARY") or LOADER
    try:
        vk = ctypes.CDLL(library)
    except OSError:
        return Probe(problem=f"no Vulkan driver on this machine ({LOADER} not found; it comes with the GPU driver)")
    try:
        _bind(vk)
        probe = Probe(loader=library)
        version = ctypes.c_uint32(0)
        enum_version = getattr(vk, "vkEnumerateInstanceVersion", None)
        if enum_version is None or enum_version(ctypes.byref(version)) != 0 or version.value < API_1_2:
            probe.problem = "the Vulkan loader is older than Vulkan 1.2, which ggml needs: update the GPU driver"
            return probe
        app = _AppInfo(ST_APPLICATION_INFO, None, b"bundle", 1, b"bundle", 1, API_1_2)
        info = _InstanceInfo(ST_INSTANCE_CREATE_INFO, None, 0, ctypes.pointer(app), 0, None, 0, None)
        instance = ctypes.c_void_p()
        rc = vk.vkCreateInstance(ctypes.byref(info), None, ctypes.byref(instance))
        if rc == -9:  # what the loader answers when it finds no driver (ICD) at all
            probe.problem = "the Vulkan loader finds no GPU driver on this machine (VK_ERROR_INCOMPATIBLE_DRIVER)"
            return probe
        if rc != 0:
            probe.problem = f"the Vulkan driver could not start ({_result(rc)})"
            return probe
        try:
            count = ctypes.c_uint32(0)
            rc = vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), None)
            handles = (ctypes.c_void_p * max(1, count.value))()
            if rc == 0 and count.value:
                rc = vk.vkEnumeratePhysicalDevices(instance, ctypes.byref(count), handles)
            if rc not in (0, 5):  # VK_INCOMPLETE still lists devices
                probe.problem = f"the Vulkan driver could not list its devices ({_result(rc)})"
                return probe
            for i in range(count.value):
                props = _Properties()
                vk.vkGetPhysicalDeviceProperties(handles[i], ctypes.byref(props))
                total, free = _memory(vk, handles[i], _has_extension(vk, handles[i], MEMORY_BUDGET_EXT))
                probe.devices.append(Device(i, props.deviceName.decode(errors="replace"),
                                            TYPES.get(props.deviceType, "other"), _version(props.apiVersion),
                                            total, free))
                probe.devices[-1]._handle, probe.devices[-1]._api = handles[i], props.apiVersion
            _choose(probe, visible_devices(environ))
            for d in probe.usable:
                d.problem = "it supports only Vulkan " + d.api_version + "; ggml needs 1.2" if d._api < API_1_2 \
                    else _create_device(vk, d._handle)
            bad = [d for d in probe.usable if d.problem]
            if bad and len(bad) == len(probe.usable):
                d = bad[0]
                probe.problem = f"the Vulkan device {d.name} is unusable: {d.problem}"
            probe.chosen = [d.index for d in probe.usable if not d.problem]
            return probe
        finally:
            vk.vkDestroyInstance(instance, None)
    except (AttributeError, OSError) as exc:
        return Probe(loader=library, problem=f"the Vulkan loader is unusable ({exc})")


def _choose(probe: Probe, visible: list[int] | None) -> None:
    """ggml's choice of devices (ggml_vk_instance_init), with a reason when none is left."""
    n = len(probe.devices)
    if visible is not None:
        wrong = [i for i in visible if not 0 <= i < n]
        if wrong:
            probe.problem = (f"GGML_VK_VISIBLE_DEVICES names device {wrong[0]}, but the Vulkan driver lists "
                             f"{n} device{'s' if n != 1 else ''} (0 to {n - 1})" if n else
                             "GGML_VK_VISIBLE_DEVICES is set, but the Vulkan driver lists no device")
            return
        probe.chosen = list(dict.fromkeys(visible))
        return
    if not n:
        probe.problem = "the Vulkan driver lists no device"
        return
    gpus = [d.index for d in probe.devices if d.type in ("discrete GPU", "integrated GPU")]
    others = [d.index for d in probe.devices if d.type not in ("discrete GPU", "integrated GPU", "CPU")]
    probe.chosen = gpus or others[:1]
    if not probe.chosen:
        names = ", ".join(d.name for d in probe.devices)
        probe.problem = (f"the only Vulkan device is {names}, a software one, slower than the CPU back end "
                         f"(GGML_VK_VISIBLE_DEVICES=0 uses it anyway)")


def probe(library: str | None = None, timeout: float = TIMEOUT_S) -> Probe:
    """probe_here() in a forked child: a driver that crashes or hangs costs a reason, not the
    process. (Where there is no fork, in this process.)"""
    if not hasattr(os, "fork"):
        return probe_here(library)
    t0 = time.monotonic()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: probe, write, leave at once (no atexit, no buffers flushed twice)
        try:
            os.close(r)
            data = json.dumps(probe_here(library).to_json()).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return Probe(problem=f"the Vulkan driver did not answer within {timeout:.0f} s")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Probe(problem=f"the Vulkan driver crashed while listing its devices ({name})")
    try:
        return Probe.from_json(json.loads(b"".join(chunks)))
    except (ValueError, KeyError, TypeError):
        return Probe(problem="the Vulkan probe gave no answer")
