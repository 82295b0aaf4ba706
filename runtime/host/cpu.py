"""What this machine's processor offers the runtime: the CPUs this process may use, its physical
cores (the fast ones, where fast and slow cores are mixed), how busy they are now (the default
thread count leaves busy cores alone), and the facts --info shows (model name, the features
ggml's CPU variants use, memory)."""

from __future__ import annotations

import os
import platform
import sys
import time

import ctypes

WINDOWS = sys.platform == "win32"
SYSFS_CPU = "/sys/devices/system/cpu"
# A core counts as a fast one when it rates at this share of the fastest or more: the big and
# prime cores of a big.LITTLE design, not its LITTLE ones, whose pace the others would wait for
# at every barrier of ggml's thread pool. Linux's cpu_capacity folds in how much a core does
# per clock (a Cortex-A55 is about 40% of an A76); a highest clock alone does not (1.8 against
# 2.4 GHz for the same pair), so it must come closer to count.
FAST_SHARE = {"cpu_capacity": 0.6, "cpufreq/cpuinfo_max_freq": 0.8}

def usable_cpus() -> int:
    """Logical CPUs this process may run on: its affinity mask, and a cgroup CPU quota if set
    (a container with --cpus 2 on a 64-core host)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:  # cgroup v2
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        try:  # cgroup v1 (CentOS 7, RHEL 8, older Docker)
            with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
                quota = int(f.read())
            with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                period = int(f.read())
            if quota > 0 and period > 0:
                n = min(n, max(1, -(-quota // period)))
        except (OSError, ValueError):
            pass
    return max(1, n)


def _cpu_sample():
    """(wall clock, busy CPU-seconds of the whole machine, this process's CPU-seconds)."""
    if WINDOWS:
        return _cpu_sample_windows()
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    t = os.times()
    return time.monotonic(), (sum(fields) - idle) / hz, t.user + t.system


def _cpu_sample_windows():
    """GetSystemTimes: idle, kernel (which includes idle) and user time of all CPUs, in 100 ns."""
    from ctypes import wintypes

    idle, kernel, user = wintypes.FILETIME(), wintypes.FILETIME(), wintypes.FILETIME()
    try:
        if not ctypes.WinDLL("kernel32").GetSystemTimes(ctypes.byref(idle), ctypes.byref(kernel), ctypes.byref(user)):
            return None
    except (OSError, AttributeError):
        return None

    def seconds(ft):
        return ((ft.dwHighDateTime << 32) | ft.dwLowDateTime) / 1e7

    t = os.times()
    return time.monotonic(), seconds(kernel) + seconds(user) - seconds(idle), t.user + t.system


class BusyMeter:
    """How many CPUs other programs keep busy, measured from a start (made early in a launch)
    to the moment a thread count is chosen: the machine's busy time less this process's own,
    over the wall time between (at least MIN_SECONDS; the launch's own work fills most of it)."""

    MIN_SECONDS = 0.05

    def __init__(self):
        self.start = _cpu_sample()

    def busy_cpus(self) -> int:
        if self.start is None:
            return 0
        left = self.MIN_SECONDS - (time.monotonic() - self.start[0])
        if left > 0:
            time.sleep(left)
        end = _cpu_sample()
        if end is None:
            return 0
        wall = end[0] - self.start[0]
        others = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0, round(others / wall)) if wall > 0 else 0


def fast_cpus(cpus, sysfs: str = SYSFS_CPU) -> set[int] | None:
    """Of these CPUs, the fast cores' where the processor mixes fast and slow ones (ARM's
    big.LITTLE, DynamIQ): rated by Linux's cpu_capacity, else by their highest clock. None
    where they are all alike or sysfs does not say."""
    for fact, share in FAST_SHARE.items():
        rating = {}
        for cpu in cpus:
            try:
                with open(f"{sysfs}/cpu{cpu}/{fact}") as f:
                    rating[cpu] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                rating = {}
                break
        if rating:
            top = max(rating.values())
            fast = {cpu for cpu, r in rating.items() if r >= share * top}
            return fast if top > 0 and len(fast) < len(rating) else None
    return None


def physical_cores() -> int:
    """Physical cores this process may use (threads beyond them slow llama.cpp down); only the
    fast ones where fast and slow cores are mixed."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    if WINDOWS:
        return max(1, min(_windows_physical_cores() or len(allowed), usable_cpus()))
    allowed = fast_cpus(allowed) or allowed
    cores = set()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            cpu = phys = None
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, phys = int(value), "0"
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, value))
    except (OSError, ValueError):
        pass
    return max(1, min(len(cores) or len(allowed), usable_cpus()))


def _windows_physical_cores() -> int | None:
    """Processor cores, from GetLogicalProcessorInformationEx(RelationProcessorCore)."""
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    size = wintypes.DWORD(0)
    kernel32.GetLogicalProcessorInformationEx(0, None, ctypes.byref(size))  # RelationProcessorCore = 0
    if not size.value:
        return None
    buf = ctypes.create_string_buffer(size.value)
    if not kernel32.GetLogicalProcessorInformationEx(0, buf, ctypes.byref(size)):
        return None
    count, offset = 0, 0
    while offset < size.value:  # each record: DWORD Relationship, DWORD Size, ...
        rec_size = int.from_bytes(buf.raw[offset + 4:offset + 8], "little")
        if rec_size <= 0:
            break
        count += 1
        offset += rec_size
    return count or None


def _windows_hardware() -> tuple[str | None, int | None]:
    """The processor's name (from the registry) and the memory size (GlobalMemoryStatusEx)."""
    model = mem = None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
            model = str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).strip() or None
    except OSError:
        pass
    try:
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                        ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                        ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                        ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                        ("ullAvailExtendedVirtual", ctypes.c_uint64)]

        status = MemoryStatus(dwLength=ctypes.sizeof(MemoryStatus))
        if ctypes.WinDLL("kernel32").GlobalMemoryStatusEx(ctypes.byref(status)):
            mem = status.ullTotalPhys
    except (OSError, AttributeError):
        pass
    return model, mem


# Linux's arm64 AT_HWCAP (word 1) and AT_HWCAP2 (word 2) bits of the features ggml's ARM CPU
# variants are chosen by, read as ggml reads them (fp16: both FPHP and ASIMDHP).
ARM_HWCAPS = {"asimd": (1, 1 << 1), "dotprod": (1, 1 << 20), "fp16": (1, (1 << 9) | (1 << 10)), "sve": (1, 1 << 22),
              "i8mm": (2, 1 << 13), "bf16": (2, 1 << 14), "sve2": (2, 1 << 1), "sme": (2, 1 << 23),
              "sme2": (2, 1 << 37)}
AT_HWCAP, AT_HWCAP2 = 16, 26
# The x86 flags (as /proc/cpuinfo spells them) ggml's x86 CPU variants are chosen by.
X86_FLAGS = ("sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni", "avx512f", "avx512_vbmi", "avx512_vnni",
             "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def arm_features(hwcap: int, hwcap2: int) -> list[str]:
    words = {1: hwcap, 2: hwcap2}
    return [name for name, (word, bits) in ARM_HWCAPS.items() if words[word] & bits == bits]


def cpu_features() -> list[str]:
    """The features of this processor that decide ggml's CPU variant: on ARM Linux from the
    kernel's hardware capabilities (what ggml reads too; /proc/cpuinfo may be absent or, under
    an emulator, the host's), on x86 Linux from /proc/cpuinfo's flags; [] elsewhere."""
    if WINDOWS:
        return []
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            getauxval = ctypes.CDLL(None).getauxval
            getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
            return arm_features(getauxval(AT_HWCAP), getauxval(AT_HWCAP2))
        except (OSError, AttributeError):
            return []
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in X86_FLAGS if flag in have]
    except OSError:
        pass
    return []


def hardware(cores: int) -> dict:
    model = mem = None
    if sys.platform == "win32":
        model, mem = _windows_hardware()
    try:
        with open("/proc/cpuinfo", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if model is None:  # ARM boards name themselves in the device tree ("Raspberry Pi 5 Model B Rev 1.0")
        try:
            with open("/sys/firmware/devicetree/base/model", "rb") as f:
                model = f.read(200).rstrip(b"\0").decode("utf-8", "replace").strip() or None
        except OSError:
            pass
    try:
        mem = mem or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": cores,
        "cpu_features": cpu_features(),
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }


def runtime_target() -> str:
    """The platform this runtime was built for, named as the build targets ("linux-aarch64"):
    what it looks for in a universal file. (Under qemu-user the emulated machine; under wine,
    windows-x86_64.)"""
    system = "windows" if sys.platform == "win32" else sys.platform.rstrip("0123456789")
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{system}-{machine}"


def wine_host() -> str | None:
    """The kernel under wine ("Linux"), when this Windows program runs under wine; else None.
    (wine's ntdll exports wine_get_host_version; Windows' does not.)"""
    if sys.platform != "win32":
        return None
    try:
        get = ctypes.windll.ntdll.wine_get_host_version
    except (OSError, AttributeError):
        return None
    get.restype = None
    sysname, release = ctypes.c_char_p(), ctypes.c_char_p()
    try:
        get(ctypes.byref(sysname), ctypes.byref(release))
    except OSError:
        return None
    return (sysname.value or b"?").decode("ascii", "replace")
