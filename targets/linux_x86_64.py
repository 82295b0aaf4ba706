"""Linux on x86-64: glibc 2.17 or newer and nothing else from the system (zig's cross toolchain
pins the glibc), every x86-64 generation through ggml's CPU variants, CUDA and Vulkan back ends."""

from . import Target

TARGET = Target(
    name="linux-x86_64",
    system="linux",
    machine="x86_64",
    triple="x86_64-linux-gnu.2.17",
    exe_suffix="",
    exe_format="elf",
    toolchain="buildsys.linux:build",
    build_hint="run `python build.py` (or `make stub`)",
    cpu_variants=("x64", "sse42", "sandybridge", "ivybridge", "piledriver", "haswell", "skylakex", "cannonlake",
                  "cascadelake", "icelake", "cooperlake", "zen4", "alderlake", "sapphirerapids"),
    gpu_backends=("cuda", "vulkan"),
    built_on=("linux-x86_64",),
    runner="native",
    needs="glibc ≥ {glibc_min}",
    max_executable=None,
)
