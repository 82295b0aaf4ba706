"""ggml's Vulkan back end (libggml-vulkan.so), built from the same llama.cpp source as the CPU
libraries and with the same toolchain (zig for glibc 2.17, buildsys/zig.py), so that a bundle
carrying it still starts on the old userlands the CPU build reaches.

The tools come from Debian (docs/facts.md #12): glslc compiles the shaders, libvulkan-dev gives the
headers and the loader to link against, spirv-headers what ggml-vulkan's configure asks for. Only
the headers the back end includes are put on zig's include path (never the whole /usr/include,
whose glibc headers are newer than the target's). The loader itself, libvulkan.so.1, is never
shipped: it comes with every GPU driver, and the runtime finds it before it loads the back end.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from . import ggml, zig

DEBIAN_PACKAGES = ["glslc", "libvulkan-dev", "spirv-headers"]
FLAGS = ["-DGGML_VULKAN=ON", "-DGGML_BACKEND_DL=ON", "-DGGML_NATIVE=OFF", "-DGGML_OPENMP=OFF",
         "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
         "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
LIBRARY = "libggml-vulkan.so"
LOADER = "libvulkan.so.1"
SYSTEM_INCLUDE = Path("/usr/include")
SYSTEM_LOADER = Path("/usr/lib/x86_64-linux-gnu") / LOADER

# Debian 12's Vulkan headers (1.3.239) predate VK_EXT_layer_settings, which ggml uses only to
# turn on the validation layer's best-practice checks in a GGML_VULKAN_VALIDATE build (off here).
# The instance is created without that chained struct when the headers lack it.
_LAYER_SETTINGS_OLD = """    VkBool32 enable_best_practice = layer_settings;
    std::vector<vk::LayerSettingEXT> settings = {"""
_LAYER_SETTINGS_END = "    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, layers, extensions, &layer_setting_info);\n"
_LAYER_SETTINGS_FALLBACK = ("#else\n    vk::InstanceCreateInfo instance_create_info(vk::InstanceCreateFlags{}, &app_info, "
                            "layers, extensions);\n#endif\n")


def missing_tools() -> list[str]:
    """The Debian packages whose files this build needs and cannot find."""
    missing = []
    if not shutil.which("glslc"):
        missing.append("glslc")
    if not (SYSTEM_INCLUDE / "vulkan" / "vulkan.hpp").exists() or not SYSTEM_LOADER.exists():
        missing.append("libvulkan-dev")
    if not (SYSTEM_INCLUDE / "spirv" / "unified1" / "spirv.hpp").exists():
        missing.append("spirv-headers")
    return missing


def header_version() -> int:
    text = (SYSTEM_INCLUDE / "vulkan" / "vulkan_core.h").read_text(errors="replace")
    for line in text.splitlines():
        if line.startswith("#define VK_HEADER_VERSION "):
            return int(line.split()[-1])
    return 0


def adapt_source(src: Path) -> None:
    """Guard the VK_EXT_layer_settings block (see above); fail if the source no longer matches."""
    path = src / "ggml" / "src" / "ggml-vulkan" / "ggml-vulkan.cpp"
    text = path.read_text()
    if "#ifdef VK_EXT_layer_settings" in text:
        return
    start, end = text.find(_LAYER_SETTINGS_OLD), text.find(_LAYER_SETTINGS_END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: the instance set-up is not where this build expects it; update buildsys/vulkan.py")
    end += len(_LAYER_SETTINGS_END)
    text = text[:start] + "#ifdef VK_EXT_layer_settings\n" + text[start:end] + _LAYER_SETTINGS_FALLBACK + text[end:]
    path.write_text(text)


def include_dir(folder: Path) -> Path:
    """Only the Vulkan and SPIR-V headers, as links into /usr/include."""
    inc = folder / "include"
    inc.mkdir(parents=True, exist_ok=True)
    for name in ("vulkan", "vk_video", "spirv"):
        link = inc / name
        if (SYSTEM_INCLUDE / name).exists() and not link.exists():
            link.symlink_to(SYSTEM_INCLUDE / name)
    return inc


def cache_key(llama_version: str, triple: str = zig.TRIPLE) -> str:
    ident = [llama_version, *sorted(FLAGS), *zig.identity(triple), f"vk-headers={header_version()}",
             subprocess.run(["glslc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]]
    return hashlib.sha256(" ".join(ident).encode()).hexdigest()[:12]


def ensure_backend(cache: Path, llama_version: str, log, run_with_progress, triple: str = zig.TRIPLE,
                   loader: Path = SYSTEM_LOADER) -> Path:
    """libggml-vulkan.so for triple's machine, compiled once per llama.cpp version, flags,
    toolchain, headers and glslc (cached under cache/ggml-vulkan-VERSION-KEY/). loader: the
    Vulkan loader of that machine to link against (another machine's comes from its userland;
    ggml's CMake then builds its shader generator with this machine's gcc)."""
    missing = missing_tools()
    if missing:
        raise SystemExit(f"--vulkan needs Debian's {' '.join(missing)}: run `make buildtools-vulkan` "
                         f"(apt-get install {' '.join(DEBIAN_PACKAGES)})")
    folder = cache / f"ggml-vulkan-{llama_version}-{cache_key(llama_version, triple)}"
    lib = folder / LIBRARY
    if lib.exists():
        log(f"Vulkan back end: cached ({lib})")
        return lib

    def prepare(src: Path, work: Path) -> list[str]:
        if "VK_EXT_layer_settings" not in (SYSTEM_INCLUDE / "vulkan" / "vulkan_core.h").read_text(errors="replace"):
            adapt_source(src)
        return [f"-DVulkan_INCLUDE_DIR={include_dir(work)}", f"-DVulkan_LIBRARY={loader}",
                f"-DVulkan_GLSLC_EXECUTABLE={shutil.which('glslc')}"]

    return ggml.build_library(cache, folder, lib, llama_version, triple, FLAGS, "ggml-vulkan", "Vulkan back end", log,
                              run_with_progress, prepare,
                              compiling="generating and compiling the shaders, then the back end (a few minutes)")
