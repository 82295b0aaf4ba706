"""Build targets as data: one record per platform a bundle can be built for (a module each in this
package), read by build.py (which toolchain step builds its stub), `bundle build --target` (where
its stub is, what its executable is called, how to say what it needs), and the tests (how its
executables run here: natively, under wine, under an emulator). The runtime does not import this:
it reads the file it runs from (runtime.bundlefile.exe knows both executable formats).

A new target is one module here (its Target) and its toolchain step in buildsys/.
"""

from __future__ import annotations

import collections
import platform
from dataclasses import dataclass

STUB_BASENAME = "bundle-runtime"


@dataclass(frozen=True)
class Target:
    name: str  # "linux-x86_64": the stub folder (stubs/<name>/) and what --target takes
    system: str  # "linux", "windows"
    machine: str  # "x86_64", "aarch64"
    triple: str  # the C toolchain's target ("x86_64-linux-gnu.2.17" for zig, "x86_64-w64-mingw32")
    exe_suffix: str  # "" or ".exe": what the stub and the bundles it makes are called
    exe_format: str  # "elf" or "pe" (runtime.bundlefile.exe reads both)
    toolchain: str  # "module:function" building stubs/<name>/, called by build.py with its arguments
    build_hint: str  # how to build its stub on this machine, for the message when it is missing
    cpu_variants: tuple[str, ...]  # ggml's CPU variants its native libraries carry (the best one is picked at launch)
    gpu_backends: tuple[str, ...]  # GPU back ends (runtime.host.gpu.registry keys) its stub can carry
    built_on: tuple[str, ...]  # the machines (target names) its toolchain step runs on
    runner: str  # how the tests run its executables here: "native", "wine", "qemu-aarch64"
    needs: str  # what it needs of a machine, with the stub's stub.json facts: "glibc ≥ {glibc_min}"
    max_executable: int | None  # the largest executable the system starts (a larger model goes beside it)

    @property
    def stub_name(self) -> str:
        return STUB_BASENAME + self.exe_suffix

    @property
    def stub_files(self) -> tuple[str, ...]:
        """What stubs/<name>/ holds (GPU back ends' tars besides, when built)."""
        return (self.stub_name, "native-cpu.tar.zst", "stub.json")

    def needs_text(self, meta: dict) -> str:
        """What a bundle of this stub needs of a machine, in words (from the stub's record)."""
        return self.needs.format_map(collections.defaultdict(lambda: "?", meta))

    def missing_stub_hint(self, folder) -> str:
        """What to do when stubs/<name>/ is empty, on this machine."""
        if host_name() in self.built_on:
            return self.build_hint
        return (f"build it with build.py on a {' or '.join(self.built_on)} machine (PyInstaller does not "
                f"cross-compile) or download it from the project's CI artifacts, and put it in {folder}/")

    def default_name(self, stem: str) -> str:
        """What `bundle build` calls the executable when -o is not given: the model's name, with
        the machine added where it would otherwise take the name of this machine's own build
        (dist/model-aarch64, built on x86-64 Linux)."""
        if self.exe_suffix or self.name == host_name():
            return self.executable_name(stem)
        return f"{stem}-{self.machine}"

    def executable_name(self, stem: str) -> str:
        """What a bundle built for this target is called (a Windows program must end in .exe)."""
        return stem if not self.exe_suffix or stem.lower().endswith(self.exe_suffix) else stem + self.exe_suffix


def _load() -> dict[str, Target]:
    from . import linux_aarch64, linux_x86_64, windows_x86_64

    return {t.name: t for t in (linux_x86_64.TARGET, windows_x86_64.TARGET, linux_aarch64.TARGET)}


TARGETS: dict[str, Target] = _load()


def host_name() -> str:
    """This machine's platform, named like the targets ("linux-x86_64")."""
    system = {"Linux": "linux", "Windows": "windows", "Darwin": "macos"}.get(platform.system(), platform.system().lower())
    machine = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(
        platform.machine().lower(), platform.machine().lower())
    return f"{system}-{machine}"


def by_name(name: str) -> Target:
    """The target named so; KeyError with the known names when there is none."""
    try:
        return TARGETS[name]
    except KeyError:
        raise KeyError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
