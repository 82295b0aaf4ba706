"""What this machine's processor offers the runtime: the CPUs this process may use, its physical
cores, how busy they are now (the default thread count leaves busy cores alone), and the facts
--info shows (model name, memory)."""

from __future__ import annotations

import os
import platform
import sys
import time

WINDOWS = sys.platform == "win32"
import ctypes

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


def physical_cores() -> int:
    """Physical cores this process may use (threads beyond them slow llama.cpp down)."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    if WINDOWS:
        return max(1, min(_windows_physical_cores() or len(allowed), usable_cpus()))
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
    try:
        mem = mem or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": cores,
        "memory_bytes": mem,
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }
